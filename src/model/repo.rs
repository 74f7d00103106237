//! The model repository on disk:
//!
//! ```text
//! models/<model>/model.toml
//! models/<model>/base.safetensors            (torchvision or timm tensor names)
//! models/<model>/signatures/<name>.rws.safetensors
//! ```

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::arch::Arch;
use crate::{Error, Result, bail};

/// `model.toml`: what the server needs to know beyond the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(flatten)]
    pub arch: Arch,
    /// Input height and width the image is resized to.
    pub input_size: [usize; 2],
    /// When set, the image's shorter side is first resized to this, keeping the
    /// aspect ratio, and the centre cropped to `input_size` (ImageNet's
    /// evaluation); otherwise the whole image is resized to `input_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<usize>,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Per-channel normalization, applied after scaling pixels to 0..1.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub labels: Vec<String>,
    /// The patchable stem: the first unit (conv1 of a ResNet) plus this many blocks.
    pub patchable_blocks: usize,
    #[serde(default = "default_eps")]
    pub bn_eps: f32,
    /// Marks weights that were generated rather than trained.
    #[serde(default)]
    pub synthetic: bool,
}

fn default_eps() -> f32 {
    1e-5
}

impl ModelConfig {
    /// Reads and validates a `model.toml`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|e| match e {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Parses and validates the text of a `model.toml`.
    pub fn parse(text: &str) -> Result<Self> {
        let config: ModelConfig =
            toml::from_str(text).map_err(|e| Error::InvalidArgument(e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.channels != 1 && self.channels != 3 {
            bail!(
                InvalidArgument,
                "channels must be 1 or 3, not {}",
                self.channels
            );
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            bail!(
                InvalidArgument,
                "mean and std need one value per channel ({})",
                self.channels
            );
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            bail!(InvalidArgument, "std values must be positive");
        }
        if self.input_size.contains(&0) {
            bail!(InvalidArgument, "input_size must be positive");
        }
        if self.labels.is_empty() {
            bail!(InvalidArgument, "labels must name at least one class");
        }
        if let Some(r) = self.resize
            && r < self.input_size.into_iter().max().unwrap_or(0)
        {
            bail!(
                InvalidArgument,
                "resize ({r}) must be at least the input size, which is cropped from it"
            );
        }
        let head = self.arch.head(self.channels, self.labels.len());
        if head.reduce == crate::model::arch::Reduce::Flatten {
            let units = self.arch.units(self.channels);
            let (h, w) = (units.iter()).fold(self.input_size.into(), |s, u| u.output_size(s));
            let features = units.last().map_or(0, |u| u.out_channels()) * h * w;
            if head.linears.first().map(|l| l.inputs) != Some(features) {
                bail!(
                    InvalidArgument,
                    "{} flattens its last maps into its classifier, which takes {} values; an input of {:?} gives {features}",
                    self.arch.name(),
                    head.linears.first().map_or(0, |l| l.inputs),
                    self.input_size
                );
            }
        }
        let blocks = self.arch.block_count();
        if self.patchable_blocks > blocks {
            bail!(
                InvalidArgument,
                "patchable_blocks is {} but the architecture has only {blocks} blocks",
                self.patchable_blocks
            );
        }
        Ok(())
    }
}

/// One model's directory inside the repository.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub name: String,
    pub dir: PathBuf,
    pub config: ModelConfig,
}

pub const SIGNATURE_SUFFIX: &str = ".rws.safetensors";

impl ModelDir {
    /// Opens `repo/<name>`; with no name, the repository must hold exactly one model.
    pub fn open(repo: &Path, name: Option<&str>) -> Result<Self> {
        let name = match name {
            Some(n) => n.to_string(),
            None => {
                let mut found = list_models(repo)?;
                match found.len() {
                    1 => found.remove(0),
                    0 => bail!(
                        NotFound,
                        "no model in {} (expected <model>/model.toml)",
                        repo.display()
                    ),
                    _ => bail!(
                        InvalidArgument,
                        "{} holds several models ({}); choose one with --model",
                        repo.display(),
                        found.join(", ")
                    ),
                }
            }
        };
        let dir = repo.join(&name);
        let config = ModelConfig::load(&dir.join("model.toml"))?;
        Ok(ModelDir { name, dir, config })
    }

    pub fn base_path(&self) -> PathBuf {
        self.dir.join("base.safetensors")
    }

    /// The corruption detector behind the `auto` profile; optional.
    pub fn detector_path(&self) -> PathBuf {
        self.dir.join("detector.safetensors")
    }

    /// Signature files shipped in `signatures/`, sorted by name.
    pub fn signature_files(&self) -> Result<Vec<PathBuf>> {
        let dir = self.dir.join("signatures");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(SIGNATURE_SUFFIX))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Resolves a path given by a client. Only relative paths that stay inside the
    /// model directory are accepted, so a client cannot make the server read
    /// arbitrary files; symlinks are resolved before the check.
    pub fn confine(&self, rel: &str) -> Result<PathBuf> {
        let p = Path::new(rel);
        let quoted = crate::error::clip(rel);
        if rel.is_empty()
            || p.is_absolute()
            || p.components().any(|c| !matches!(c, Component::Normal(_)))
        {
            bail!(
                InvalidArgument,
                "signature path {quoted} must be relative to the model directory, without '..' (e.g. signatures/fog.rws.safetensors)"
            );
        }
        let joined = self.dir.join(p);
        let real = joined.canonicalize().map_err(|_| {
            Error::NotFound(format!(
                "no signature file at {quoted} in model {}",
                self.name
            ))
        })?;
        let root = self
            .dir
            .canonicalize()
            .map_err(|e| Error::io(&self.dir, e))?;
        if !real.starts_with(&root) {
            bail!(
                InvalidArgument,
                "signature path {quoted} leads outside the model directory"
            );
        }
        Ok(real)
    }
}

/// Names of the model directories in a repository.
pub fn list_models(repo: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(repo)
        .map_err(|e| Error::io(repo, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model.toml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// `fog.rws.safetensors` -> `fog`.
pub fn signature_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.strip_suffix(SIGNATURE_SUFFIX)
        .unwrap_or(&file)
        .to_string()
}
