//! Image corruptions in the manner of ImageNet-C / MNIST-C (Hendrycks & Dietterich
//! 2019; Mu & Gilmer 2019), on grayscale images with values in [0, 1].
//!
//! Every corruption is deterministic given its seed and uses only [`Rng`], so
//! outputs are bit-identical from run to run and platform to platform. Spatial
//! parameters (kernel sizes, streak lengths) are in pixels, calibrated for 28×28
//! MNIST digits; densities (noise, flakes, drops) are per pixel, so any size
//! works.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use image::codecs::jpeg::JpegEncoder;
use image::{
    DynamicImage, ExtendedColorType, GrayImage, ImageError, ImageFormat, ImageReader, RgbImage,
};

use crate::rng::Rng;
use crate::{Error, Result, bail};

/// A grayscale image, row-major, values in [0, 1]. `pixels.len()` must equal
/// `width * height`, and both sides must be at least 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Gray {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f32>,
}

impl Gray {
    /// Converts 8-bit luma to [0, 1].
    pub fn from_luma(img: &GrayImage) -> Gray {
        Gray {
            width: img.width() as usize,
            height: img.height() as usize,
            pixels: img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect(),
        }
    }

    /// Converts to 8-bit luma, clamping to [0, 1] and rounding to nearest.
    pub fn to_luma(&self) -> GrayImage {
        let bytes = self.pixels.iter().map(|&v| to_u8(v)).collect();
        GrayImage::from_raw(self.width as u32, self.height as u32, bytes)
            .expect("Gray pixels must hold width * height values")
    }

    fn with_pixels(&self, pixels: Vec<f32>) -> Gray {
        Gray {
            width: self.width,
            height: self.height,
            pixels,
        }
    }

    fn map(&self, f: impl FnMut(f32) -> f32) -> Gray {
        self.with_pixels(self.pixels.iter().copied().map(f).collect())
    }

    /// The pixel at (x, y), with coordinates clamped to the border.
    fn clamped(&self, x: isize, y: isize) -> f32 {
        let x = x.clamp(0, self.width as isize - 1) as usize;
        let y = y.clamp(0, self.height as isize - 1) as usize;
        self.pixels[y * self.width + x]
    }
}

/// An RGB image, planar (every red value, then green, then blue), values in
/// [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub planes: Vec<f32>,
}

impl Rgb {
    pub fn from_rgb8(img: &RgbImage) -> Rgb {
        let plane = img.width() as usize * img.height() as usize;
        let mut planes = vec![0f32; 3 * plane];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                planes[c * plane + i] = f32::from(p.0[c]) / 255.0;
            }
        }
        Rgb {
            width: img.width() as usize,
            height: img.height() as usize,
            planes,
        }
    }

    /// Converts to 8 bits, clamping to [0, 1] and rounding to nearest.
    pub fn to_rgb8(&self) -> RgbImage {
        let plane = self.width * self.height;
        RgbImage::from_fn(self.width as u32, self.height as u32, |x, y| {
            let i = y as usize * self.width + x as usize;
            image::Rgb([0, 1, 2].map(|c| to_u8(self.planes[c * plane + i])))
        })
    }

    fn channel(&self, c: usize) -> Gray {
        let plane = self.width * self.height;
        Gray {
            width: self.width,
            height: self.height,
            pixels: self.planes[c * plane..(c + 1) * plane].to_vec(),
        }
    }

    /// The three planes as one grayscale image three times as tall.
    fn stacked(&self) -> Gray {
        Gray {
            width: self.width,
            height: 3 * self.height,
            pixels: self.planes.clone(),
        }
    }
}

fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// One kind of corruption; see [`Corruption::apply`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Corruption {
    Fog,
    Snow,
    Rain,
    Brightness,
    Contrast,
    GaussianNoise,
    ShotNoise,
    ImpulseNoise,
    MotionBlur,
    DefocusBlur,
    Pixelate,
    Jpeg,
}

impl Corruption {
    pub const ALL: [Corruption; 12] = [
        Corruption::Fog,
        Corruption::Snow,
        Corruption::Rain,
        Corruption::Brightness,
        Corruption::Contrast,
        Corruption::GaussianNoise,
        Corruption::ShotNoise,
        Corruption::ImpulseNoise,
        Corruption::MotionBlur,
        Corruption::DefocusBlur,
        Corruption::Pixelate,
        Corruption::Jpeg,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Corruption::Fog => "fog",
            Corruption::Snow => "snow",
            Corruption::Rain => "rain",
            Corruption::Brightness => "brightness",
            Corruption::Contrast => "contrast",
            Corruption::GaussianNoise => "gaussian_noise",
            Corruption::ShotNoise => "shot_noise",
            Corruption::ImpulseNoise => "impulse_noise",
            Corruption::MotionBlur => "motion_blur",
            Corruption::DefocusBlur => "defocus_blur",
            Corruption::Pixelate => "pixelate",
            Corruption::Jpeg => "jpeg",
        }
    }

    /// Fog, snow, rain, brightness and contrast.
    pub fn is_weather(self) -> bool {
        matches!(
            self,
            Corruption::Fog
                | Corruption::Snow
                | Corruption::Rain
                | Corruption::Brightness
                | Corruption::Contrast
        )
    }

    /// Corrupts `img` at `severity` (1 mild ..= 5 heavy; values outside are
    /// clamped into that range), drawing randomness only from `seed`. The result
    /// has the same size and values in [0, 1].
    pub fn apply(self, img: &Gray, severity: u8, seed: u64) -> Gray {
        let s = usize::from(severity.clamp(1, 5)) - 1;
        let mut rng = Rng::new(seed);
        let out = match self {
            Corruption::Fog => fog(img, s, &mut rng),
            Corruption::Snow => snow(img, s, &mut rng),
            Corruption::Rain => rain(img, s, &mut rng),
            Corruption::Brightness => {
                let c = [0.1, 0.2, 0.3, 0.4, 0.5][s];
                img.map(|v| v + c)
            }
            Corruption::Contrast => {
                let c = [0.5, 0.4, 0.3, 0.2, 0.1][s];
                let mean = img.pixels.iter().sum::<f32>() / img.pixels.len() as f32;
                img.map(|v| (v - mean) * c + mean)
            }
            Corruption::GaussianNoise => {
                let c = [0.08, 0.12, 0.18, 0.26, 0.38][s];
                img.map(|v| v + c * rng.normal())
            }
            Corruption::ShotNoise => {
                let photons = [60.0, 25.0, 12.0, 5.0, 3.0][s];
                // Sampling by quantile takes one number per pixel, so that with
                // one seed each pixel keeps its quantile across severities.
                img.map(|v| poisson_quantile(v.clamp(0.0, 1.0) * photons, rng.uniform()) / photons)
            }
            Corruption::ImpulseNoise => {
                let amount = [0.03, 0.06, 0.09, 0.17, 0.27][s];
                img.map(|v| {
                    // Draw both numbers for every pixel, so that with one seed the
                    // pixels hit at a lower severity are also hit at a higher one.
                    let (hit, salt) = (rng.uniform(), rng.uniform());
                    match (hit < amount, salt < 0.5) {
                        (false, _) => v,
                        (true, true) => 1.0,
                        (true, false) => 0.0,
                    }
                })
            }
            Corruption::MotionBlur => {
                let length = [3.0, 5.0, 7.0, 9.0, 11.0][s];
                let angle = (rng.uniform() * 90.0 - 45.0).to_radians();
                convolve(img, &Kernel::line(length, angle))
            }
            Corruption::DefocusBlur => {
                let radius = [1.0, 1.5, 2.0, 2.5, 3.0][s];
                convolve(img, &Kernel::disk(radius))
            }
            Corruption::Pixelate => {
                // Block sides in pixels; ImageNet-C shrinks by 0.6 to 0.25,
                // blocks of 1.7 to 4.
                pixelate(img, [1.5, 2.0, 2.5, 3.0, 3.5][s])
            }
            Corruption::Jpeg => {
                let quality = [25, 18, 15, 10, 7][s];
                // Encoding only fails past JPEG's 65535-pixel side limit; such an
                // image is passed through rather than panicking.
                jpeg_roundtrip(img, quality).unwrap_or_else(|| img.clone())
            }
        };
        out.map(|v| v.clamp(0.0, 1.0))
    }
}

impl Corruption {
    /// Corrupts an RGB image as [`Corruption::apply`] does a grayscale one. The
    /// pixel-wise kinds (brightness, contrast and the three noises) see the
    /// three planes as one image, so that noise is drawn for every channel
    /// apart and contrast pulls towards the mean of all of them, as ImageNet-C
    /// does. The others draw one pattern (fog, flakes, streaks, a blur kernel,
    /// blocks) and lay it on each channel alike; fog renormalizes each channel
    /// by its own maximum, and JPEG codes each channel as grayscale (no chroma
    /// subsampling). Spatial sizes stay in pixels as calibrated for 28×28
    /// digits, so on a 224×224 photo the blurs, snow and rain are milder than
    /// ImageNet-C's; fog and the pixel-wise kinds do not depend on the size.
    pub fn apply_rgb(self, img: &Rgb, severity: u8, seed: u64) -> Rgb {
        use Corruption::*;
        let planes = match self {
            Brightness | Contrast | GaussianNoise | ShotNoise | ImpulseNoise => {
                self.apply(&img.stacked(), severity, seed).pixels
            }
            Fog | Snow | Rain | MotionBlur | DefocusBlur | Pixelate | Jpeg => (0..3)
                .flat_map(|c| self.apply(&img.channel(c), severity, seed).pixels)
                .collect(),
        };
        Rgb {
            width: img.width,
            height: img.height,
            planes,
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for Corruption {
    type Err = Error;

    /// Accepts the names of [`Corruption::name`], ignoring case, with `-` allowed for `_`.
    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase().replace('-', "_");
        match Corruption::ALL.into_iter().find(|c| c.name() == wanted) {
            Some(c) => Ok(c),
            None => {
                let names: Vec<&str> = Corruption::ALL.iter().map(|c| c.name()).collect();
                bail!(
                    InvalidArgument,
                    "unknown corruption {s:?}; valid names are {}",
                    names.join(", ")
                )
            }
        }
    }
}

/// Accepts a severity of 1..=5.
pub fn parse_severity(s: u8) -> Result<u8> {
    if !(1..=5).contains(&s) {
        bail!(InvalidArgument, "severity is {s}; it must be 1 to 5");
    }
    Ok(s)
}

/// Reads a PNG or JPEG, corrupts it (in colour when it has colour) and writes a
/// PNG to `output`.
pub fn corrupt_file(
    input: &Path,
    output: &Path,
    kind: Corruption,
    severity: u8,
    seed: u64,
) -> Result<()> {
    let severity = parse_severity(severity)?;
    let img = read_image(input)?;
    if img.width() == 0 || img.height() == 0 {
        bail!(InvalidArgument, "{}: image has no pixels", input.display());
    }
    let saved = match img.color().has_color() {
        true => (kind.apply_rgb(&Rgb::from_rgb8(&img.to_rgb8()), severity, seed))
            .to_rgb8()
            .save_with_format(output, ImageFormat::Png),
        false => (kind.apply(&Gray::from_luma(&img.to_luma8()), severity, seed))
            .to_luma()
            .save_with_format(output, ImageFormat::Png),
    };
    saved.map_err(|e| image_error(output, e))
}

/// Reads and decodes a PNG or JPEG file.
pub fn read_image(path: &Path) -> Result<DynamicImage> {
    ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| image_error(path, e))
}

fn image_error(path: &Path, e: ImageError) -> Error {
    match e {
        ImageError::IoError(e) => Error::io(path, e),
        e => Error::InvalidArgument(format!("{}: {e} (use a PNG or JPEG)", path.display())),
    }
}

/// A contact sheet: one row per kind in [`Corruption::ALL`] order; column 0 the
/// clean image, then severities 1 to 5. Tiles are upscaled `scale` times with
/// nearest neighbour and separated by 2-pixel mid-gray gutters.
pub fn contact_sheet(img: &Gray, scale: u32, seed: u64) -> GrayImage {
    const GUTTER: u32 = 2;
    const COLS: u32 = 6;
    let scale = scale.max(1);
    let (tw, th) = (img.width as u32 * scale, img.height as u32 * scale);
    let rows = Corruption::ALL.len() as u32;
    let mut sheet = GrayImage::from_pixel(
        COLS * (tw + GUTTER) + GUTTER,
        rows * (th + GUTTER) + GUTTER,
        image::Luma([128]),
    );
    for (row, kind) in Corruption::ALL.into_iter().enumerate() {
        for col in 0..COLS {
            let tile = match col {
                0 => img.clone(),
                _ => kind.apply(img, col as u8, seed),
            };
            let tile = nearest_resize(&tile, tw as usize, th as usize).to_luma();
            let x0 = GUTTER + col * (tw + GUTTER);
            let y0 = GUTTER + row as u32 * (th + GUTTER);
            for (x, y, p) in tile.enumerate_pixels() {
                sheet.put_pixel(x0 + x, y0 + y, *p);
            }
        }
    }
    sheet
}

// ---------------------------------------------------------------------------
// Weather.

/// Plasma fog added on top, then the contrast renormalized as ImageNet-C does.
fn fog(img: &Gray, s: usize, rng: &mut Rng) -> Gray {
    let strength = [0.25, 0.45, 0.7, 1.0, 1.4][s];
    let decay = [2.5, 2.2, 2.0, 1.8, 1.6][s];
    let size = img.width.max(img.height).next_power_of_two().max(4);
    let plasma = plasma_fractal(size, decay, rng);
    let max = img.pixels.iter().copied().fold(0.0f32, f32::max);
    let mut out = img.clone();
    for y in 0..img.height {
        for x in 0..img.width {
            let v = &mut out.pixels[y * img.width + x];
            *v = (*v + strength * plasma[y * size + x]) * max / (max + strength);
        }
    }
    out
}

/// A `size`×`size` (power of two) wrapping heightmap in [0, 1] from the
/// diamond-square algorithm; a larger `decay` gives a smoother map.
fn plasma_fractal(size: usize, decay: f32, rng: &mut Rng) -> Vec<f32> {
    let mut map = vec![0.0f32; size * size];
    let at = |y: usize, x: usize| (y % size) * size + x % size;
    // ImageNet-C's noise is wibble * U(-wibble, wibble) with wibble divided by
    // the decay each level, so the amplitude falls by decay² per level.
    let mut amplitude = 1.0f32;
    let mut step = size;
    while step >= 2 {
        let half = step / 2;
        for y in (0..size).step_by(step) {
            for x in (0..size).step_by(step) {
                let sum = map[at(y, x)]
                    + map[at(y, x + step)]
                    + map[at(y + step, x)]
                    + map[at(y + step, x + step)];
                map[at(y + half, x + half)] = sum / 4.0 + amplitude * (2.0 * rng.uniform() - 1.0);
            }
        }
        // Diamond centres: the midpoints of the square edges, each between two
        // corners and two square centres.
        for y in (0..size).step_by(half) {
            let x_start = if (y / half).is_multiple_of(2) {
                half
            } else {
                0
            };
            for x in (x_start..size).step_by(step) {
                let sum = map[at(y + size - half, x)]
                    + map[at(y + half, x)]
                    + map[at(y, x + size - half)]
                    + map[at(y, x + half)];
                map[at(y, x)] = sum / 4.0 + amplitude * (2.0 * rng.uniform() - 1.0);
            }
        }
        step = half;
        amplitude /= decay * decay;
    }
    let min = map.iter().copied().fold(f32::INFINITY, f32::min);
    let max = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let range = (max - min).max(f32::EPSILON);
    map.iter().map(|v| (v - min) / range).collect()
}

/// Bright flakes from a thresholded normal field, smeared along a steep
/// diagonal, added (with their half-turn copy, as ImageNet-C does) to a
/// lightened image.
fn snow(img: &Gray, s: usize, rng: &mut Rng) -> Gray {
    // (mean, threshold) of the flake field (std 0.3), smear length, image weight.
    let (mean, threshold, smear, keep) = [
        (0.10, 0.8, 2.0, 0.85),
        (0.17, 0.8, 2.5, 0.8),
        (0.25, 0.8, 3.0, 0.75),
        (0.33, 0.8, 3.5, 0.7),
        (0.42, 0.8, 4.0, 0.6),
    ][s];
    let field = img.map(|_| {
        let v = mean + 0.3 * rng.normal();
        if v < threshold { 0.0 } else { v.min(1.0) }
    });
    let angle = (45.0 + rng.uniform() * 90.0f32).to_radians();
    // The smear spreads a flake over `smear` pixels; the gain keeps it visible.
    let flakes = convolve(&field, &Kernel::line(smear, angle)).map(|v| v * smear.sqrt());
    let n = img.pixels.len();
    img.with_pixels(
        (0..n)
            .map(|i| {
                let v = img.pixels[i];
                // ImageNet-C's max(x, 1.5 * gray + 0.5), which for gray is the latter.
                let light = keep * v + (1.0 - keep) * (1.5 * v + 0.5);
                light + flakes.pixels[i] + flakes.pixels[n - 1 - i]
            })
            .collect(),
    )
}

/// Thin bright slanted streaks over a slightly darkened and blurred image.
fn rain(img: &Gray, s: usize, rng: &mut Rng) -> Gray {
    // Drops per pixel, longest streak, streak brightness, darkening, blur mix.
    let (density, max_len, bright, dim, blur) = [
        (0.006, 6.0, 0.7, 0.95, 0.0),
        (0.010, 7.0, 0.75, 0.9, 0.1),
        (0.015, 8.0, 0.8, 0.85, 0.2),
        (0.022, 9.0, 0.85, 0.8, 0.3),
        (0.030, 10.0, 0.9, 0.75, 0.4),
    ][s];
    let blurred = convolve(img, &Kernel::disk(1.0));
    let mut out = img.with_pixels(
        img.pixels
            .iter()
            .zip(&blurred.pixels)
            .map(|(&v, &b)| dim * (v + blur * (b - v)))
            .collect(),
    );
    // One slant for all drops, up to 20 degrees off vertical.
    let slant = ((rng.uniform() * 2.0 - 1.0) * 20.0f32).to_radians();
    let (dx, dy) = (slant.sin(), slant.cos());
    let (w, h) = (img.width as f32, img.height as f32);
    // Drops start above and beside the image too, so that streaks can enter at
    // the edges; the count covers that whole area.
    let drops = (density * (w + 2.0 * max_len) * (h + max_len)).round() as usize;
    for _ in 0..drops {
        let len = 3.0 + rng.uniform() * (max_len - 3.0);
        let x0 = rng.uniform() * (w + 2.0 * max_len) - max_len;
        let y0 = rng.uniform() * (h + max_len) - max_len;
        let steps = (len * 2.0) as usize;
        for k in 0..=steps {
            let t = k as f32 * 0.5;
            let (x, y) = ((x0 + t * dx).round(), (y0 + t * dy).round());
            if x >= 0.0 && y >= 0.0 && x < w && y < h {
                let v = &mut out.pixels[y as usize * img.width + x as usize];
                *v = v.max(bright);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Noise, blur, digital.

/// The `u`-quantile of a Poisson distribution with mean `lambda` (at most a
/// few hundred here), found by walking its cumulative distribution.
fn poisson_quantile(lambda: f32, u: f32) -> f32 {
    let mut p = (-f64::from(lambda)).exp();
    let mut cdf = p;
    let mut k = 0u32;
    while cdf < f64::from(u) && p > 0.0 {
        k += 1;
        p *= f64::from(lambda) / f64::from(k);
        cdf += p;
    }
    k as f32
}

/// A square convolution kernel of side `2 * radius + 1`, weights summing to 1.
struct Kernel {
    radius: usize,
    weights: Vec<f32>,
}

impl Kernel {
    fn normalized(radius: usize, mut weights: Vec<f32>) -> Kernel {
        let sum: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= sum);
        Kernel { radius, weights }
    }

    /// A filled disk of pixels within `radius` of the centre.
    fn disk(radius: f32) -> Kernel {
        let r = radius.floor() as usize;
        let side = 2 * r + 1;
        let weights = (0..side * side)
            .map(|i| {
                let (x, y) = ((i % side) as f32 - r as f32, (i / side) as f32 - r as f32);
                if x * x + y * y <= radius * radius {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Kernel::normalized(r, weights)
    }

    /// A centred line segment `length` pixels long at `angle` radians from the x
    /// axis, drawn by splatting points along it bilinearly.
    fn line(length: f32, angle: f32) -> Kernel {
        let r = (length / 2.0).ceil() as usize;
        let side = 2 * r + 1;
        let mut weights = vec![0.0f32; side * side];
        let samples = (length * 4.0).ceil().max(1.0) as usize;
        for k in 0..=samples {
            let t = (k as f32 / samples as f32 - 0.5) * length;
            let (x, y) = (r as f32 + t * angle.cos(), r as f32 + t * angle.sin());
            let (x0, y0) = (x.floor(), y.floor());
            let (fx, fy) = (x - x0, y - y0);
            for (cx, cy, w) in [
                (x0, y0, (1.0 - fx) * (1.0 - fy)),
                (x0 + 1.0, y0, fx * (1.0 - fy)),
                (x0, y0 + 1.0, (1.0 - fx) * fy),
                (x0 + 1.0, y0 + 1.0, fx * fy),
            ] {
                if cx >= 0.0 && cy >= 0.0 && (cx as usize) < side && (cy as usize) < side {
                    weights[cy as usize * side + cx as usize] += w;
                }
            }
        }
        Kernel::normalized(r, weights)
    }
}

/// 2-D convolution (correlation; every kernel here is point-symmetric) with
/// the border clamped.
fn convolve(img: &Gray, kernel: &Kernel) -> Gray {
    let r = kernel.radius as isize;
    let side = 2 * kernel.radius + 1;
    let mut out = Vec::with_capacity(img.pixels.len());
    for y in 0..img.height as isize {
        for x in 0..img.width as isize {
            let mut acc = 0.0;
            for (i, &w) in kernel.weights.iter().enumerate() {
                if w != 0.0 {
                    let kx = (i % side) as isize - r;
                    let ky = (i / side) as isize - r;
                    acc += w * img.clamped(x + kx, y + ky);
                }
            }
            out.push(acc);
        }
    }
    img.with_pixels(out)
}

/// Replaces tiles about `block` pixels wide by their means: a box-filtered
/// downsample by `block`, upsampled nearest. Tile edges are rounded to whole
/// pixels, and the grid is centred so that partial tiles fall on both edges.
fn pixelate(img: &Gray, block: f32) -> Gray {
    // Tile boundaries along one axis of length `n`.
    let tiles = |n: usize| {
        let count = (n as f32 / block).ceil() as usize;
        let start = (count as f32 * block - n as f32) / 2.0;
        (0..=count)
            .map(|k| ((k as f32 * block - start).round().max(0.0) as usize).min(n))
            .collect::<Vec<_>>()
    };
    let (cols, rows) = (tiles(img.width), tiles(img.height));
    let mut out = img.clone();
    for ys in rows.windows(2).map(|r| r[0]..r[1]) {
        for xs in cols.windows(2).map(|c| c[0]..c[1]) {
            let index = |y: usize, x: usize| y * img.width + x;
            let mut sum = 0.0;
            for y in ys.clone() {
                sum += xs.clone().map(|x| img.pixels[index(y, x)]).sum::<f32>();
            }
            let mean = sum / (ys.len() * xs.len()).max(1) as f32;
            for y in ys.clone() {
                xs.clone().for_each(|x| out.pixels[index(y, x)] = mean);
            }
        }
    }
    out
}

/// Nearest-neighbour resampling to `width`×`height`.
fn nearest_resize(img: &Gray, width: usize, height: usize) -> Gray {
    let mut pixels = Vec::with_capacity(width * height);
    for y in 0..height {
        let sy = y * img.height / height;
        for x in 0..width {
            pixels.push(img.pixels[sy * img.width + x * img.width / width]);
        }
    }
    Gray {
        width,
        height,
        pixels,
    }
}

/// Encodes as a baseline JPEG at `quality` and decodes it back.
fn jpeg_roundtrip(img: &Gray, quality: u8) -> Option<Gray> {
    let bytes: Vec<u8> = img.pixels.iter().map(|&v| to_u8(v)).collect();
    let mut buf = Vec::new();
    JpegEncoder::new_with_quality(&mut buf, quality)
        .encode(
            &bytes,
            u32::try_from(img.width).ok()?,
            u32::try_from(img.height).ok()?,
            ExtendedColorType::L8,
        )
        .ok()?;
    let decoded = image::load_from_memory_with_format(&buf, ImageFormat::Jpeg).ok()?;
    Some(Gray::from_luma(&decoded.to_luma8()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gray image laid on all three channels alike.
    fn gray_rgb(g: &Gray) -> Rgb {
        Rgb {
            width: g.width,
            height: g.height,
            planes: g.pixels.repeat(3),
        }
    }

    #[test]
    fn rgb_spatial_kinds_lay_one_pattern_on_every_channel() {
        let img = gray_rgb(&seven());
        for kind in [Corruption::Fog, Corruption::Snow, Corruption::MotionBlur] {
            let out = kind.apply_rgb(&img, 4, 9);
            let plane = img.width * img.height;
            let (r, g) = (&out.planes[..plane], &out.planes[plane..2 * plane]);
            assert_eq!(r, g, "{kind}: channels differ");
            assert_eq!(
                r,
                kind.apply(&seven(), 4, 9).pixels,
                "{kind}: not the gray result"
            );
        }
    }

    #[test]
    fn rgb_noise_is_drawn_per_channel_and_contrast_uses_the_mean_of_all() {
        let img = gray_rgb(&seven());
        let plane = img.width * img.height;
        let noisy = Corruption::GaussianNoise.apply_rgb(&img, 3, 9);
        assert_ne!(noisy.planes[..plane], noisy.planes[plane..2 * plane]);
        let mut tinted = img.clone();
        tinted.planes[..plane].iter_mut().for_each(|v| *v = 1.0);
        let low = Corruption::Contrast.apply_rgb(&tinted, 5, 0);
        let mean = tinted.planes.iter().sum::<f32>() / tinted.planes.len() as f32;
        let want = (1.0 - mean) * 0.1 + mean;
        assert!(
            (low.planes[0] - want).abs() < 1e-6,
            "{} vs {want}",
            low.planes[0]
        );
        assert_eq!(Rgb::from_rgb8(&low.to_rgb8()).width, img.width);
    }

    /// A "7" with anti-aliased strokes about 3.5 pixels wide, like an MNIST digit.
    fn seven() -> Gray {
        fn dist(p: (f32, f32), a: (f32, f32), b: (f32, f32)) -> f32 {
            let (abx, aby) = (b.0 - a.0, b.1 - a.1);
            let t =
                (((p.0 - a.0) * abx + (p.1 - a.1) * aby) / (abx * abx + aby * aby)).clamp(0.0, 1.0);
            ((p.0 - a.0 - t * abx).powi(2) + (p.1 - a.1 - t * aby).powi(2)).sqrt()
        }
        let strokes = [((7.0, 7.0), (20.0, 7.0)), ((20.0, 7.0), (12.0, 22.0))];
        let pixels = (0..28 * 28)
            .map(|i| {
                let p = ((i % 28) as f32, (i / 28) as f32);
                let d = strokes
                    .iter()
                    .map(|&(a, b)| dist(p, a, b))
                    .fold(f32::INFINITY, f32::min);
                (2.0 - d).clamp(0.0, 1.0)
            })
            .collect();
        Gray {
            width: 28,
            height: 28,
            pixels,
        }
    }

    fn mean_abs_diff(a: &Gray, b: &Gray) -> f32 {
        let sum: f32 = a
            .pixels
            .iter()
            .zip(&b.pixels)
            .map(|(x, y)| (x - y).abs())
            .sum();
        sum / a.pixels.len() as f32
    }

    fn is_random(kind: Corruption) -> bool {
        use Corruption::*;
        matches!(
            kind,
            Fog | Snow | Rain | GaussianNoise | ShotNoise | ImpulseNoise | MotionBlur
        )
    }

    #[test]
    fn every_kind_keeps_size_and_range() {
        let digit = seven();
        let tiny = Gray {
            width: 1,
            height: 1,
            pixels: vec![0.7],
        };
        let wide = Gray {
            width: 37,
            height: 5,
            pixels: (0..185).map(|i| (i % 7) as f32 / 6.0).collect(),
        };
        for img in [&digit, &tiny, &wide] {
            for kind in Corruption::ALL {
                for severity in 0..=6 {
                    let out = kind.apply(img, severity, 3);
                    assert_eq!((out.width, out.height), (img.width, img.height), "{kind}");
                    assert_eq!(out.pixels.len(), img.pixels.len(), "{kind}");
                    assert!(
                        out.pixels.iter().all(|v| (0.0..=1.0).contains(v)),
                        "{kind} at {severity} leaves [0, 1] or is NaN"
                    );
                }
            }
        }
    }

    #[test]
    fn deterministic_per_seed() {
        let digit = seven();
        for kind in Corruption::ALL {
            for severity in 1..=5 {
                let a = kind.apply(&digit, severity, 11);
                assert_eq!(a, kind.apply(&digit, severity, 11), "{kind} at {severity}");
                if is_random(kind) {
                    assert_ne!(a, kind.apply(&digit, severity, 12), "{kind} at {severity}");
                }
            }
        }
    }

    #[test]
    fn damage_grows_with_severity() {
        let digit = seven();
        for kind in Corruption::ALL {
            let diffs: Vec<f32> = (1..=5)
                .map(|s| mean_abs_diff(&digit, &kind.apply(&digit, s, 5)))
                .collect();
            // JPEG's quantization is not strictly monotone in quality.
            let slack = if kind == Corruption::Jpeg { 0.003 } else { 0.0 };
            assert!(
                diffs.windows(2).all(|w| w[1] + slack >= w[0]),
                "{kind}: {diffs:?}"
            );
            assert!(diffs[4] > 0.02, "{kind}: {diffs:?}");
        }
    }

    #[test]
    fn poisson_quantile_has_poisson_moments() {
        let mut rng = Rng::new(1);
        let samples: Vec<f32> = (0..50_000)
            .map(|_| poisson_quantile(7.5, rng.uniform()))
            .collect();
        let mean = samples.iter().sum::<f32>() / samples.len() as f32;
        let var = samples.iter().map(|k| (k - mean).powi(2)).sum::<f32>() / samples.len() as f32;
        assert!(
            (mean - 7.5).abs() < 0.1 && (var - 7.5).abs() < 0.3,
            "{mean} {var}"
        );
    }

    #[test]
    fn names_round_trip() {
        for kind in Corruption::ALL {
            assert_eq!(kind.name().parse::<Corruption>().unwrap(), kind);
            assert_eq!(
                kind.to_string()
                    .replace('_', "-")
                    .parse::<Corruption>()
                    .unwrap(),
                kind
            );
        }
        let err = "haze".parse::<Corruption>().unwrap_err().to_string();
        assert!(
            err.contains("gaussian_noise") && err.contains("jpeg"),
            "{err}"
        );
        let weather: Vec<_> = Corruption::ALL
            .into_iter()
            .filter(|c| c.is_weather())
            .collect();
        assert_eq!(weather.len(), 5);
        assert!(parse_severity(0).is_err() && parse_severity(6).is_err());
        assert_eq!(parse_severity(3).unwrap(), 3);
    }

    #[test]
    fn luma_round_trip() {
        let digit = seven();
        let back = Gray::from_luma(&digit.to_luma());
        assert!(
            digit
                .pixels
                .iter()
                .zip(&back.pixels)
                .all(|(a, b)| (a - b).abs() <= 0.5 / 255.0 + 1e-6)
        );
    }

    #[test]
    fn corrupt_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (dir.path().join("in.png"), dir.path().join("out.png"));
        let digit = seven();
        digit.to_luma().save(&input).unwrap();
        corrupt_file(&input, &output, Corruption::Rain, 3, 9).unwrap();
        let written = Gray::from_luma(&image::open(&output).unwrap().to_luma8());
        let expected = Gray::from_luma(&digit.to_luma());
        assert_eq!(
            written.to_luma(),
            Corruption::Rain.apply(&expected, 3, 9).to_luma()
        );
        assert!(corrupt_file(&input, &output, Corruption::Rain, 0, 9).is_err());
        assert!(
            corrupt_file(
                &dir.path().join("missing.png"),
                &output,
                Corruption::Fog,
                1,
                9
            )
            .is_err()
        );
    }

    #[test]
    fn contact_sheet_layout() {
        let sheet = contact_sheet(&seven(), 2, 1);
        assert_eq!(sheet.width(), 6 * (56 + 2) + 2);
        assert_eq!(sheet.height(), 12 * (56 + 2) + 2);
        assert_eq!(sheet.get_pixel(0, 0).0, [128]);
    }

    /// Writes the contact sheet of the test digit for a visual check:
    /// `cargo test --lib corrupt::tests::render -- --ignored`.
    #[test]
    #[ignore]
    fn render_contact_sheet() {
        let path = std::env::temp_dir().join("contact.png");
        contact_sheet(&seven(), 4, 1).save(&path).unwrap();
        for kind in Corruption::ALL {
            let diffs: Vec<String> = (1..=5)
                .map(|s| {
                    format!(
                        "{:.3}",
                        mean_abs_diff(&seven(), &kind.apply(&seven(), s, 1))
                    )
                })
                .collect();
            println!("{kind:>15}: {}", diffs.join(" "));
        }
        println!("wrote {}", path.display());
    }
}
