//! Opening the device a model runs on, the same way for every front end.
//!
//! candle returns an error when a GPU backend finds no device, but some driver-loading
//! failures panic instead; both become [`Error::Device`] here, with what to do about it, so
//! neither the server nor the converter crashes on a machine without a usable GPU.

use candle_core::Device;

use crate::{Error, Result};

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
    Metal,
}

/// Device 0 of `kind`; a backend this build lacks, or one that cannot start, is a clear
/// error (never a panic).
pub fn open(kind: DeviceKind) -> Result<Device> {
    // `cfg!` rather than `#[cfg]`: both paths are type-checked in every build (candle keeps
    // stub constructors when a backend is compiled out), so the GPU paths cannot rot unseen.
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda if !cfg!(feature = "cuda") => Err(Error::Device(
            "cuda: this build has no CUDA support (built without the `cuda` feature: rebuild \
             with `--features cuda`), or use the CPU"
                .into(),
        )),
        DeviceKind::Metal if !cfg!(feature = "metal") => Err(Error::Device(
            "metal: this build has no Metal support (built without the `metal` feature: \
             rebuild on macOS with `--features metal`), or use the CPU"
                .into(),
        )),
        DeviceKind::Cuda => started("cuda", || Device::new_cuda(0)),
        DeviceKind::Metal => started("metal", || Device::new_metal(0)),
    }
}

fn started(name: &str, new: impl FnOnce() -> candle_core::Result<Device>) -> Result<Device> {
    let hint = format!("{name}: no usable device; use the CPU");
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(new)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(Error::Device(format!("{hint} ({e})"))),
        Err(_) => Err(Error::Device(format!(
            "{hint} (its driver could not be loaded)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_not_compiled_in_are_refused_clearly() {
        assert!(open(DeviceKind::Cpu).unwrap().is_cpu());
        #[cfg(not(feature = "cuda"))]
        {
            let e = open(DeviceKind::Cuda).unwrap_err().to_string();
            assert!(e.contains("no CUDA support"), "{e}");
        }
        #[cfg(not(feature = "metal"))]
        {
            let e = open(DeviceKind::Metal).unwrap_err().to_string();
            assert!(e.contains("no Metal support"), "{e}");
        }
    }
}
