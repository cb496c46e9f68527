//! `moe_permute`: a MoE block's token permutation (tokens → padded per-expert groups) and its
//! inverse (group outputs → tokens, summed over each token's experts), as two gathers that are
//! each other's adjoint, so each op's backward is the other op.
//!
//! Math, for a [`Permutation`] with `rows` (the token of each of the N = E·C slots, expert after
//! expert; T for a pad slot) and `inv` (the slots of each token, in slot order):
//!   gather_rows(x)[n] = x[rows[n]] (0 for a pad slot)                         x `[T, H]` → `[N, H]`
//!   sum_rows(s)[t]    = Σ over the slots n of token t, in slot order, of s[n]  s `[N, H]` → `[T, H]`
//! and ⟨gather_rows(x), s⟩ = ⟨x, sum_rows(s)⟩, so d(gather_rows) = sum_rows and vice versa.
//!
//! Why not candle's `index_select` + `index_add`: candle's CUDA index_add along dim 0 runs one
//! thread per column and loops over all N indices in it (2,048 threads for Qwen3-Coder-30B's
//! hidden size, 32k serial iterations at seq 4096 × top-8), and index_select's backward is that
//! index_add. Here every output element is one thread (sum_rows loops over ≤ top-k slots).
//!
//! - CPU (the reference): plain loops over f32, bf16 or f16 storage. gather_rows copies rows
//!   (exact in every dtype); sum_rows adds in slot order (the order index_add adds in), in f32:
//!   in place for f32, and for bf16/f16 into an f32 row per token that is rounded once, the
//!   CUDA kernels' convention, so the CPU and GPU give the same bits.
//! - CUDA (`cuda` feature, kernels/moe_permute.cu): f32 and bf16 (bf16 sums accumulate in f32
//!   and round once).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, WithDType};
use std::sync::Arc;

/// The slots of one MoE block's padded expert groups and their inverse.
pub struct Permutation {
    /// Token of each slot (T = pad), on the device (read by the CUDA kernels).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    rows: Tensor,
    /// `[T, k]`: the slots of each token in slot order, N marking an unused entry, on the device.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    inv: Tensor,
    rows_host: Vec<u32>,
    inv_host: Vec<u32>,
    tokens: usize,
    k: usize,
}

impl Permutation {
    /// From the token of each slot (`tokens` marks a pad slot) for `tokens` tokens.
    pub fn new(rows: Vec<u32>, tokens: usize, device: &Device) -> candle_core::Result<Self> {
        let n = rows.len();
        // Counting pass, then each token's slots in slot order: O(N + T) with no per-token
        // lists (a permutation over a routing-weight table has T·E "tokens", ~524k at seq
        // 4,096 with 128 experts).
        let mut count = vec![0u32; tokens];
        for (slot, &row) in rows.iter().enumerate() {
            match row as usize {
                r if r < tokens => count[r] += 1,
                r if r == tokens => {}
                r => candle_core::bail!("moe-permute: slot {slot} names token {r} of {tokens}"),
            }
        }
        let k = count.iter().copied().max().unwrap_or(0).max(1) as usize;
        let mut inv_host = vec![n as u32; tokens * k];
        count.iter_mut().for_each(|c| *c = 0);
        for (slot, &row) in rows.iter().enumerate() {
            let r = row as usize;
            if r < tokens {
                inv_host[r * k + count[r] as usize] = slot as u32;
                count[r] += 1;
            }
        }
        Ok(Self {
            rows: Tensor::new(rows.as_slice(), device)?,
            inv: Tensor::from_vec(inv_host.clone(), (tokens, k), device)?,
            rows_host: rows,
            inv_host,
            tokens,
            k,
        })
    }

    /// Slots N.
    pub fn slots(&self) -> usize {
        self.rows_host.len()
    }
}

/// x `[T, H]` → `[N, H]`: the row of each slot's token (zeros for pad slots).
pub fn gather_rows(x: &Tensor, p: &Arc<Permutation>) -> candle_core::Result<Tensor> {
    let (t, _) = x.dims2()?;
    if t != p.tokens {
        candle_core::bail!(
            "moe-permute: {t} rows for a permutation of {} tokens",
            p.tokens
        );
    }
    x.contiguous()?.apply_op1(GatherRows(p.clone()))
}

/// s `[N, H]` → `[T, H]`: each token's slots summed in slot order.
pub fn sum_rows(s: &Tensor, p: &Arc<Permutation>) -> candle_core::Result<Tensor> {
    let (n, _) = s.dims2()?;
    if n != p.slots() {
        candle_core::bail!(
            "moe-permute: {n} rows for a permutation of {} slots",
            p.slots()
        );
    }
    s.contiguous()?.apply_op1(SumRows(p.clone()))
}

/// The routing weight of each slot, `[N, 1]`: entry `t·E + e` of `weights` `[T, E]` for the
/// slot of token t at expert e (`p` is a permutation over the T·E entries listing those of the
/// slots; T·E, past the table, for a pad slot, which reads 0). A [`gather_rows`] over the
/// flattened table, so its backward is a [`sum_rows`] (one thread per entry) rather than
/// `index_select`'s backward, candle's CUDA `index_add`, which for a one-column source runs
/// ONE thread over all N = T·k slots.
pub fn slot_weights(weights: &Tensor, p: &Arc<Permutation>) -> candle_core::Result<Tensor> {
    gather_rows(&weights.reshape((weights.elem_count(), 1))?, p)
}

struct GatherRows(Arc<Permutation>);
/// [`sum_rows`]' op (also run on a storage directly by [`crate::moe_experts`]' forward).
pub(crate) struct SumRows(pub(crate) Arc<Permutation>);

/// The contiguous values of `s` under `l` as `T`.
fn input<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input not contiguous")))?;
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

fn unsupported<R>(op: &str, s: &CpuStorage) -> candle_core::Result<R> {
    candle_core::bail!("{op}: input is {:?}, expected f32, bf16 or f16", s.dtype())
}

/// A 16-bit float that sums in f32 and rounds once (the CUDA kernels' convention).
trait Half: WithDType {
    fn widen(self) -> f32;
    fn round(v: f32) -> Self;
}

impl Half for half::bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn round(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl Half for half::f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn round(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

impl Permutation {
    /// `[N, h]`: the row of each slot's token, zeros for pad slots (a copy: exact in any dtype).
    fn gather_cpu<T: WithDType>(&self, x: &[T], h: usize) -> Vec<T> {
        let mut out = vec![T::zero(); self.slots() * h];
        for (slot, &row) in self.rows_host.iter().enumerate() {
            if (row as usize) < self.tokens {
                let r = row as usize;
                out[slot * h..(slot + 1) * h].copy_from_slice(&x[r * h..(r + 1) * h]);
            }
        }
        out
    }

    /// The slots of token `t` that hold a row, in slot order.
    fn slots_of(&self, t: usize) -> impl Iterator<Item = usize> + '_ {
        let n = self.slots();
        self.inv_host[t * self.k..(t + 1) * self.k]
            .iter()
            .map(|&s| s as usize)
            .filter(move |&s| s < n)
    }

    /// `[T, h]` f32: each token's slots summed in slot order, in place in the output.
    fn sum_cpu_f32(&self, src: &[f32], h: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.tokens * h];
        for t in 0..self.tokens {
            let acc = &mut out[t * h..(t + 1) * h];
            for slot in self.slots_of(t) {
                let row = &src[slot * h..(slot + 1) * h];
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
        }
        out
    }

    /// `[T, h]` of a 16-bit float: the same sums in f32 (from 0, in slot order), rounded once.
    fn sum_cpu_half<T: Half>(&self, src: &[T], h: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(self.tokens * h);
        let mut acc = vec![0f32; h];
        for t in 0..self.tokens {
            acc.fill(0.0);
            for slot in self.slots_of(t) {
                let row = &src[slot * h..(slot + 1) * h];
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v.widen());
            }
            out.extend(acc.iter().map(|&a| T::round(a)));
        }
        out
    }
}

impl CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "moe-gather-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, p, op) = (l.dims()[1], &self.0, self.name());
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(p.gather_cpu(input::<f32>(s, l, op)?, h)),
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(p.gather_cpu(input::<half::bf16>(s, l, op)?, h))
            }
            CpuStorage::F16(_) => CpuStorage::F16(p.gather_cpu(input::<half::f16>(s, l, op)?, h)),
            other => return unsupported(op, other),
        };
        Ok((out, Shape::from((p.slots(), h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let h = l.dims()[1];
        let p = &self.0;
        let dims = [p.slots() as u32, h as u32, p.tokens as u32];
        let out = cuda::launch(s, l, &p.rows, "gather_rows", p.slots() * h, &dims)?;
        Ok((out, Shape::from((p.slots(), h))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(sum_rows(g, &self.0)?))
    }
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "moe-sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, p, op) = (l.dims()[1], &self.0, self.name());
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(p.sum_cpu_f32(input::<f32>(s, l, op)?, h)),
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(p.sum_cpu_half(input::<half::bf16>(s, l, op)?, h))
            }
            CpuStorage::F16(_) => CpuStorage::F16(p.sum_cpu_half(input::<half::f16>(s, l, op)?, h)),
            other => return unsupported(op, other),
        };
        Ok((out, Shape::from((p.tokens, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let h = l.dims()[1];
        let p = &self.0;
        let dims = [p.tokens as u32, p.k as u32, h as u32, p.slots() as u32];
        let out = cuda::launch(s, l, &p.inv, "sum_rows", p.tokens * h, &dims)?;
        Ok((out, Shape::from((p.tokens, h))))
    }

    fn bwd(&self, _s: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(gather_rows(g, &self.0)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::common::LaunchShape;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Storage, Tensor};

    /// Launches `<kernel>_<f32|bf16>` of kernels/moe_permute.cu over `len` output elements:
    /// arguments (input, index tensor, fresh output, then `dims`).
    pub(super) fn launch(
        s: &CudaStorage,
        l: &Layout,
        idx: &Tensor,
        kernel: &str,
        len: usize,
        dims: &[u32],
    ) -> candle_core::Result<CudaStorage> {
        match s.dtype() {
            DType::F32 => typed::<f32>(s, l, idx, &format!("{kernel}_f32"), len, dims),
            DType::BF16 => typed::<half::bf16>(s, l, idx, &format!("{kernel}_bf16"), len, dims),
            other => candle_core::bail!("moe-permute (cuda): {other:?} (expected f32 or bf16)"),
        }
    }

    fn typed<
        T: CudaDType + DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    >(
        s: &CudaStorage,
        l: &Layout,
        idx: &Tensor,
        name: &str,
        len: usize,
        dims: &[u32],
    ) -> candle_core::Result<CudaStorage> {
        let dev = s.device.clone();
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("moe-permute: input not contiguous".into()))?;
        let input = s.as_cuda_slice::<T>()?.slice(a..b);
        let (idx_storage, idx_layout) = idx.storage_and_layout();
        let Storage::Cuda(idx_cuda) = &*idx_storage else {
            candle_core::bail!("moe-permute: index not on the GPU");
        };
        let start = idx_layout.start_offset();
        let index = idx_cuda
            .as_cuda_slice::<u32>()?
            .slice(start..start + idx.elem_count());
        let out = dev.alloc_zeros::<T>(len)?;
        let func = dev.get_or_load_custom_func(name, "moe_permute", crate::ptx::MOE_PERMUTE)?;
        let mut builder = func.builder();
        builder.arg(&input).arg(&index).arg(&out);
        for d in dims {
            builder.arg(d);
        }
        if len > 0 {
            let cfg = LaunchConfig::from(LaunchShape::for_num_elems(len));
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::LaunchShape;
    use candle_core::{DType, Var};

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    /// 5 tokens, 3 experts with room for 3 each (slots 0-2, 3-5, 6-8), top-2 routing; token 5 = pad.
    fn permutation(device: &Device) -> Arc<Permutation> {
        let rows = vec![0, 2, 4, 1, 2, 3, 0, 1, 5];
        Arc::new(Permutation::new(rows, 5, device).unwrap())
    }

    #[test]
    fn gather_and_sum_equal_index_select_and_index_add_with_their_gradients() {
        let dev = Device::Cpu;
        let p = permutation(&dev);
        let h = 4;
        let x = Var::from_vec(values(5 * h, 1), (5, h), &dev).unwrap();
        let g = Tensor::from_vec(values(9 * h, 2), (9, h), &dev).unwrap();
        // Reference: a zero row appended for the pad, index_select, index_add.
        let rows = Tensor::new(&[0u32, 2, 4, 1, 2, 3, 0, 1, 5], &dev).unwrap();
        let padded = Tensor::cat(
            &[
                x.as_tensor(),
                &Tensor::zeros((1, h), DType::F32, &dev).unwrap(),
            ],
            0,
        )
        .unwrap();
        let want = padded.index_select(&rows, 0).unwrap();
        let got = gather_rows(&x, &p).unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        let want_sum = Tensor::zeros((6, h), DType::F32, &dev)
            .unwrap()
            .index_add(&rows, &g, 0)
            .unwrap()
            .narrow(0, 0, 5)
            .unwrap();
        let s = Var::from_tensor(&g).unwrap();
        let got_sum = sum_rows(&s, &p).unwrap();
        assert_eq!(
            got_sum.to_vec2::<f32>().unwrap(),
            want_sum.to_vec2::<f32>().unwrap()
        );
        // Adjoint pair: d⟨gather(x), g⟩/dx = sum(g) and d⟨sum(s), x⟩/ds = gather(x).
        let dx = (gather_rows(&x, &p).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            dx.get(&x).unwrap().to_vec2::<f32>().unwrap(),
            want_sum.to_vec2::<f32>().unwrap()
        );
        let ds = (sum_rows(&s, &p).unwrap() * x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            ds.get(&s).unwrap().to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
    }

    /// The permutation over a routing-weight table (one column, T·E entries, at most one slot
    /// per entry, pads naming T·E): the gather reads each slot's entry and the backward hands
    /// each entry its slot's gradient, as index_select / index_add would.
    #[test]
    fn a_weight_table_gather_equals_index_select_with_its_gradient() {
        let dev = Device::Cpu;
        let (t, e) = (6usize, 4usize);
        // Slots of experts 0..3 (tokens routed top-2), then two pads.
        let entries: Vec<u32> = vec![0, 9, 21, 6, 14, 3, 17, 10, 23, 12, 24, 24];
        let p = Arc::new(Permutation::new(entries.clone(), t * e, &dev).unwrap());
        assert_eq!(p.k, 1, "each entry has at most one slot");
        let table = Var::from_vec(values(t * e, 5), (t * e, 1), &dev).unwrap();
        let got = gather_rows(&table, &p).unwrap();
        let padded = Tensor::cat(
            &[
                table.as_tensor(),
                &Tensor::zeros((1, 1), DType::F32, &dev).unwrap(),
            ],
            0,
        )
        .unwrap();
        let idx = Tensor::new(entries.as_slice(), &dev).unwrap();
        let want = padded.index_select(&idx, 0).unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        let g = Tensor::from_vec(values(entries.len(), 6), (entries.len(), 1), &dev).unwrap();
        let grads = (got * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let want_grad = Tensor::zeros((t * e + 1, 1), DType::F32, &dev)
            .unwrap()
            .index_add(&idx, &g, 0)
            .unwrap()
            .narrow(0, 0, t * e)
            .unwrap();
        assert_eq!(
            grads.get(&table).unwrap().to_vec2::<f32>().unwrap(),
            want_grad.to_vec2::<f32>().unwrap()
        );
    }

    /// The constructor's inverse lists each token's slots in slot order, N in unused entries.
    #[test]
    fn the_inverse_lists_each_tokens_slots_in_slot_order() {
        let p = permutation(&Device::Cpu);
        assert_eq!(p.k, 2);
        assert_eq!(p.inv_host, vec![0, 6, 3, 7, 1, 4, 5, 9, 2, 9]);
    }

    /// bf16 on the CPU: the gather is exact and the sum is the f32 sum rounded once.
    #[test]
    fn bf16_on_the_cpu_gathers_exactly_and_sums_in_f32() {
        let dev = Device::Cpu;
        let p = permutation(&dev);
        let h = 3;
        let x = Tensor::from_vec(values(5 * h, 7), (5, h), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let s = Tensor::from_vec(values(9 * h, 8), (9, h), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let gathered = gather_rows(&x, &p).unwrap();
        assert_eq!(gathered.dtype(), DType::BF16);
        assert_eq!(
            f32_of(&gathered).to_vec2::<f32>().unwrap(),
            gather_rows(&f32_of(&x), &p)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        );
        let summed = sum_rows(&s, &p).unwrap();
        assert_eq!(summed.dtype(), DType::BF16);
        let want = sum_rows(&f32_of(&s), &p)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(
            f32_of(&summed).to_vec2::<f32>().unwrap(),
            f32_of(&want).to_vec2::<f32>().unwrap()
        );
    }

    /// bf16 and f16 on the CPU (the CUDA kernels' convention): gather_rows copies, so it
    /// equals the f32 gather of the upcast values exactly; sum_rows adds the upcast values in
    /// f32 in slot order, as the f32 path does, and rounds once, so it equals the f32 sum
    /// rounded once, bit for bit (same values, same order: no ulp of slack needed). The
    /// backward of each is the other op in the same dtype.
    #[test]
    fn half_precision_equals_the_f32_computation_rounded_once() {
        let dev = Device::Cpu;
        let (t, h, e, cap) = (37, 24, 6, 15);
        let rows: Vec<u32> = (0..e * cap)
            .map(|i| ((i * 37 + i / 7) % (t + 1)) as u32)
            .collect();
        let p = Arc::new(Permutation::new(rows, t, &dev).unwrap());
        for dtype in [DType::BF16, DType::F16] {
            // Inputs representable in the dtype, so f32 and the dtype see the same values.
            let x = Tensor::from_vec(values(t * h, 5), (t, h), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let s = Tensor::from_vec(values(e * cap * h, 6), (e * cap, h), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let f32_of = |v: &Tensor| v.to_dtype(DType::F32).unwrap();
            let gathered = gather_rows(&x, &p).unwrap();
            assert_eq!(gathered.dtype(), dtype);
            assert_eq!(
                f32_of(&gathered).to_vec2::<f32>().unwrap(),
                gather_rows(&f32_of(&x), &p)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
                "{dtype:?} gather_rows"
            );
            let summed = sum_rows(&s, &p).unwrap();
            assert_eq!(summed.dtype(), dtype);
            let want = sum_rows(&f32_of(&s), &p).unwrap().to_dtype(dtype).unwrap();
            assert_eq!(
                f32_of(&summed).to_vec2::<f32>().unwrap(),
                f32_of(&want).to_vec2::<f32>().unwrap(),
                "{dtype:?} sum_rows"
            );
            // Gradients: d⟨gather(x), g⟩/dx = sum(g), d⟨sum(s), y⟩/ds = gather(y), in dtype.
            let xv = Var::from_tensor(&x).unwrap();
            let grads = (gather_rows(&xv, &p).unwrap() * &s)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = grads.get(&xv).unwrap();
            assert_eq!(dx.dtype(), dtype);
            assert_eq!(
                f32_of(dx).to_vec2::<f32>().unwrap(),
                f32_of(&summed).to_vec2::<f32>().unwrap(),
                "{dtype:?} gather_rows' backward"
            );
            let sv = Var::from_tensor(&s).unwrap();
            let grads = (sum_rows(&sv, &p).unwrap() * &x)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_eq!(
                f32_of(grads.get(&sv).unwrap()).to_vec2::<f32>().unwrap(),
                f32_of(&gathered).to_vec2::<f32>().unwrap(),
                "{dtype:?} sum_rows' backward"
            );
        }
    }

    /// One token over three slots holding 1, 2⁻⁸, 2⁻⁸: rounding to bf16 after each addition
    /// would give 1 (1 + 2⁻⁸ is a tie that rounds to even, twice); the f32 sum 1 + 2⁻⁷ is a bf16
    /// value, so summing in f32 and rounding once gives it.
    #[test]
    fn bf16_sums_accumulate_in_f32() {
        let dev = Device::Cpu;
        let p = Arc::new(Permutation::new(vec![0, 0, 0], 1, &dev).unwrap());
        let tiny = 2f32.powi(-8);
        let s = Tensor::new(&[[1f32], [tiny], [tiny]], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let got = sum_rows(&s, &p)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(got, vec![vec![1.0 + 2f32.powi(-7)]]);
    }

    #[test]
    fn other_dtypes_are_refused_naming_theirs() {
        let dev = Device::Cpu;
        let p = permutation(&dev);
        let x = Tensor::zeros((5, 2), DType::F64, &dev).unwrap();
        let err = gather_rows(&x, &p).unwrap_err().to_string();
        assert!(err.contains("F64") && err.contains("bf16"), "{err}");
        let s = Tensor::zeros((9, 2), DType::U32, &dev).unwrap();
        let err = sum_rows(&s, &p).unwrap_err().to_string();
        assert!(err.contains("U32") && err.contains("moe-sum-rows"), "{err}");
    }

    #[test]
    fn a_slot_naming_a_token_past_the_pad_is_refused() {
        let err = Permutation::new(vec![0, 7], 3, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("slot 1") && err.contains("token 7 of 3"),
            "{err}"
        );
    }

    /// Runs one of kernels/moe_permute.cu's kernels on the CPU (finetune-kernel-emu) over `len`
    /// output elements, `call` passing (input, index, output) and the dims: the output, filled
    /// with `fill` (NaN) first so that an element the kernel leaves out shows.
    fn emulate<T: Copy>(
        input: &[T],
        index: &[u32],
        len: usize,
        fill: T,
        (shape, order): (LaunchShape, finetune_kernel_emu::Order),
        call: &dyn Fn(*const T, *const u32, *mut T),
    ) -> Vec<T> {
        use finetune_kernel_emu::{launch, Buffer};
        let (x, idx) = (Buffer::from_slice(input), Buffer::from_slice(index));
        let out = Buffer::filled(len, fill);
        launch(shape.into(), order, || {
            call(x.ptr(), idx.ptr(), out.mut_ptr())
        })
        .unwrap();
        out.to_vec()
    }

    /// kernels/moe_permute.cu's four kernels (gather_rows and sum_rows, f32 and bf16) run on the
    /// CPU by finetune-kernel-emu in both fiber orders, with the CUDA launch's geometry and with
    /// a 2-block grid (fewer threads than elements: the grid-stride loop runs several rounds),
    /// on the index tensors the CUDA path passes (`rows`, `inv`): bit for bit the CPU
    /// reference. No tolerance: the gather copies (a bf16 → f32 → bf16 round trip is exact),
    /// and sum_rows adds in f32 from 0 in slot order (inv's order) and rounds once, the
    /// reference's operations in its order. Permutations with pad slots, tokens in several
    /// slots, tokens in none (their sum is a zero row), k > 1 with unused inv entries, and
    /// widths of 1, 24 and 1,030 (not multiples of the 1,024-thread block).
    #[test]
    fn emulated_kernels_equal_the_cpu_reference_bit_for_bit() {
        use finetune_kernel_emu::Order;
        extern "C" {
            fn gather_rows_f32(
                x: *const f32,
                rows: *const u32,
                out: *mut f32,
                n: u32,
                h: u32,
                t: u32,
            );
            fn gather_rows_bf16(
                x: *const u16,
                rows: *const u32,
                out: *mut u16,
                n: u32,
                h: u32,
                t: u32,
            );
            fn sum_rows_f32(
                src: *const f32,
                inv: *const u32,
                out: *mut f32,
                t: u32,
                k: u32,
                h: u32,
                n: u32,
            );
            fn sum_rows_bf16(
                src: *const u16,
                inv: *const u32,
                out: *mut u16,
                t: u32,
                k: u32,
                h: u32,
                n: u32,
            );
        }
        let dev = Device::Cpu;
        // (token of each slot, tokens, width)
        let cases: Vec<(Vec<u32>, usize, usize)> = vec![
            // 6 experts × 15 slots over 37 tokens: pads (37), duplicates; tokens 5 and 11 are
            // dropped (routed nowhere).
            (
                (0..6 * 15)
                    .map(|i| match ((i * 37 + i / 7) % 38) as u32 {
                        5 | 11 => 37,
                        r => r,
                    })
                    .collect(),
                37,
                24,
            ),
            // A routing-weight table (slot_weights): one column, at most one slot per entry.
            (vec![0, 9, 21, 6, 14, 3, 17, 10, 23, 12, 24, 24], 24, 1),
            // Rows wider than a block; token 4 in three slots, token 2 in none.
            (vec![0, 4, 1, 4, 5, 3, 0, 4, 5], 5, 1030),
        ];
        for (rows, t, h) in cases {
            let p = Permutation::new(rows, t, &dev).unwrap();
            let (n, k) = (p.slots(), p.k);
            assert!(
                p.inv_host.contains(&(n as u32)) || k == 1,
                "unused inv entries"
            );
            let x = Tensor::from_vec(values(t * h, 3), (t, h), &dev).unwrap();
            let s = Tensor::from_vec(values(n * h, 4), (n, h), &dev).unwrap();
            let p = Arc::new(p);
            let geometries = |len: usize| {
                let full = LaunchShape::for_num_elems(len);
                [
                    full,
                    LaunchShape {
                        grid: (2, 1, 1),
                        ..full
                    },
                ]
                .into_iter()
                .flat_map(|g| Order::BOTH.map(|o| (g, o)))
            };
            let (nu, tu, ku, hu) = (n as u32, t as u32, k as u32, h as u32);
            for launch in geometries(n * h) {
                let what = format!("gather_rows {n}×{h} of {t} tokens, {launch:?}");
                let want = gather_rows(&x, &p).unwrap().flatten_all().unwrap();
                let got = emulate(
                    &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    &p.rows_host,
                    n * h,
                    f32::NAN,
                    launch,
                    &|a, b, c| unsafe { gather_rows_f32(a, b, c, nu, hu, tu) },
                );
                let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
                assert!(bits(got) == bits(want.to_vec1().unwrap()), "f32 {what}");
                let xb = x.to_dtype(DType::BF16).unwrap();
                let want = gather_rows(&xb, &p).unwrap().flatten_all().unwrap();
                let got = emulate(
                    &xb.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
                    &p.rows_host,
                    n * h,
                    half::bf16::NAN,
                    launch,
                    &|a, b, c| unsafe { gather_rows_bf16(a.cast(), b, c.cast(), nu, hu, tu) },
                );
                let bits =
                    |v: Vec<half::bf16>| v.into_iter().map(half::bf16::to_bits).collect::<Vec<_>>();
                assert!(bits(got) == bits(want.to_vec1().unwrap()), "bf16 {what}");
            }
            for launch in geometries(t * h) {
                let what = format!("sum_rows {n}×{h} to {t} tokens (k {k}), {launch:?}");
                let want = sum_rows(&s, &p).unwrap().flatten_all().unwrap();
                let got = emulate(
                    &s.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    &p.inv_host,
                    t * h,
                    f32::NAN,
                    launch,
                    &|a, b, c| unsafe { sum_rows_f32(a, b, c, tu, ku, hu, nu) },
                );
                let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
                assert!(bits(got) == bits(want.to_vec1().unwrap()), "f32 {what}");
                let sb = s.to_dtype(DType::BF16).unwrap();
                let want = sum_rows(&sb, &p).unwrap().flatten_all().unwrap();
                let got = emulate(
                    &sb.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
                    &p.inv_host,
                    t * h,
                    half::bf16::NAN,
                    launch,
                    &|a, b, c| unsafe { sum_rows_bf16(a.cast(), b, c.cast(), tu, ku, hu, nu) },
                );
                let bits =
                    |v: Vec<half::bf16>| v.into_iter().map(half::bf16::to_bits).collect::<Vec<_>>();
                assert!(bits(got) == bits(want.to_vec1().unwrap()), "bf16 {what}");
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_equals_the_cpu_reference_in_f32_and_bf16() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let (t, h, e, cap) = (300, 96, 8, 90);
        let rows: Vec<u32> = (0..e * cap)
            .map(|i| ((i * 37 + i / 7) % (t + 1)) as u32)
            .collect();
        let pc = Arc::new(Permutation::new(rows.clone(), t, &Device::Cpu).unwrap());
        let pg = Arc::new(Permutation::new(rows, t, &gpu).unwrap());
        for (dtype, tol) in [(DType::F32, 1e-6f32), (DType::BF16, 1e-2)] {
            let x = Tensor::from_vec(values(t * h, 3), (t, h), &Device::Cpu).unwrap();
            let x = x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let s = Tensor::from_vec(values(e * cap * h, 4), (e * cap, h), &Device::Cpu).unwrap();
            let s = s.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let on = |v: &Tensor| v.to_device(&gpu).unwrap().to_dtype(dtype).unwrap();
            let back = |v: Tensor| {
                v.to_dtype(DType::F32)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
            };
            for (name, want, got) in [
                (
                    "gather_rows",
                    gather_rows(&x, &pc).unwrap(),
                    back(gather_rows(&on(&x), &pg).unwrap()),
                ),
                (
                    "sum_rows",
                    sum_rows(&s, &pc).unwrap(),
                    back(sum_rows(&on(&s), &pg).unwrap()),
                ),
            ] {
                let diff = (got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                eprintln!("{name} {dtype:?}: max abs diff {diff:e} (scale {scale:e})");
                assert!(diff <= tol * scale, "{name} {dtype:?}: {diff}");
            }
        }
    }
}
