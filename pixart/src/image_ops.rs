//! Image-side helpers of the pipeline: aspect-ratio binning, diffusers' resize-and-crop, tensor →
//! `RgbImage`, PNG encoding.
//!
//! PixArt was trained on a fixed set of aspect-ratio buckets; rendering a request at the nearest
//! bucket and resizing back (what diffusers' `PixArtAlphaPipeline` does with
//! `use_resolution_binning=True`) avoids the artefacts of off-distribution shapes. The tables are
//! diffusers' `ASPECT_RATIO_{1024,512,256}_BIN` verbatim; which one applies follows the
//! transformer's `sample_size` (128, 64, 32 latent pixels). Models with any other `sample_size`
//! (such as the bundled tiny test model) have no table and render the requested size exactly.
//!
//! ```
//! use pixart::image_ops::{AspectRatioTable, classify_height_width_bin};
//! let table = AspectRatioTable::for_sample_size(128).unwrap();
//! assert_eq!(classify_height_width_bin(768, 1360, table), (768, 1344));
//! ```

use std::io::Cursor;

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::{Error, Result};

/// One bucket table: `(height/width key, height, width)` in pixels, in diffusers' key order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AspectRatioTable {
    pub name: &'static str,
    pub bins: &'static [(f64, u32, u32)],
}

impl AspectRatioTable {
    /// The table diffusers uses for a transformer of this `sample_size` (latent pixels), if any.
    pub fn for_sample_size(sample_size: usize) -> Option<Self> {
        match sample_size {
            128 => Some(Self {
                name: "ASPECT_RATIO_1024_BIN",
                bins: BIN_1024,
            }),
            64 => Some(Self {
                name: "ASPECT_RATIO_512_BIN",
                bins: BIN_512,
            }),
            32 => Some(Self {
                name: "ASPECT_RATIO_256_BIN",
                bins: BIN_256,
            }),
            _ => None,
        }
    }
}

/// The bucket whose key is nearest to `height / width`; ties go to the first key, like Python's
/// `min` over the dict keys. Returns `(height, width)`.
pub fn classify_height_width_bin(height: u32, width: u32, table: AspectRatioTable) -> (u32, u32) {
    let ar = height as f64 / width as f64;
    let mut best = table.bins[0];
    for &bin in table.bins {
        if (bin.0 - ar).abs() < (best.0 - ar).abs() {
            best = bin;
        }
    }
    (best.1, best.2)
}

/// diffusers' `PixArtImageProcessor.resize_and_crop_tensor`: scale (bilinear, torch's
/// `align_corners=False` sampling, no antialias) so the image covers `new_height × new_width`,
/// then take the centre crop. Input and output are (B, C, H, W) f32 on any device; the
/// arithmetic runs on the CPU.
pub fn resize_and_crop_tensor(
    samples: &Tensor,
    new_width: usize,
    new_height: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = samples.dims4()?;
    if h == new_height && w == new_width {
        return Ok(samples.clone());
    }
    let ratio = f64::max(new_height as f64 / h as f64, new_width as f64 / w as f64);
    let rw = (w as f64 * ratio) as usize;
    let rh = (h as f64 * ratio) as usize;
    let device = samples.device().clone();
    let src = samples
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let resized = bilinear(&src, b * c, h, w, rh, rw);
    let start_x = (rw - new_width) / 2;
    let start_y = (rh - new_height) / 2;
    let mut out = Vec::with_capacity(b * c * new_height * new_width);
    for plane in resized.chunks_exact(rh * rw) {
        for y in start_y..start_y + new_height {
            out.extend_from_slice(&plane[y * rw + start_x..y * rw + start_x + new_width]);
        }
    }
    Ok(Tensor::from_vec(
        out,
        (b, c, new_height, new_width),
        &candle_core::Device::Cpu,
    )?
    .to_device(&device)?)
}

/// `F.interpolate(mode="bilinear", align_corners=False)` on `planes` planes of `h × w`, in f32
/// like torch's CPU kernel (source index `(dst + 0.5)·(in/out) − 0.5`, clamped at 0).
fn bilinear(src: &[f32], planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let axis = |insz: usize, outsz: usize| -> Vec<(usize, usize, f32)> {
        let scale = insz as f32 / outsz as f32;
        (0..outsz)
            .map(|d| {
                let s = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s as usize).min(insz - 1);
                let i1 = if i0 < insz - 1 { i0 + 1 } else { i0 };
                (i0, i1, s - i0 as f32)
            })
            .collect()
    };
    let ys = axis(h, oh);
    let xs = axis(w, ow);
    let mut out = vec![0f32; planes * oh * ow];
    for p in 0..planes {
        let sp = &src[p * h * w..(p + 1) * h * w];
        let op = &mut out[p * oh * ow..(p + 1) * oh * ow];
        for (oy, &(y0, y1, ly)) in ys.iter().enumerate() {
            let (hy0, hy1) = (1.0 - ly, ly);
            for (ox, &(x0, x1, lx)) in xs.iter().enumerate() {
                let (hx0, hx1) = (1.0 - lx, lx);
                op[oy * ow + ox] = hy0 * (hx0 * sp[y0 * w + x0] + hx1 * sp[y0 * w + x1])
                    + hy1 * (hx0 * sp[y1 * w + x0] + hx1 * sp[y1 * w + x1]);
            }
        }
    }
    out
}

/// Turns a decoded batch (B, 3, H, W) in ≈[−1, 1] into 8-bit RGB images the way diffusers'
/// `postprocess` + `numpy_to_pil` do: `clamp(x/2 + 0.5, 0, 1)·255`, rounded.
pub fn tensor_to_images(decoded: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = decoded.dims4()?;
    if c != 3 {
        return Err(Error::Tensor {
            name: "image".into(),
            message: format!("expected 3 channels, got {c}"),
        });
    }
    let data = decoded
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = h * w;
    let mut images = Vec::with_capacity(b);
    for i in 0..b {
        let img = &data[i * 3 * plane..(i + 1) * 3 * plane];
        let mut buf = Vec::with_capacity(3 * plane);
        for p in 0..plane {
            for ch in 0..3 {
                let v = (img[ch * plane + p] / 2.0 + 0.5).clamp(0.0, 1.0);
                buf.push((v * 255.0).round_ties_even() as u8);
            }
        }
        images.push(
            RgbImage::from_raw(w as u32, h as u32, buf).expect("buffer has exactly w*h*3 bytes"),
        );
    }
    Ok(images)
}

/// Encodes an image as PNG bytes (what the worker uploads and `generate` writes).
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| Error::InvalidInput {
            field: "image",
            message: format!("PNG encoding failed: {e}"),
        })?;
    Ok(out.into_inner())
}

/// Reads an RGB image file into a (1, 3, H, W) f32 tensor in [−1, 1] (VAE encoder input).
pub fn image_to_tensor(image: &RgbImage, device: &candle_core::Device) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let raw = image.as_raw();
    let mut data = vec![0f32; 3 * h * w];
    for p in 0..h * w {
        for ch in 0..3 {
            data[ch * h * w + p] = raw[p * 3 + ch] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
}

const BIN_1024: &[(f64, u32, u32)] = &[
    (0.25, 512, 2048),
    (0.28, 512, 1856),
    (0.32, 576, 1792),
    (0.33, 576, 1728),
    (0.35, 576, 1664),
    (0.4, 640, 1600),
    (0.42, 640, 1536),
    (0.48, 704, 1472),
    (0.5, 704, 1408),
    (0.52, 704, 1344),
    (0.57, 768, 1344),
    (0.6, 768, 1280),
    (0.68, 832, 1216),
    (0.72, 832, 1152),
    (0.78, 896, 1152),
    (0.82, 896, 1088),
    (0.88, 960, 1088),
    (0.94, 960, 1024),
    (1.0, 1024, 1024),
    (1.07, 1024, 960),
    (1.13, 1088, 960),
    (1.21, 1088, 896),
    (1.29, 1152, 896),
    (1.38, 1152, 832),
    (1.46, 1216, 832),
    (1.67, 1280, 768),
    (1.75, 1344, 768),
    (2.0, 1408, 704),
    (2.09, 1472, 704),
    (2.4, 1536, 640),
    (2.5, 1600, 640),
    (3.0, 1728, 576),
    (4.0, 2048, 512),
];
const BIN_512: &[(f64, u32, u32)] = &[
    (0.25, 256, 1024),
    (0.28, 256, 928),
    (0.32, 288, 896),
    (0.33, 288, 864),
    (0.35, 288, 832),
    (0.4, 320, 800),
    (0.42, 320, 768),
    (0.48, 352, 736),
    (0.5, 352, 704),
    (0.52, 352, 672),
    (0.57, 384, 672),
    (0.6, 384, 640),
    (0.68, 416, 608),
    (0.72, 416, 576),
    (0.78, 448, 576),
    (0.82, 448, 544),
    (0.88, 480, 544),
    (0.94, 480, 512),
    (1.0, 512, 512),
    (1.07, 512, 480),
    (1.13, 544, 480),
    (1.21, 544, 448),
    (1.29, 576, 448),
    (1.38, 576, 416),
    (1.46, 608, 416),
    (1.67, 640, 384),
    (1.75, 672, 384),
    (2.0, 704, 352),
    (2.09, 736, 352),
    (2.4, 768, 320),
    (2.5, 800, 320),
    (3.0, 864, 288),
    (4.0, 1024, 256),
];
const BIN_256: &[(f64, u32, u32)] = &[
    (0.25, 128, 512),
    (0.28, 128, 464),
    (0.32, 144, 448),
    (0.33, 144, 432),
    (0.35, 144, 416),
    (0.4, 160, 400),
    (0.42, 160, 384),
    (0.48, 176, 368),
    (0.5, 176, 352),
    (0.52, 176, 336),
    (0.57, 192, 336),
    (0.6, 192, 320),
    (0.68, 208, 304),
    (0.72, 208, 288),
    (0.78, 224, 288),
    (0.82, 224, 272),
    (0.88, 240, 272),
    (0.94, 240, 256),
    (1.0, 256, 256),
    (1.07, 256, 240),
    (1.13, 272, 240),
    (1.21, 272, 224),
    (1.29, 288, 224),
    (1.38, 288, 208),
    (1.46, 304, 208),
    (1.67, 320, 192),
    (1.75, 336, 192),
    (2.0, 352, 176),
    (2.09, 368, 176),
    (2.4, 384, 160),
    (2.5, 400, 160),
    (3.0, 432, 144),
    (4.0, 512, 128),
];

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn binning_picks_nearest_key() {
        let t = AspectRatioTable::for_sample_size(128).unwrap();
        assert_eq!(classify_height_width_bin(1024, 1024, t), (1024, 1024));
        assert_eq!(classify_height_width_bin(512, 2048, t), (512, 2048));
        assert_eq!(classify_height_width_bin(1080, 1920, t), (768, 1344));
        let t = AspectRatioTable::for_sample_size(64).unwrap();
        assert_eq!(classify_height_width_bin(512, 512, t), (512, 512));
        assert!(AspectRatioTable::for_sample_size(8).is_none());
    }

    #[test]
    fn resize_and_crop_keeps_constant_images_and_shapes() {
        let x = Tensor::full(0.25f32, (2, 3, 16, 32), &Device::Cpu).unwrap();
        let y = resize_and_crop_tensor(&x, 20, 12).unwrap();
        assert_eq!(y.dims4().unwrap(), (2, 3, 12, 20));
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|&a| (a - 0.25).abs() < 1e-6));
    }

    #[test]
    fn resize_and_crop_matches_diffusers() {
        // Expected values from diffusers' PixArtImageProcessor.resize_and_crop_tensor (torch 2.15).
        let x: Vec<f32> = (0..24).map(|i| (i as f32).powf(1.5) / 10.0).collect();
        let x = Tensor::from_vec(x, (1, 1, 4, 6), &Device::Cpu).unwrap();
        let y = resize_and_crop_tensor(&x, 3, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = [
            0.281713, 0.557621, 0.960688, 2.927386, 3.630304, 4.386338, 7.213285, 8.165659,
            9.157256,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let y = resize_and_crop_tensor(&x, 4, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = [
            0.25, 0.75, 1.25, 1.75, 1.0, 1.5, 2.0, 2.5, 2.5, 3.0, 3.5, 4.0, 3.25, 3.75, 4.25, 4.75,
        ];
        assert_eq!(y, want);
    }

    #[test]
    fn bilinear_upsample_matches_torch_formula() {
        // torch: F.interpolate(tensor([[[[0.,1.]]]]), size=(1,4), mode="bilinear") = [0, .25, .75, 1]
        let out = bilinear(&[0.0, 1.0], 1, 1, 2, 1, 4);
        assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn images_round_trip_through_png() {
        let x = Tensor::new(
            &[[[[-1f32, 1.0]], [[0.0, 0.5]], [[1.0, -1.0]]]],
            &Device::Cpu,
        )
        .unwrap();
        let imgs = tensor_to_images(&x).unwrap();
        assert_eq!(imgs[0].get_pixel(0, 0).0, [0, 128, 255]);
        assert_eq!(imgs[0].get_pixel(1, 0).0, [255, 191, 0]);
        let png = encode_png(&imgs[0]).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
