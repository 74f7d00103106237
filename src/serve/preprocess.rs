//! Turning a request's input into the model's input tensor, with every check done
//! before any pixel is decoded or any memory is sized from client data.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::{
    DynamicImage, ImageBuffer, ImageFormat, ImageReader, Limits, Pixel, imageops::FilterType,
};

use crate::model::repo::ModelConfig;
use crate::{Error, Result, bail};

/// Largest image side accepted; the header is checked before decoding.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Largest decoded image, in pixels.
pub const MAX_IMAGE_PIXELS: u64 = 40_000_000;

/// What a client sent.
#[derive(Debug, Clone)]
pub enum Input {
    /// Encoded PNG or JPEG.
    Image(Vec<u8>),
    /// The model input as is, `[C, H, W]` or `[1, C, H, W]`, already normalized.
    Tensor { shape: Vec<usize>, data: Vec<f32> },
}

/// One image as a `[C, H, W]` f32 vector in the model's input layout.
pub fn to_chw(input: &Input, cfg: &ModelConfig) -> Result<Vec<f32>> {
    match input {
        Input::Image(bytes) => decode_image(bytes, cfg),
        Input::Tensor { shape, data } => check_tensor(shape, data, cfg),
    }
}

/// Stacks images into a `[N, C, H, W]` batch.
pub fn batch(images: &[&[f32]], cfg: &ModelConfig, device: &Device) -> Result<Tensor> {
    let [h, w] = cfg.input_size;
    let flat: Vec<f32> = images.iter().flat_map(|i| i.iter().copied()).collect();
    Ok(Tensor::from_vec(
        flat,
        (images.len(), cfg.channels, h, w),
        device,
    )?)
}

fn check_tensor(shape: &[usize], data: &[f32], cfg: &ModelConfig) -> Result<Vec<f32>> {
    check_tensor_shape(shape, data.len(), cfg)?;
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        bail!(
            InvalidArgument,
            "tensor value {i} is {}; inputs must be finite",
            data[i]
        );
    }
    Ok(data.to_vec())
}

fn check_tensor_shape(shape: &[usize], len: usize, cfg: &ModelConfig) -> Result<()> {
    let [h, w] = cfg.input_size;
    let want = [cfg.channels, h, w];
    let dims = match shape {
        [1, rest @ ..] if rest.len() == 3 => rest,
        s => s,
    };
    if dims != want {
        bail!(
            InvalidArgument,
            "tensor shape {shape:?} does not match the model input [{}, {h}, {w}] (or [1, {}, {h}, {w}])",
            cfg.channels,
            cfg.channels
        );
    }
    if len != want.iter().product::<usize>() {
        bail!(
            InvalidArgument,
            "tensor shape {shape:?} needs {} values, got {len}",
            want.iter().product::<usize>(),
        );
    }
    Ok(())
}

/// What decoding an input will cost, known from its header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Pixels the decoder will produce (values, for a tensor).
    pub pixels: u64,
}

/// Checks an input as far as it can be without decoding pixels (an image's
/// format, header and size limits; a tensor in full) and says what decoding it
/// will cost, so admission can decide before any memory or core is spent.
pub fn inspect(input: &Input, cfg: &ModelConfig) -> Result<Cost> {
    match input {
        Input::Image(bytes) => inspect_image(bytes).map(|(_, cost)| cost),
        Input::Tensor { shape, data } => {
            check_tensor_shape(shape, data.len(), cfg)?;
            Ok(Cost {
                pixels: data.len() as u64,
            })
        }
    }
}

fn bad(what: &str, e: &dyn std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{what}: {e} (send a PNG or JPEG)"))
}

/// The reader of an image whose header passed every check, and its cost.
fn inspect_image(bytes: &[u8]) -> Result<(ImageReader<Cursor<&[u8]>>, Cost)> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad("cannot read image", &e))?;
    if reader.format().is_none() {
        bail!(InvalidArgument, "image bytes are neither PNG nor JPEG");
    }
    // Reads only the header: a bomb claiming huge dimensions is refused here.
    let (w, h) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad("cannot read image", &e))?
        .into_dimensions()
        .map_err(|e| bad("cannot read image header", &e))?;
    if w == 0 || h == 0 {
        bail!(
            InvalidArgument,
            "image is {w}x{h}; it must have at least one pixel"
        );
    }
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        bail!(
            InvalidArgument,
            "image is {w}x{h}; the limit is {MAX_IMAGE_SIDE} per side and {MAX_IMAGE_PIXELS} pixels"
        );
    }
    // Every 8x8 block of a Huffman-coded JPEG (the only kind the decoder reads)
    // spends at least one bit on its DC term. Fewer bytes than blocks / 8 is a
    // truncated file, which the decoder would pad out at full cost: fuzzing found
    // 450 bytes claiming 6144x6144 that took 0.4 s to decode.
    if reader.format() == Some(ImageFormat::Jpeg) {
        let blocks = u64::from(w).div_ceil(8) * u64::from(h).div_ceil(8);
        if (bytes.len() as u64) < blocks / 8 {
            bail!(
                InvalidArgument,
                "JPEG claims {w}x{h} in {} bytes, too few for that size: send the whole file",
                bytes.len()
            );
        }
    }
    let pixels = u64::from(w) * u64::from(h);
    Ok((reader, Cost { pixels }))
}

fn decode_image(bytes: &[u8], cfg: &ModelConfig) -> Result<Vec<f32>> {
    let (reader, _) = inspect_image(bytes)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    let mut reader = reader;
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| bad("cannot decode image", &e))?;
    Ok(normalize(&img, cfg))
}

/// Converts to the model's channels, brings it to its input size ([`fit`]) and
/// normalizes.
fn normalize(img: &DynamicImage, cfg: &ModelConfig) -> Vec<f32> {
    let [h, w] = cfg.input_size;
    let plane = h * w;
    let mut out = vec![0f32; cfg.channels * plane];
    let mut put = |c: usize, i: usize, v: u8| {
        out[c * plane + i] = (f32::from(v) / 255.0 - cfg.mean[c]) / cfg.std[c];
    };
    if cfg.channels == 1 {
        for (i, p) in fit(img.to_luma8(), cfg).pixels().enumerate() {
            put(0, i, p.0[0]);
        }
    } else {
        for (i, p) in fit(img.to_rgb8(), cfg).pixels().enumerate() {
            for c in 0..3 {
                put(c, i, p.0[c]);
            }
        }
    }
    out
}

/// `img` at the model's input size: resized whole or, with `resize`, its
/// shorter side resized to `resize` and the centre cropped (as torchvision and
/// Pillow do it). An image so elongated that the resized copy would be over
/// four times as long as it is wide is cropped first, from the original, so a
/// thin strip is never enlarged whole.
pub fn fit<P>(img: ImageBuffer<P, Vec<u8>>, cfg: &ModelConfig) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let [h, w] = cfg.input_size;
    let (w, h) = (w as u32, h as u32);
    let resize =
        |img: ImageBuffer<P, Vec<u8>>, (rw, rh): (u32, u32)| match img.dimensions() == (rw, rh) {
            true => img,
            false => image::imageops::resize(&img, rw, rh, FilterType::Triangle),
        };
    let Some(side) = cfg.resize else {
        return resize(img, (w, h));
    };
    let side = side as u64;
    let (iw, ih) = img.dimensions();
    let short = u64::from(iw.min(ih));
    let long = |l: u32| (u64::from(l) * side / short) as u32;
    let (rw, rh) = if iw <= ih {
        (side as u32, long(ih))
    } else {
        (long(iw), side as u32)
    };
    if u64::from(rw.max(rh)) <= 4 * side {
        let resized = resize(img, (rw, rh));
        return image::imageops::crop_imm(&resized, (rw - w) / 2, (rh - h) / 2, w, h).to_image();
    }
    // Source pixels per pixel of the resized image.
    let scale = short as f64 / side as f64;
    let span = |out: u32, of: u32| ((f64::from(out) * scale).round() as u32).clamp(1, of);
    let (cw, ch) = (span(w, iw), span(h, ih));
    let crop = image::imageops::crop_imm(&img, (iw - cw) / 2, (ih - ch) / 2, cw, ch).to_image();
    resize(crop, (w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16x16 grey JPEG; with `claim`, its frame header says that size instead.
    fn jpeg(claim: Option<u16>) -> Vec<u8> {
        let img = image::GrayImage::from_fn(16, 16, |x, y| image::Luma([(x * 16 + y) as u8]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Jpeg).unwrap();
        let mut bytes = out.into_inner();
        if let Some(side) = claim {
            let sof = bytes.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
            for at in [sof + 5, sof + 7] {
                bytes[at..at + 2].copy_from_slice(&side.to_be_bytes());
            }
        }
        bytes
    }

    /// ImageNet's resize-and-crop gives the input size, also for a strip so thin
    /// that resizing it whole would make a 256 × 1,280,000 image.
    #[test]
    fn resize_then_centre_crop_gives_the_input_size() {
        let cfg = ModelConfig {
            resize: Some(256),
            ..crate::lab::synth::config(crate::model::Arch::MobileNetV2, 3, 224, 10, 1)
        };
        for (w, h) in [(640, 480), (300, 1200), (1, 5000), (5000, 1)] {
            let img = DynamicImage::new_rgb8(w, h);
            assert_eq!(normalize(&img, &cfg).len(), 3 * 224 * 224, "{w}x{h}");
        }
        // The centre survives the crop: a bright centre column of a wide image.
        let mut img = image::RgbImage::new(512, 256);
        for y in 0..256 {
            img.put_pixel(256, y, image::Rgb([255, 255, 255]));
        }
        let x = normalize(&DynamicImage::ImageRgb8(img), &cfg);
        let row = &x[100 * 224..][..224];
        let brightest = (0..224).max_by(|a, b| row[*a].total_cmp(&row[*b])).unwrap();
        assert!((111..=113).contains(&brightest), "{brightest}");
    }

    #[test]
    fn a_truncated_jpeg_claiming_a_large_size_is_refused_before_decoding() {
        let cfg = ModelConfig::parse(include_str!("../../models/mnist-resnet/model.toml")).unwrap();
        assert_eq!(
            to_chw(&Input::Image(jpeg(None)), &cfg).unwrap().len(),
            28 * 28
        );
        let e = to_chw(&Input::Image(jpeg(Some(6144))), &cfg).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("too few for that size")),
            "{e}"
        );
    }
}
