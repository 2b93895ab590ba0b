//! Seeded randomness for training runs.
//!
//! Every random draw of a run is a pure function of `(seed, step, stream)`: a resumed run therefore draws
//! exactly what the uninterrupted run would have drawn at the same step, and no generator state has to be
//! checkpointed. candle's CPU backend cannot be seeded (`Device::set_seed` fails on CPU and `randn` uses a
//! thread-local generator), so tensors of random numbers are built here from a ChaCha stream instead.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// What a draw is for: distinct streams keep, say, batch sampling and noise independent of each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Parameter initialisation (drawn once, at step 0).
    Init = 0,
    /// Which samples form the batch.
    Batch = 1,
    /// Noise of the step (the VAE's posterior sample, diffusion noise).
    Noise = 2,
}

/// The generator for `stream` at `step` of the run seeded with `seed`.
pub fn rng(seed: u64, step: u64, stream: Stream) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // 2^60 steps per stream is beyond any run; the low bits select the stream.
    rng.set_stream((step << 4) | stream as u64);
    rng
}

/// A tensor of standard-normal f32 values drawn from `rng`.
pub fn randn(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// A tensor of f32 values uniform in `[-bound, bound)` drawn from `rng`.
pub fn uniform(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    bound: f32,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = if bound > 0.0 {
        (0..n).map(|_| rng.random_range(-bound..bound)).collect()
    } else {
        vec![0.0; n]
    };
    Ok(Tensor::from_vec(v, shape, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_depend_on_seed_step_and_stream_only() {
        let d = Device::Cpu;
        let a = randn(&mut rng(7, 3, Stream::Noise), &[5], &d).unwrap();
        let b = randn(&mut rng(7, 3, Stream::Noise), &[5], &d).unwrap();
        let c = randn(&mut rng(7, 4, Stream::Noise), &[5], &d).unwrap();
        let e = randn(&mut rng(7, 3, Stream::Batch), &[5], &d).unwrap();
        let f = randn(&mut rng(8, 3, Stream::Noise), &[5], &d).unwrap();
        let v = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        assert_ne!(v(&a), v(&e));
        assert_ne!(v(&a), v(&f));
    }
}
