//! `moe_route`: each token's top-k experts from its router probabilities, as one op whose
//! output keeps the selection mask on the device and puts the chosen indices in k columns, so
//! that a GPU run copies T·k indices to the host (to build the expert groups) instead of the
//! T·E probabilities, and uploads no mask.
//!
//! Math: [`top_k`]`(p [T, E], k)` = out `[T, E + k]` f32 with
//!   out[t][e]     = 1 if e ∈ top_k(p[t]) else 0                  (e < E)
//!   out[t][E + r] = the r-th element of top_k(p[t])               (r < k)
//! where top_k orders experts by descending probability, equal probabilities by ascending
//! index (so an equal value never displaces a lower index), and takes the first k. NaN ranks
//! as −∞ (below every probability, ties by index), so a row always has k picks: a diverged
//! step routes somewhere, produces a NaN loss and is skipped by the trainer, as before.
//!
//! - CPU (the reference): a partial insertion sort per row (the loop finetune-model's router
//!   ran on the host before this op).
//! - CUDA (`cuda` feature, kernels/moe_route.cu): one warp per token, k rounds of a warp-wide
//!   argmax; bit-identical to the CPU (no arithmetic, only comparisons). Opt-in
//!   ([`set_on_device`], `FINETUNE_ROUTE_ON_DEVICE=1`) until a GPU session has run its test:
//!   by default probabilities on a GPU are copied to the host, selected by the CPU reference
//!   and the packed result copied back (the data flow of the host loop this op replaced).
//!
//! No backward: the selection is piecewise constant; the routing weights' gradient flows
//! through the probabilities the mask multiplies (finetune-model's `route_tokens`).

use crate::common::{cpu_f32, EnvSwitch, LaunchShape};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

static ON_DEVICE: EnvSwitch = EnvSwitch::new("FINETUNE_ROUTE_ON_DEVICE");

/// Whether [`top_k`] runs its CUDA kernel on probabilities on a GPU (`true`) or selects on a
/// host copy (`false`, the default; `FINETUNE_ROUTE_ON_DEVICE=1` sets it).
pub fn set_on_device(on: bool) {
    ON_DEVICE.set(on)
}

/// See [`set_on_device`].
pub fn on_device() -> bool {
    ON_DEVICE.get()
}

/// The packed mask and indices of each token's top-k experts (module doc); `p` `[T, E]`
/// probabilities (any float dtype; compared in f32), 1 ≤ k ≤ E ≤ 1024.
pub fn top_k(p: &Tensor, k: usize) -> candle_core::Result<TopK> {
    let (t, e) = p.dims2()?;
    if k == 0 || k > e || e > 1024 {
        candle_core::bail!("moe-top-k: k = {k} of {e} experts (need 1 ≤ k ≤ experts ≤ 1024)");
    }
    let p = p.detach().to_dtype(candle_core::DType::F32)?.contiguous()?;
    let op = TopKOp { k };
    let packed = if p.device().is_cpu() || on_device() {
        p.apply_op1_no_bwd(&op)?
    } else {
        p.to_device(&Device::Cpu)?
            .apply_op1_no_bwd(&op)?
            .to_device(p.device())?
    };
    Ok(TopK {
        packed,
        tokens: t,
        experts: e,
        k,
    })
}

/// [`top_k`]'s result: `[T, E + k]` on the probabilities' device.
pub struct TopK {
    packed: Tensor,
    tokens: usize,
    experts: usize,
    k: usize,
}

impl TopK {
    /// The 0/1 selection mask `[T, E]` f32 (a view of the packed result, on its device).
    pub fn mask(&self) -> candle_core::Result<Tensor> {
        self.packed.narrow(1, 0, self.experts)
    }

    /// Per token, its k experts by descending probability (copied to the host: T·k values).
    pub fn chosen(&self) -> candle_core::Result<Vec<Vec<u32>>> {
        // Every pick is < E by construction; checked, as a device kernel wrote them.
        let idx = self
            .packed
            .narrow(1, self.experts, self.k)?
            .contiguous()?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(self.tokens);
        for (t, row) in idx.chunks_exact(self.k.max(1)).enumerate() {
            let picks: Vec<u32> = row.iter().map(|&v| v as u32).collect();
            if let Some(&bad) = picks.iter().find(|&&e| e as usize >= self.experts) {
                candle_core::bail!(
                    "moe-top-k: token {t} got expert {bad} of {} (corrupt selection)",
                    self.experts
                );
            }
            out.push(picks);
        }
        Ok(out)
    }
}

struct TopKOp {
    k: usize,
}

/// `moe_top_k`'s launch for `t` tokens: one warp per token, 8 warps per block.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn launch_shape(t: usize) -> LaunchShape {
    LaunchShape {
        grid: (t.div_ceil(8) as u32, 1, 1),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The comparison key of a probability: NaN ranks as −∞.
fn key(p: f32) -> f32 {
    if p.is_nan() {
        f32::NEG_INFINITY
    } else {
        p
    }
}

/// One row's top-k (module doc order) by partial insertion: an expert enters the sorted list
/// when the list is not full or it is strictly larger than the list's last entry.
fn top_k_row(p: &[f32], k: usize, top: &mut Vec<usize>) {
    top.clear();
    for e in 0..p.len() {
        let v = key(p[e]);
        if top.len() == k && v <= key(p[top[k - 1]]) {
            continue;
        }
        let at = top.partition_point(|&o| key(p[o]) >= v);
        top.insert(at, e);
        top.truncate(k);
    }
}

impl CustomOp1 for TopKOp {
    fn name(&self) -> &'static str {
        "moe-top-k"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = cpu_f32(s, l, self.name(), "probabilities")?;
        let (t, e) = l.shape().dims2()?;
        let k = self.k;
        let mut out = vec![0f32; t * (e + k)];
        let mut top = Vec::with_capacity(k + 1);
        for (row, o) in p.chunks_exact(e.max(1)).zip(out.chunks_exact_mut(e + k)) {
            top_k_row(row, k, &mut top);
            for (r, &pick) in top.iter().enumerate() {
                o[pick] = 1.0;
                o[e + r] = pick as f32;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((t, e + k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::common::cuda::view;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (t, e) = l.shape().dims2()?;
        let k = self.k;
        let dev = s.device.clone();
        let p = view::<f32>(s, l, self.name(), "probabilities")?;
        // SAFETY: the kernel writes every element (mask zeroed then marked, k index columns).
        let out = unsafe { dev.alloc::<f32>(t * (e + k)) }?;
        let f = dev.get_or_load_custom_func("moe_top_k", "moe_route", crate::ptx::MOE_ROUTE)?;
        let (t_u, e_u, k_u) = (t as u32, e as u32, k as u32);
        let mut b = f.builder();
        b.arg(&p).arg(&out).arg(&t_u).arg(&e_u).arg(&k_u);
        if t > 0 {
            unsafe { b.launch(LaunchConfig::from(launch_shape(t))) }.w()?;
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((t, e + k)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probabilities with many exact ties (values from a small set), so that the tie order
    /// decides which experts are chosen.
    fn tied(t: usize, e: usize, salt: usize) -> Vec<f32> {
        (0..t * e)
            .map(|i| ((i * 7919 + salt * 104_729) % 13) as f32 / 13.0)
            .collect()
    }

    /// The order of the module doc by brute force: sort all experts by (p desc, index asc).
    fn brute_force(row: &[f32], k: usize) -> Vec<u32> {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| key(row[b]).total_cmp(&key(row[a])).then(a.cmp(&b)));
        idx.truncate(k);
        idx.into_iter().map(|e| e as u32).collect()
    }

    #[test]
    fn picks_equal_a_full_sort_by_descending_probability_then_index() {
        let (t, e) = (50, 40);
        for (k, salt) in [(1, 1), (4, 2), (8, 3), (40, 4)] {
            let p = tied(t, e, salt);
            let got = top_k(
                &Tensor::from_vec(p.clone(), (t, e), &Device::Cpu).unwrap(),
                k,
            )
            .unwrap();
            let chosen = got.chosen().unwrap();
            let mask = got.mask().unwrap().to_vec2::<f32>().unwrap();
            for (tok, row) in p.chunks_exact(e).enumerate() {
                let want = brute_force(row, k);
                assert_eq!(chosen[tok], want, "token {tok}, k {k}");
                for (x, &m) in mask[tok].iter().enumerate() {
                    assert_eq!(m == 1.0, want.contains(&(x as u32)), "mask {tok} {x}");
                    assert!(m == 0.0 || m == 1.0);
                }
            }
        }
    }

    #[test]
    fn nan_ranks_below_every_probability_and_bad_k_is_refused() {
        let p = vec![0.5, f32::NAN, 0.2, 0.3, f32::NAN, 0.4, f32::NAN, f32::NAN];
        let p = Tensor::from_vec(p, (2, 4), &Device::Cpu).unwrap();
        assert_eq!(
            top_k(&p, 2).unwrap().chosen().unwrap(),
            vec![vec![0, 3], vec![1, 0]]
        );
        let all = top_k(&p, 4).unwrap();
        assert_eq!(
            all.chosen().unwrap(),
            vec![vec![0, 3, 2, 1], vec![1, 0, 2, 3]]
        );
        assert!(all
            .mask()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&m| m == 1.0));
        let err = top_k(&p, 5).err().unwrap().to_string();
        assert!(err.contains("k = 5 of 4"), "{err}");
    }

    /// kernels/moe_route.cu itself, run on the CPU by finetune-kernel-emu with the CUDA
    /// launch's geometry, in both fiber orders: bit-identical to the CPU reference (the kernel
    /// only compares, so no tolerance), NaN rows included.
    #[test]
    fn emulated_kernel_equals_the_cpu_reference_bit_for_bit() {
        use finetune_kernel_emu::{launch, Buffer, Order};
        extern "C" {
            fn moe_top_k(p: *const f32, out: *mut f32, t: u32, e: u32, k: u32);
        }
        for (t, e, k) in [
            (37usize, 160usize, 8usize),
            (9, 32, 32),
            (5, 1000, 3),
            (20, 128, 8),
        ] {
            let mut p = tied(t, e, 7);
            p[3] = f32::NAN; // a NaN among token 0's probabilities
            p[e..2 * e].fill(f32::NAN); // token 1: all NaN
            let want = top_k(
                &Tensor::from_vec(p.clone(), (t, e), &Device::Cpu).unwrap(),
                k,
            )
            .unwrap()
            .packed
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            for order in Order::BOTH {
                let probs = Buffer::from_slice(&p);
                let out = Buffer::filled(t * (e + k), f32::NAN);
                launch(launch_shape(t).into(), order, || unsafe {
                    moe_top_k(probs.ptr(), out.mut_ptr(), t as u32, e as u32, k as u32)
                })
                .unwrap();
                let got: Vec<u32> = out.to_vec().iter().map(|v| v.to_bits()).collect();
                let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{t}×{e} k {k}, {order:?}");
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_equals_the_cpu_reference_bit_for_bit() {
        let Some(gpu) = crate::common::test::gpu() else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        // 4,100 tokens (not a multiple of the 8 warps per block), 128 experts (4 per lane),
        // 160 (5 per lane, a partial last stride), ties everywhere.
        for (t, e, k) in [
            (4100usize, 128usize, 8usize),
            (37, 160, 8),
            (9, 32, 32),
            (5, 1000, 3),
        ] {
            let p = Tensor::from_vec(tied(t, e, 7), (t, e), &Device::Cpu).unwrap();
            let want = top_k(&p, k).unwrap();
            set_on_device(true);
            let got = top_k(&p.to_device(&gpu).unwrap(), k);
            set_on_device(false);
            let got = got.unwrap();
            assert_eq!(
                got.chosen().unwrap(),
                want.chosen().unwrap(),
                "{t}×{e} k {k}"
            );
            assert_eq!(
                got.mask()
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
                want.mask().unwrap().to_vec2::<f32>().unwrap()
            );
            eprintln!("moe-top-k cuda {t}×{e} k {k}: equal");
        }
    }
}
