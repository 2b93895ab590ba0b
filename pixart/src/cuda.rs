//! Opening a CUDA device, with the checks that turn a wrong machine into one clear start-up error.
//!
//! candle's kernels are compiled once, at build time, for the GPU generation named by
//! `CUDA_COMPUTE_CAP` (`deploy/cuda/toolkit.sh`, `deploy/docker/Dockerfile.worker-cuda`). PTX built
//! for compute capability 9.0 does not load on an 8.x GPU, and candle only finds out at the first
//! kernel launch, deep inside a batch, with a driver error code. These checks run when the device
//! is opened instead, and name the cause and the fix.

use candle_core::Device;

use crate::{Error, Result};

/// The compute capability the CUDA kernels of this binary were built for (`CUDA_COMPUTE_CAP` at
/// build time, e.g. `90`), when it was set.
pub const BUILT_FOR: Option<&str> = option_env!("CUDA_COMPUTE_CAP");

fn bad(message: String) -> Error {
    Error::InvalidInput {
        field: "device",
        message,
    }
}

/// Whether kernels built for `built` (e.g. `90`, `90a`, `80`) run on a GPU of capability
/// `major.minor`: PTX is forward compatible, so any GPU at least that new runs it, except the
/// arch-specific `a` variants, which run on exactly that generation.
pub fn compatible(built: &str, major: i32, minor: i32) -> bool {
    let arch_specific = built.ends_with('a');
    let digits: String = built.chars().filter(char::is_ascii_digit).collect();
    let Ok(n) = digits.parse::<i32>() else {
        return true; // unknown format: let the driver decide
    };
    let (bmaj, bmin) = (n / 10, n % 10);
    if arch_specific {
        (major, minor) == (bmaj, bmin)
    } else {
        (major, minor) >= (bmaj, bmin)
    }
}

/// Opens `cuda:n`, checked.
#[cfg(feature = "cuda")]
pub fn open(n: usize) -> Result<Device> {
    let dev = Device::new_cuda(n).map_err(|e| {
        bad(format!(
            "cuda:{n} is not available ({e}); is the NVIDIA driver installed and the GPU visible \
             (nvidia-smi, CUDA_VISIBLE_DEVICES, the container's GPU reservation)?"
        ))
    })?;
    let cuda = dev
        .as_cuda_device()
        .map_err(|e| bad(format!("cuda:{n}: {e}")))?;
    let ctx = cuda.cuda_stream().context().clone();
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| bad(format!("cuda:{n}: cannot read its compute capability: {e}")))?;
    if let Some(built) = BUILT_FOR
        && !compatible(built, major, minor)
    {
        let name = ctx.name().unwrap_or_else(|_| "this GPU".into());
        return Err(bad(format!(
            "cuda:{n} is {name} (compute capability {major}.{minor}) but this binary's CUDA kernels \
             were built for CUDA_COMPUTE_CAP={built}; rebuild with CUDA_COMPUTE_CAP={major}{minor}"
        )));
    }
    Ok(dev)
}

/// Without the `cuda` feature there is no CUDA device to open.
#[cfg(not(feature = "cuda"))]
pub fn open(n: usize) -> Result<Device> {
    Err(bad(format!(
        "cuda:{n} was asked for but this binary was built without CUDA support; build it with \
         `--features cuda` (deploy/cuda/README.md) or use --device cpu"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_runs_forward_but_arch_specific_code_does_not() {
        assert!(compatible("90", 9, 0));
        assert!(compatible("80", 9, 0), "8.0 PTX JIT-compiles on Hopper");
        assert!(!compatible("90", 8, 6), "9.0 kernels on an A10");
        assert!(compatible("90a", 9, 0));
        assert!(
            !compatible("90a", 10, 0),
            "sm_90a features exist on Hopper only"
        );
        assert!(compatible("86", 8, 9));
        assert!(!compatible("89", 8, 6));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_fix() {
        let e = crate::pipeline::device_from_str("cuda")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("built without CUDA support") && e.contains("--features cuda"),
            "{e}"
        );
        let e = crate::pipeline::device_from_str("cuda:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:1"), "{e}");
    }
}
