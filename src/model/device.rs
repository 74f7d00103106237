//! Which device serves: `--device auto|cpu|cuda|cuda:N`.
//!
//! `auto` is the default so one config works on GPU and CPU machines alike: it takes
//! GPU 0 when the binary has the `cuda` feature and a GPU opens, and otherwise falls
//! back to the CPU, warning when a GPU was expected (a CUDA build that finds none). An
//! explicit `cuda:N` never falls back: an operator who names a GPU wants to know that
//! it is not being used.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 if one opens, else the CPU.
    Auto,
    Cpu,
    /// CUDA device by ordinal; `cuda` alone means `cuda:0`.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "unknown device {s:?}; expected auto, cpu, cuda or cuda:N (e.g. cuda:0)"
            ))
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse().map(DeviceSpec::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Opens the device `spec` names (see [`DeviceSpec`]).
pub fn select(spec: &str) -> Result<Device> {
    open(spec.parse()?, open_cuda)
}

/// [`select`] with the CUDA opener passed in, so the fallback rules are testable on
/// machines without a GPU.
fn open(spec: DeviceSpec, cuda: impl Fn(usize) -> Result<Device, String>) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => cuda(n).map_err(|why| {
            Error::FailedPrecondition(format!(
                "cannot open cuda:{n}: {why}; pass --device cpu (or auto) to run on the CPU"
            ))
        }),
        DeviceSpec::Auto => match cuda(0) {
            Ok(d) => Ok(d),
            Err(why) => {
                if CUDA_BUILT {
                    tracing::warn!(reason = %why, "no usable GPU: falling back to the CPU");
                } else {
                    tracing::info!("built without the cuda feature: serving on the CPU");
                }
                Ok(Device::Cpu)
            }
        },
    }
}

/// Opens CUDA device `n`, or says why not in words the operator can act on.
fn open_cuda(n: usize) -> Result<Device, String> {
    if !CUDA_BUILT {
        return Err(
            "this binary was built without the cuda feature (build it with scripts/build-cuda.sh, \
             i.e. cargo build --release --features cuda)"
                .into(),
        );
    }
    Device::new_cuda(n).map_err(|e| {
        // With RUST_BACKTRACE set candle attaches a backtrace, which says nothing here.
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        format!(
            "{e} (is the NVIDIA driver loaded, does `nvidia-smi` list GPU {n}, and are the CUDA 13 \
             libraries on LD_LIBRARY_PATH?)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        for (s, want) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("CPU", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:0", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            (" cuda:2 ", DeviceSpec::Cuda(2)),
        ] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap(), want, "{s:?}");
        }
        for spec in [DeviceSpec::Auto, DeviceSpec::Cpu, DeviceSpec::Cuda(5)] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn rejects_unknown_devices_with_the_accepted_forms() {
        for s in ["", "gpu", "cuda:", "cuda:-1", "cuda:x", "metal", "cuda0"] {
            let err = s.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("auto, cpu, cuda or cuda:N"), "{s:?}: {err}");
        }
    }

    #[test]
    fn auto_falls_back_to_the_cpu_and_explicit_cuda_does_not() {
        let no_gpu = |_| Err("no CUDA-capable device is detected".to_string());
        assert!(open(DeviceSpec::Auto, no_gpu).unwrap().is_cpu());
        assert!(open(DeviceSpec::Cpu, no_gpu).unwrap().is_cpu());
        let err = open(DeviceSpec::Cuda(1), no_gpu).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("cuda:1") && msg.contains("no CUDA-capable device"),
            "{msg}"
        );
        assert!(msg.contains("--device cpu"), "{msg}");
        // A GPU that opens is taken by both auto and an explicit ordinal.
        let asked = std::cell::Cell::new(None);
        let gpu = |n| {
            asked.set(Some(n));
            Ok(Device::Cpu)
        };
        open(DeviceSpec::Cuda(2), gpu).unwrap();
        assert_eq!(asked.get(), Some(2));
        open(DeviceSpec::Auto, gpu).unwrap();
        assert_eq!(asked.get(), Some(0));
    }

    /// The real opener on this build: a CPU build names the feature to enable; on a
    /// CUDA build without a GPU (CI, this machine with the stub libcuda) auto still
    /// ends up on the CPU.
    #[test]
    fn select_on_this_build() {
        if !CUDA_BUILT {
            let err = select("cuda:0").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
            assert!(select("auto").unwrap().is_cpu());
        }
        assert!(select("cpu").unwrap().is_cpu());
        assert!(select("bogus").is_err());
    }
}
