//! Compute devices of this build: what CUDA GPUs the driver reports and a smoke check that
//! each device computes a small matrix product the same way as a plain Rust loop.
//!
//! The smoke check is deliberately independent of candle on the reference side: the
//! reference is the triple loop `c[i][j] = Σ_k a[i][k] · b[k][j]` in f64.

use crate::{KernelError, Result};
use candle_core::{DType, Device, Tensor};

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0) for H100/H200.
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
    /// CUDA driver version as (major, minor), e.g. (13, 0).
    pub driver_version: (i32, i32),
}

/// Lists the CUDA devices. `Ok(vec![])` in a CPU-only build; an error when the build has CUDA
/// but the driver cannot be loaded or initialised (the message says why).
pub fn cuda_devices() -> Result<Vec<GpuInfo>> {
    #[cfg(feature = "cuda")]
    {
        cuda::devices()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(Vec::new())
    }
}

/// Bytes of GPU memory in use on `device`'s GPU (total − free, as the driver reports it: every
/// process, candle's cached blocks included, as nvidia-smi shows); `None` on the CPU.
pub fn gpu_memory_used(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = device;
    None
}

/// Marks where a program's steady state starts (`start`) or ends for a CUDA profiler
/// (`cuProfilerStart` / `cuProfilerStop` on the device's context; tools/kernel-profile then
/// counts only what runs between the two). Synchronizes the device first, so that no kernel
/// straddles the mark. A no-op on the CPU; without a profiler attached the driver ignores it.
pub fn profiler_range(device: &Device, start: bool) -> Result<()> {
    device.synchronize()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use cudarc::driver::sys;
        let stream = d.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| KernelError::Cuda(format!("profiler range: {e}")))?;
        // SAFETY: plain driver calls on the context bound to this thread just above.
        let r = unsafe {
            if start {
                sys::cuProfilerStart()
            } else {
                sys::cuProfilerStop()
            }
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(KernelError::Cuda(format!(
                "cuProfiler{}: {r:?}",
                if start { "Start" } else { "Stop" }
            )));
        }
    }
    let _ = start; // read only by the CUDA build
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::GpuInfo;
    use crate::{KernelError, Result};
    use cudarc::driver::{sys, CudaContext};

    fn err(what: &str, e: impl std::fmt::Display) -> KernelError {
        KernelError::Cuda(format!("{what}: {e}"))
    }

    pub(super) fn devices() -> Result<Vec<GpuInfo>> {
        // cudarc loads libcuda.so.1 lazily and panics if it is absent; turn that into an error
        // that names the library instead of a backtrace.
        let count = std::panic::catch_unwind(CudaContext::device_count).map_err(|_| {
            KernelError::Cuda(
                "cannot load the CUDA driver (libcuda.so.1): is an NVIDIA driver installed \
                 and on the loader path?"
                    .into(),
            )
        })?;
        let count = count.map_err(|e| err("cuInit/cuDeviceGetCount", e))?;
        let mut driver = 0i32;
        // SAFETY: cuDriverGetVersion writes one int through a valid pointer.
        let rc = unsafe { sys::cuDriverGetVersion(&mut driver) };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(err("cuDriverGetVersion", format!("{rc:?}")));
        }
        let driver_version = (driver / 1000, (driver % 1000) / 10);
        let mut out = Vec::new();
        for ordinal in 0..count.max(0) as usize {
            let ctx = CudaContext::new(ordinal).map_err(|e| err("cuCtxCreate", e))?;
            out.push(GpuInfo {
                ordinal,
                name: ctx.name().map_err(|e| err("cuDeviceGetName", e))?,
                compute_capability: ctx
                    .compute_capability()
                    .map_err(|e| err("cuDeviceGetAttribute", e))?,
                total_memory_bytes: ctx.total_mem().map_err(|e| err("cuDeviceTotalMem", e))?,
                driver_version,
            });
        }
        Ok(out)
    }
}

/// Multiplies two small deterministic matrices on `device` (f32) and compares the product with
/// an f64 triple loop. Returns the largest absolute error.
pub fn matmul_smoke_check(device: &Device) -> Result<f32> {
    const M: usize = 33;
    const K: usize = 70;
    const N: usize = 17;
    // Deterministic values in [-1, 1), different per element, no RNG needed.
    let fill = |len: usize, salt: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    };
    let a = fill(M * K, 1);
    let b = fill(K * N, 2);
    let ta = Tensor::from_vec(a.clone(), (M, K), device)?;
    let tb = Tensor::from_vec(b.clone(), (K, N), device)?;
    let got: Vec<f32> = ta
        .matmul(&tb)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let mut max_abs_err = 0f32;
    for i in 0..M {
        for j in 0..N {
            let want: f64 = (0..K)
                .map(|k| a[i * K + k] as f64 * b[k * N + j] as f64)
                .sum();
            max_abs_err = max_abs_err.max((got[i * N + j] as f64 - want).abs() as f32);
        }
    }
    // f32 accumulation over K=70 terms of magnitude ≤ 1; TF32 on GPUs would be ~1e-2, but
    // candle keeps full f32 for matmul unless asked otherwise.
    let tolerance = 1e-4;
    if max_abs_err > tolerance || max_abs_err.is_nan() {
        return Err(KernelError::Mismatch {
            device: format!("{device:?}"),
            what: "f32 matmul 33x70 · 70x17",
            max_abs_err,
            tolerance,
        });
    }
    Ok(max_abs_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_matmul_matches_the_f64_reference() {
        let err = matmul_smoke_check(&Device::Cpu).unwrap();
        assert!(err < 1e-4, "max abs err {err}");
    }

    #[test]
    fn cpu_only_build_lists_no_gpus() {
        if !crate::BUILT_WITH_CUDA {
            assert_eq!(cuda_devices().unwrap(), Vec::new());
        }
    }

    /// Runs on a GPU machine (the test binary is built with `--features cuda` and copied there,
    /// see scripts/device-run.sh); skipped, with a message, where no GPU is visible.
    #[test]
    fn cuda_matmul_matches_the_f64_reference() {
        let gpus = match cuda_devices() {
            Ok(g) if !g.is_empty() => g,
            other => {
                eprintln!("skipped: no CUDA device ({other:?})");
                return;
            }
        };
        for gpu in gpus {
            let device = Device::new_cuda(gpu.ordinal).unwrap();
            let err = matmul_smoke_check(&device).unwrap();
            assert!(err < 1e-4, "{}: max abs err {err}", gpu.name);
        }
    }
}
