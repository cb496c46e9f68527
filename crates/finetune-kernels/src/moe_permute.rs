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
//! - CPU (the reference): plain loops, sums in f32 in slot order (the order index_add adds in);
//!   f32 or bf16 (read as f32, rounded once).
//! - CUDA (`cuda` feature, kernels/moe_permute.cu): f32 and bf16 (bf16 sums accumulate in f32
//!   and round once).

use crate::common::{cpu_f32, cpu_out};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
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

struct GatherRows(Arc<Permutation>);
/// [`sum_rows`]' op (also run on a storage directly by [`crate::moe_experts`]' forward).
pub(crate) struct SumRows(pub(crate) Arc<Permutation>);

impl CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "moe-gather-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, self.name(), "x")?;
        let h = l.dims()[1];
        let p = &self.0;
        let mut out = vec![0f32; p.slots() * h];
        for (slot, &row) in p.rows_host.iter().enumerate() {
            if (row as usize) < p.tokens {
                let r = row as usize;
                out[slot * h..(slot + 1) * h].copy_from_slice(&x[r * h..(r + 1) * h]);
            }
        }
        Ok((cpu_out(out, s.dtype()), Shape::from((p.slots(), h))))
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
        let src = cpu_f32(s, l, self.name(), "input")?;
        let h = l.dims()[1];
        let p = &self.0;
        let n = p.slots();
        let mut out = vec![0f32; p.tokens * h];
        for t in 0..p.tokens {
            let acc = &mut out[t * h..(t + 1) * h];
            for &slot in &p.inv_host[t * p.k..(t + 1) * p.k] {
                if (slot as usize) < n {
                    let row = &src[slot as usize * h..(slot as usize + 1) * h];
                    acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
            }
        }
        Ok((cpu_out(out, s.dtype()), Shape::from((p.tokens, h))))
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
            let cfg = LaunchConfig::for_num_elems(len.min(1 << 30) as u32);
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
