//! What the fused ops share: reading a CPU storage as f32 (every op computes in f32, whatever the
//! storage type), writing a result back in the input's dtype, and on CUDA, taking a contiguous
//! view of a storage and launching `kernels/<op>.cu` functions named `<fn>_f32` / `<fn>_bf16`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout};
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// A process-wide on/off switch for an opt-in kernel path: off unless the environment variable
/// `var` is `1`, or until [`EnvSwitch::set`].
pub(crate) struct EnvSwitch {
    var: &'static str,
    on: OnceLock<AtomicBool>,
}

impl EnvSwitch {
    pub(crate) const fn new(var: &'static str) -> Self {
        Self {
            var,
            on: OnceLock::new(),
        }
    }

    fn flag(&self) -> &AtomicBool {
        self.on
            .get_or_init(|| AtomicBool::new(std::env::var(self.var).is_ok_and(|v| v == "1")))
    }

    pub(crate) fn get(&self) -> bool {
        self.flag().load(Ordering::Relaxed)
    }

    pub(crate) fn set(&self, on: bool) {
        self.flag().store(on, Ordering::Relaxed)
    }
}

/// A kernel launch's geometry, computed by a plain function next to each op so that the CUDA
/// launch and the emulated launch of the tests (finetune-kernel-emu: the same kernel source
/// run on the CPU) use the same numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct LaunchShape {
    pub(crate) grid: (u32, u32, u32),
    pub(crate) block: (u32, u32, u32),
    pub(crate) shared_mem_bytes: u32,
}

impl LaunchShape {
    /// The geometry of a grid-stride kernel over `n` elements: cudarc's
    /// `LaunchConfig::for_num_elems` (blocks of 1,024 threads, ⌈n / 1,024⌉ of them, no shared
    /// memory) for n capped at 2³⁰, beyond which the kernel's loop covers the rest.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn for_num_elems(n: usize) -> Self {
        const THREADS: u32 = 1024;
        LaunchShape {
            grid: ((n.min(1 << 30) as u32).div_ceil(THREADS), 1, 1),
            block: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

#[cfg(feature = "cuda")]
impl From<LaunchShape> for candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    fn from(s: LaunchShape) -> Self {
        Self {
            grid_dim: s.grid,
            block_dim: s.block,
            shared_mem_bytes: s.shared_mem_bytes,
        }
    }
}

#[cfg(test)]
impl From<LaunchShape> for finetune_kernel_emu::Geometry {
    fn from(s: LaunchShape) -> Self {
        Self {
            grid: s.grid,
            block: s.block,
            shared_mem_bytes: s.shared_mem_bytes,
        }
    }
}

/// Blocks of `threads` for a grid-stride loop over `n` items (capped: the loop covers
/// the rest).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn stride_grid(n: usize, threads: u32) -> u32 {
    (n.div_ceil(threads as usize)).clamp(1, 65_535 * 8) as u32
}

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

/// dst (m × n, row stride `dst.1`; added to when `dst.2`, else overwritten) += beta · lhs ·
/// rhs, lhs m × k and rhs k × n given as (values, row stride, column stride): one GEMM of the
/// `gemm` crate (candle's CPU matmul) on `threads` rayon threads (1: on the calling thread,
/// for callers that are already rayon tasks), reading and writing the slices in place.
pub(crate) fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: (&mut [f32], usize, bool),
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
    threads: usize,
) {
    let (dst, dst_rs, accumulate) = dst;
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    // The GEMM reads and writes through raw pointers: every index it can touch is in bounds.
    assert!(last(m, n, dst_rs, 1) < dst.len(), "gemm: dst too short");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        last(m, k, lhs.1, lhs.2) < lhs.0.len(),
        "gemm: lhs too short"
    );
    assert!(
        last(k, n, rhs.1, rhs.2) < rhs.0.len(),
        "gemm: rhs too short"
    );
    // SAFETY: the asserts above bound every element the GEMM addresses; dst is borrowed
    // mutably and lhs/rhs shared, so they do not alias.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

/// Runs `$body` compiled for AVX2+FMA when the CPU has them (the vectorised exp and
/// reductions become 8-wide), else for the baseline target. Both compile the same f32
/// operations (no fused multiply-add is written), so they give the same results.
macro_rules! simd {
    (fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident) => {
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features the function is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd;

/// max of `x` (−∞ when empty), with 16 partial maxima so that it vectorises.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for k in 0..16 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// x ← exp(x − sub) elementwise; returns Σ x (16 partial sums, so that it vectorises).
#[inline(always)]
pub(crate) fn exp_sub_sum(x: &mut [f32], sub: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        for k in 0..16 {
            c[k] = exp_poly(c[k] - sub);
            acc[k] += c[k];
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_poly(*v - sub);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

/// e^x in f32 without a libm call, branch-free so that loops over it vectorise: x = n·ln 2 + r
/// with n = round(x / ln 2) (Cody–Waite split of ln 2), e^r by Cephes' expf polynomial on
/// |r| ≤ ln 2 / 2, times 2ⁿ built in the exponent bits. Relative error about 2·10⁻⁷ (tested
/// against f64 exp); 0 below −87 (near f32's smallest normal), inputs clamped at 88; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001e-1, which is 0.5 in f32
    let er = p * r * r + r + 1.0;
    let bits = (t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23;
    let y = er * f32::from_bits(bits as u32);
    if x < -87.0 {
        0.0
    } else {
        y
    }
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
}

#[cfg(test)]
mod simd_tests {
    use super::*;

    /// Off when its variable is not `1` (here: not set), then whatever `set` says.
    #[test]
    fn an_env_switch_is_off_without_its_variable_and_follows_set() {
        static SWITCH: EnvSwitch = EnvSwitch::new("FINETUNE_TEST_SWITCH_NEVER_SET");
        assert!(!SWITCH.get());
        SWITCH.set(true);
        assert!(SWITCH.get());
        SWITCH.set(false);
        assert!(!SWITCH.get());
    }

    #[test]
    fn polynomial_exp_is_within_a_few_ulp_of_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + i as f32 * (87.0 + 88.0) / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_poly(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4e-7, "max relative error {worst}");
        assert_eq!(exp_poly(0.0), 1.0);
        assert_eq!(exp_poly(-100.0), 0.0);
        assert_eq!(exp_poly(f32::NEG_INFINITY), 0.0);
    }

    simd!(fn exp_sub_sum_dispatched(x: &mut [f32], sub: f32) -> f32 = exp_sub_sum);
    simd!(fn max_dispatched(x: &[f32]) -> f32 = max);

    #[test]
    fn vectorised_row_helpers_agree_with_the_scalar_formulas() {
        for n in [0, 1, 15, 16, 37, 100] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 7919) % 23) as f32 * -0.37).collect();
            let want: Vec<f32> = row.iter().map(|&x| exp_poly(x - 0.5)).collect();
            let want_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want_sum: f64 = want.iter().map(|&x| x as f64).sum();
            for dispatched in [false, true] {
                let mut got = row.clone();
                let (sum, m) = if dispatched {
                    (exp_sub_sum_dispatched(&mut got, 0.5), max_dispatched(&row))
                } else {
                    (exp_sub_sum(&mut got, 0.5), max(&row))
                };
                assert_eq!(got, want, "n {n}");
                assert_eq!(m, want_max, "n {n}");
                assert!(
                    (sum as f64 - want_sum).abs() < 1e-5 * want_sum.max(1.0),
                    "n {n}"
                );
            }
        }
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

    /// A tensor's values widened to f32 (exact from bf16), as bits: for bit-for-bit
    /// comparisons that also tell NaN payloads and signed zeros apart.
    pub(crate) fn f32_bits(t: &Tensor) -> Vec<u32> {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// `values` rounded to bf16, as the bit patterns an emulated kernel reads (`__nv_bfloat16`).
    pub(crate) fn bf16_bits(values: &[f32]) -> Vec<u16> {
        values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect()
    }

    /// The first index where bf16 `got` (bit patterns) is not the round-to-nearest-even of
    /// some value within `tol`·max(1, |want|) of the f32 `want`, with both values; NaN matches
    /// only NaN. For a kernel that computes `want` in f32 up to `tol` (another summation order)
    /// and rounds it once: rounding is monotonic, so its result lies between the roundings of
    /// want − δ and want + δ (one bf16 ulp apart at most where `want` is near a rounding
    /// boundary, equal elsewhere).
    pub(crate) fn bf16_outside(got: &[u16], want: &[f32], tol: f32) -> Option<(usize, f32, f32)> {
        assert_eq!(got.len(), want.len(), "lengths differ");
        let round = |v: f32| half::bf16::from_f32(v).to_f32();
        got.iter()
            .zip(want)
            .position(|(&g, &w)| {
                let g = half::bf16::from_bits(g).to_f32();
                if g.is_nan() || w.is_nan() {
                    return !(g.is_nan() && w.is_nan());
                }
                let delta = tol * w.abs().max(1.0);
                !(round(w - delta) <= g && g <= round(w + delta))
            })
            .map(|i| (i, half::bf16::from_bits(got[i]).to_f32(), want[i]))
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

#[cfg(all(test, feature = "cuda"))]
mod launch_shape_tests {
    use super::LaunchShape;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    /// [`LaunchShape::for_num_elems`] is cudarc's geometry (no GPU needed: plain arithmetic).
    #[test]
    fn for_num_elems_equals_cudarc() {
        for n in [1usize, 1023, 1024, 1025, 33_800, 1 << 30] {
            let want = LaunchConfig::for_num_elems(n as u32);
            let got = LaunchConfig::from(LaunchShape::for_num_elems(n));
            assert_eq!(
                (got.grid_dim, got.block_dim, got.shared_mem_bytes),
                (want.grid_dim, want.block_dim, want.shared_mem_bytes),
                "n {n}"
            );
        }
        let capped = LaunchConfig::from(LaunchShape::for_num_elems((1 << 30) + 5));
        assert_eq!(capped.grid_dim, (1 << 20, 1, 1));
    }
}
