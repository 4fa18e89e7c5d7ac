//! Which device (and which float type) the model runs on.
//!
//! candle's `Device::cuda_if_available` errors when a CUDA build finds no GPU
//! (it only asks whether CUDA was compiled in); `auto` here tries to open the
//! GPU and falls back to the CPU, so one binary serves both kinds of machine.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// The user's `--device` choice, parsed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when built with CUDA and a GPU is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("`{other}` is not a device; use auto, cpu, cuda or cuda:N")),
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

impl DeviceSpec {
    /// Opens the device this spec names.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            // A CUDA build on a machine without a GPU (or driver) runs on the CPU.
            DeviceSpec::Auto if cfg!(feature = "cuda") => Ok(open_cuda(0).unwrap_or(Device::Cpu)),
            DeviceSpec::Auto => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) if cfg!(feature = "cuda") => {
                open_cuda(n).map_err(|source| Error::Cuda { ordinal: n, source })
            }
            DeviceSpec::Cuda(_) => Err(Error::NoCuda),
        }
    }
}

/// CUDA device `n`, its memory pool set up for sac's many small allocations.
fn open_cuda(n: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(n)?;
    #[cfg(feature = "cuda")]
    crate::model::cuda::keep_freed_memory(&device)?;
    Ok(device)
}

/// The user's `--dtype` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    /// bf16 on a GPU. On the CPU, f32, with bf16 weights for inference
    /// where the CPU has AVX512-BF16 (twice f32's speed there).
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl FromStr for DTypeSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DTypeSpec::Auto),
            "f32" => Ok(DTypeSpec::F32),
            "bf16" => Ok(DTypeSpec::Bf16),
            "f16" => Ok(DTypeSpec::F16),
            other => Err(format!(
                "`{other}` is not a dtype; use auto, f32, bf16 or f16"
            )),
        }
    }
}

/// What a model is loaded for: training needs every product differentiable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Inference,
    Training,
}

/// How a model computes: the dtype of its tensors, and whether its
/// projections' weights are packed bf16 for the CPU kernel
/// (`model::cpu::bf16`) while everything else stays in `dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    pub dtype: DType,
    pub bf16_weights: bool,
}

impl DTypeSpec {
    /// The precision to compute in on `device`. bf16 on a CPU with
    /// AVX512-BF16 is bf16 weights under f32 activations for inference (as
    /// llama.cpp runs a bf16 model); elsewhere, and for training, every
    /// tensor is in bf16.
    pub fn resolve(self, device: &Device, workload: Workload) -> Precision {
        let packs = device.is_cpu()
            && workload == Workload::Inference
            && crate::model::cpu::bf16::available();
        let (dtype, bf16_weights) = match self {
            DTypeSpec::Auto | DTypeSpec::Bf16 if packs => (DType::F32, true),
            DTypeSpec::Auto if device.is_cpu() => (DType::F32, false),
            DTypeSpec::Auto | DTypeSpec::Bf16 => (DType::BF16, false),
            DTypeSpec::F32 => (DType::F32, false),
            DTypeSpec::F16 => (DType::F16, false),
        };
        Precision {
            dtype,
            bf16_weights,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("gpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn auto_takes_the_gpu_if_one_opens_else_the_cpu() {
        let gpu = cfg!(feature = "cuda") && Device::new_cuda(0).is_ok();
        assert_eq!(DeviceSpec::Auto.open().unwrap().is_cpu(), !gpu);
    }

    #[test]
    fn cuda_request_without_cuda_build_is_a_clear_error() {
        if !cfg!(feature = "cuda") {
            let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }

    #[test]
    fn auto_dtype_on_cpu_is_f32_with_bf16_weights_where_the_cpu_has_them() {
        let packs = crate::model::cpu::bf16::available();
        let cpu = |spec: DTypeSpec, workload| spec.resolve(&Device::Cpu, workload);
        for spec in [DTypeSpec::Auto, DTypeSpec::Bf16] {
            assert_eq!(
                cpu(spec, Workload::Inference),
                Precision {
                    dtype: if packs || spec == DTypeSpec::Auto {
                        DType::F32
                    } else {
                        DType::BF16
                    },
                    bf16_weights: packs,
                }
            );
        }
        let exact = Precision {
            dtype: DType::F32,
            bf16_weights: false,
        };
        assert_eq!(cpu(DTypeSpec::Auto, Workload::Training), exact);
        assert_eq!(cpu(DTypeSpec::F32, Workload::Inference), exact);
        assert_eq!(cpu(DTypeSpec::Bf16, Workload::Training).dtype, DType::BF16);
    }
}
