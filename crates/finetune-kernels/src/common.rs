//! What the fused ops share: reading a CPU storage as f32 (every op computes in f32, whatever the
//! storage type), writing a result back in the input's dtype, and on CUDA, taking a contiguous
//! view of a storage and launching `kernels/<op>.cu` functions named `<fn>_f32` / `<fn>_bf16`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout};
use std::borrow::Cow;

/// The contiguous f32 values of `s` under `l` (borrowed for f32, converted for bf16).
pub(crate) fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<Cow<'a, [f32]>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(Cow::Borrowed(&v[a..b])),
        CpuStorage::BF16(v) => Ok(Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect())),
        other => candle_core::bail!("{op}: {what} is {:?}, expected f32 or bf16", other.dtype()),
    }
}

/// `values` as a storage of `dtype` (f32, or bf16 rounded once).
pub(crate) fn cpu_out(values: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
        _ => CpuStorage::F32(values),
    }
}

/// Fails unless `dtype` is f32 or bf16 (the storage types the kernels are built for).
pub(crate) fn float_dtype(dtype: DType, op: &str, what: &str) -> candle_core::Result<()> {
    if matches!(dtype, DType::F32 | DType::BF16) {
        Ok(())
    } else {
        candle_core::bail!("{op}: {what} is {dtype:?}, expected f32 or bf16")
    }
}

/// Fails unless every dtype equals the first one.
pub(crate) fn same_dtype(op: &str, dtypes: &[(&str, DType)]) -> candle_core::Result<()> {
    if let Some((_, first)) = dtypes.first() {
        if let Some((name, other)) = dtypes.iter().find(|(_, d)| d != first) {
            candle_core::bail!(
                "{op}: {name} is {other:?}, {} is {first:?} (they must match)",
                dtypes[0].0
            );
        }
    }
    Ok(())
}

/// Rows of at least this many elements go to rayon one by one; smaller ones are grouped so that
/// each task has about this much work.
pub(crate) const PAR_GRAIN: usize = 16 * 1024;

/// Rows per rayon task for rows of `row_len` elements.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (PAR_GRAIN / row_len.max(1)).max(1)
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    //! Launch helpers shared by the CUDA forward/backward of the fused ops.
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, Layout};

    /// The contiguous view of `s` under `l`, as `T`.
    pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(
        s: &'a CudaStorage,
        l: &Layout,
        op: &str,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!("{op} (cuda): {what} is not contiguous"))
        })?;
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    /// Kernel-name suffix of a storage type.
    pub(crate) fn suffix(dtype: candle_core::DType) -> &'static str {
        if dtype == candle_core::DType::BF16 {
            "bf16"
        } else {
            "f32"
        }
    }

    /// Blocks of `threads` for a grid-stride loop over `n` items (capped: the loop covers
    /// the rest).
    pub(crate) fn grid(n: usize, threads: u32) -> u32 {
        (n.div_ceil(threads as usize)).clamp(1, 65_535 * 8) as u32
    }
}

#[cfg(test)]
pub(crate) mod test {
    //! Test helpers: deterministic data, a relative max-difference, the GPU if there is one.
    use candle_core::{Device, Tensor};

    /// Deterministic values in about [−2, 2) (a hash of the index, no RNG crate needed).
    pub(crate) fn data(n: usize, salt: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D);
                z = (z ^ (z >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 29;
                ((z % 40_000) as f32 / 10_000.0) - 2.0
            })
            .collect()
    }

    pub(crate) fn tensor(shape: &[usize], salt: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(data(n, salt), shape, &Device::Cpu).unwrap()
    }

    /// max |a − b| / max |b| over all elements (both moved to the CPU as f32).
    pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let host = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (host(a), host(b));
        assert_eq!(a.len(), b.len(), "element counts differ");
        let scale = b
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| {
            if (x - y).is_nan() {
                f32::NAN
            } else {
                m.max((x - y).abs())
            }
        });
        diff / scale
    }

    /// The first CUDA device, or `None` (with a message) where there is none.
    #[cfg(feature = "cuda")]
    pub(crate) fn gpu() -> Option<Device> {
        match crate::device::cuda_devices() {
            Ok(g) if !g.is_empty() => Some(Device::new_cuda(0).unwrap()),
            other => {
                eprintln!("skipped: no CUDA device ({other:?})");
                None
            }
        }
    }
}
