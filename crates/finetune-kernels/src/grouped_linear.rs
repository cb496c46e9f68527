//! `grouped_linear`: one linear map per group of consecutive rows, the MoE expert GEMM without
//! padding. Rows `offsets[e]..offsets[e + 1]` of x `[N, in]` belong to expert e of
//! w `[E, out, in]` (E = offsets.len() − 1, offsets non-decreasing from 0 to N):
//!   y[n] = x[n]·w[e(n)]ᵀ                                   y `[N, out]`
//! Backward: dx[n] = dy[n]·w[e(n)], and with a trainable w, dw[e] = Σ_{n in group e} dy[n]ᵀ·x[n]
//! (zero for an expert with no rows).
//!
//! Why: the padded batched path ([`crate::frozen_batched_linear`]) multiplies E × C rows with
//! C = the largest group, so an unbalanced router (every randomly initialised one, and real
//! ones early in training) multiplies padding; here every GEMM has exactly its expert's rows,
//! as transformers' grouped_mm does. Used for the frozen base experts (`weight_grad = false`:
//! dx only) and for the stacked LoRA A and B of the experts (dx and dw).
//!
//! - CPU (the reference): one GEMM of the `gemm` crate per non-empty expert, in place on its
//!   rows (tested against candle's matmul expert by expert); f32 or bf16 operands, bf16 widened
//!   to f32 and each output rounded once (the CUDA path's convention; tested bit-equal to the
//!   f32 computation rounded once).
//! - CUDA: one cuBLAS GEMM per non-empty expert on views of one output buffer (f32 or bf16 with
//!   f32 accumulation); no custom kernel. Opt-in (`FINETUNE_GROUPED_GEMM_CUBLAS=1` or
//!   [`set_cublas_grouped`]): the same GEMMs in one `cublasGemmGroupedBatchedEx` call (cuBLAS ≥
//!   12.5: one group per expert, each with its own m, n, k, leading dimensions and pointers), so
//!   that cuBLAS may schedule the experts together instead of 128 launches of a 256-row GEMM
//!   (37 TFLOPS each on the H200, session 4's `bench_gpu_train.py gemm`). Off by default until a
//!   GPU session has run its test (`cuda_grouped_call_equals_the_per_expert_loop`) and
//!   `finetune bench kernels` shows it faster.
//!
//! [`grouped_linear_frozen`] is the same map for a frozen weight that the op materializes itself
//! when it needs it (forward and backward) and drops right after: an FP8 expert stack
//! dequantized to bf16 is then a transient buffer instead of a graph input kept alive until the
//! backward (1.2 GB per layer of the 30B-A3B shape, ~58 GB over its 48 layers).

use crate::common::{cpu_f32, cpu_out, gemm_f32, same_dtype};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// y = x·w[e]ᵀ per row group; differentiable in x, and in w when `weight_grad`.
pub fn grouped_linear(
    x: &Tensor,
    w: &Tensor,
    offsets: &Arc<Vec<usize>>,
    weight_grad: bool,
) -> candle_core::Result<Tensor> {
    let (n, inp) = x.dims2()?;
    let (e, _, w_in) = w.dims3()?;
    if w_in != inp || offsets.len() != e + 1 || offsets[0] != 0 || offsets[e] != n {
        candle_core::bail!(
            "grouped-linear: x {:?}, w {:?}, {} offsets ending at {:?}: expected x [N, in], w [E, out, in], E + 1 offsets from 0 to N",
            x.dims(),
            w.dims(),
            offsets.len(),
            offsets.last()
        );
    }
    if offsets.windows(2).any(|p| p[0] > p[1]) {
        candle_core::bail!("grouped-linear: offsets must not decrease");
    }
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        GroupedLinear {
            offsets: offsets.clone(),
            kind: Kind::Forward,
            weight_grad,
        },
    )
}

pub use crate::WeightFn;

static CUBLAS_GROUPED: crate::common::EnvSwitch =
    crate::common::EnvSwitch::new("FINETUNE_GROUPED_GEMM_CUBLAS");

/// The GPU path issues its per-expert GEMMs as one `cublasGemmGroupedBatchedEx` call (`true`)
/// or one cuBLAS GEMM each (`false`, the default; `FINETUNE_GROUPED_GEMM_CUBLAS=1` sets it).
pub fn set_cublas_grouped(on: bool) {
    CUBLAS_GROUPED.set(on)
}

/// Whether the GPU path uses one grouped cuBLAS call ([`set_cublas_grouped`]).
pub fn cublas_grouped() -> bool {
    CUBLAS_GROUPED.get()
}

/// y = x·w[e]ᵀ per row group with a frozen weight materialized by `weight` for the forward and
/// again for the backward (never held by the graph); `dims` = (E, out, in) of what it returns.
/// Differentiable in x only.
pub fn grouped_linear_frozen(
    x: &Tensor,
    weight: WeightFn,
    dims: (usize, usize, usize),
    offsets: &Arc<Vec<usize>>,
) -> candle_core::Result<Tensor> {
    let (n, inp) = x.dims2()?;
    let (e, _, w_in) = dims;
    if w_in != inp || offsets.len() != e + 1 || offsets[0] != 0 || offsets[e] != n {
        candle_core::bail!(
            "grouped-linear: x {:?}, w {dims:?}, {} offsets ending at {:?}: expected x [N, in], w [E, out, in], E + 1 offsets from 0 to N",
            x.dims(),
            offsets.len(),
            offsets.last()
        );
    }
    if offsets.windows(2).any(|p| p[0] > p[1]) {
        candle_core::bail!("grouped-linear: offsets must not decrease");
    }
    x.contiguous()?.apply_op1(GroupedFrozen {
        weight,
        dims,
        offsets: offsets.clone(),
        kind: Kind::Forward,
    })
}

/// dy·w[e] per row group for a frozen weight made by `weight` (`dims` = (E, out, in)): the
/// input gradient of a frozen grouped product, with no backward of its own (used by
/// [`crate::fp8_linear`]).
pub(crate) fn grouped_input_grad(
    dy: &Tensor,
    weight: WeightFn,
    dims: (usize, usize, usize),
    offsets: &Arc<Vec<usize>>,
) -> candle_core::Result<Tensor> {
    dy.contiguous()?.apply_op1_no_bwd(&GroupedFrozen {
        weight,
        dims,
        offsets: offsets.clone(),
        kind: Kind::InputGrad,
    })
}

/// [`grouped_linear_frozen`]'s op over x (Forward) or dy (InputGrad).
struct GroupedFrozen {
    weight: WeightFn,
    dims: (usize, usize, usize),
    offsets: Arc<Vec<usize>>,
    kind: Kind,
}

impl GroupedFrozen {
    /// The weight, checked against `dims` and the activations' dtype, made contiguous.
    fn materialize(&self, dtype: candle_core::DType) -> candle_core::Result<Tensor> {
        let w = (self.weight)()?;
        let (e, o, i) = self.dims;
        if w.dims() != [e, o, i] || w.dtype() != dtype {
            candle_core::bail!(
                "grouped-linear: the weight came out {:?} {:?}, expected {:?} {dtype:?}",
                w.dims(),
                w.dtype(),
                [e, o, i]
            );
        }
        w.contiguous()
    }

    fn linear(&self) -> GroupedLinear {
        GroupedLinear {
            offsets: self.offsets.clone(),
            kind: self.kind,
            weight_grad: false,
        }
    }
}

impl candle_core::CustomOp1 for GroupedFrozen {
    fn name(&self) -> &'static str {
        "grouped-linear-frozen"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = self.materialize(s.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("grouped-linear: the weight is not on the CPU");
        };
        self.linear().cpu_fwd(s, l, ws, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let w = self.materialize(s.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        let candle_core::Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("grouped-linear: the weight is not on the GPU");
        };
        self.linear().cuda_fwd(s, l, ws, wl)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = GroupedFrozen {
            weight: self.weight.clone(),
            dims: self.dims,
            offsets: self.offsets.clone(),
            kind: Kind::InputGrad,
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// One of the op's three products without autograd (for ops that write their own backward,
/// [`crate::moe_experts`]): `Forward` (a = x `[N, in]`, b = w `[E, out, in]`) → x·w[e]ᵀ;
/// `InputGrad` (a = dy `[N, out]`, b = w) → dy·w[e]; `WeightGrad` (a = dy `[N, out]`, b = x
/// `[N, in]`) → Σ over each group of dyᵀ·x, `[E, out, in]` (zeros for an empty group).
pub(crate) fn grouped_product(
    kind: Kind,
    a: &Tensor,
    b: &Tensor,
    offsets: &Arc<Vec<usize>>,
) -> candle_core::Result<Tensor> {
    let (n, a_cols) = a.dims2()?;
    let e = offsets.len().saturating_sub(1);
    let fits = match kind {
        Kind::Forward => b.dims3().is_ok_and(|(be, _, bi)| be == e && bi == a_cols),
        Kind::InputGrad => b.dims3().is_ok_and(|(be, bo, _)| be == e && bo == a_cols),
        Kind::WeightGrad => b.dims2().is_ok_and(|(bn, _)| bn == n),
    };
    if !fits || offsets.first() != Some(&0) || offsets.last() != Some(&n) {
        candle_core::bail!(
            "grouped-linear ({kind:?}): a {:?}, b {:?}, {} offsets ending at {:?} do not fit",
            a.dims(),
            b.dims(),
            offsets.len(),
            offsets.last()
        );
    }
    a.contiguous()?.apply_op2_no_bwd(
        &b.contiguous()?,
        &GroupedLinear {
            offsets: offsets.clone(),
            kind,
            weight_grad: false,
        },
    )
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Kind {
    /// (x, w) → x·wᵀ per group.
    Forward,
    /// (dy, w) → dy·w per group.
    InputGrad,
    /// (dy, x) → Σ dyᵀ·x per group, `[E, out, in]`.
    WeightGrad,
}

pub struct GroupedLinear {
    offsets: Arc<Vec<usize>>,
    kind: Kind,
    weight_grad: bool,
}

impl GroupedLinear {
    /// The forward map x·w[e]ᵀ (no weight gradient), for callers that hold the storages.
    #[cfg(feature = "cuda")]
    pub(crate) fn forward(offsets: Arc<Vec<usize>>) -> Self {
        Self {
            offsets,
            kind: Kind::Forward,
            weight_grad: false,
        }
    }

    fn with(&self, kind: Kind) -> Self {
        Self {
            offsets: self.offsets.clone(),
            kind,
            weight_grad: false,
        }
    }

    /// (rows, cols) of the output and the inner dimension, from the two operands' shapes.
    /// Forward: a = x [N, in], b = w [E, out, in] → [N, out], k = in. InputGrad: a = dy [N, out],
    /// b = w → [N, in], k = out. WeightGrad: a = dy [N, out], b = x [N, in] → [E, out, in], k = rows.
    fn out_shape(&self, a: &Layout, b: &Layout) -> candle_core::Result<Shape> {
        let (n, _) = a.shape().dims2()?;
        let e = self.offsets.len() - 1;
        Ok(match self.kind {
            Kind::Forward => Shape::from((n, b.shape().dims3()?.1)),
            Kind::InputGrad => Shape::from((n, b.shape().dims3()?.2)),
            Kind::WeightGrad => Shape::from((e, a.shape().dims2()?.1, b.shape().dims2()?.1)),
        })
    }

    /// The CPU reference: one GEMM of the `gemm` crate (candle's CPU matmul) per non-empty
    /// group, on the group's rows in place; groups in parallel (one thread each) when there are
    /// at least as many as threads, else one after the other with every thread in each GEMM.
    fn cpu(&self, a: &[f32], b: &[f32], a_cols: usize, out: &Shape) -> Vec<f32> {
        let groups = self.offsets.len() - 1;
        let threads = rayon::current_num_threads();
        let (per_gemm, parallel) = if groups >= threads {
            (1, true)
        } else {
            (threads, false)
        };
        let mut y = vec![0f32; out.elem_count()];
        // Each group's part of the output: its rows (Forward, InputGrad) or its [out, in] slab
        // (WeightGrad), in group order.
        let sizes: Vec<usize> = match self.kind {
            Kind::Forward | Kind::InputGrad => {
                let cols = out.dims2().expect("2-d").1;
                self.offsets
                    .windows(2)
                    .map(|w| (w[1] - w[0]) * cols)
                    .collect()
            }
            Kind::WeightGrad => {
                let (_, o, i) = out.dims3().expect("3-d");
                vec![o * i; groups]
            }
        };
        let mut parts: Vec<(usize, &mut [f32])> = Vec::with_capacity(groups);
        let mut rest = y.as_mut_slice();
        for (e, &size) in sizes.iter().enumerate() {
            let (part, tail) = rest.split_at_mut(size);
            parts.push((e, part));
            rest = tail;
        }
        let run = |(e, part): (usize, &mut [f32])| {
            let (start, end) = (self.offsets[e], self.offsets[e + 1]);
            let rows = end - start;
            if rows == 0 {
                return; // no rows: no output rows, and a zero weight gradient
            }
            match self.kind {
                Kind::Forward | Kind::InputGrad => {
                    // Forward: y[rows, out] = x[rows, in] · w[e]ᵀ; InputGrad: dx[rows, in] =
                    // dy[rows, out] · w[e]. w[e] is [out, in] either way: read transposed
                    // (element (k, n) at n·in + k, in = a_cols) or as it is (at k·in + n,
                    // in = cols).
                    let cols = part.len() / rows;
                    let we = &b[e * cols * a_cols..][..cols * a_cols];
                    let (w_rs, w_cs) = if self.kind == Kind::Forward {
                        (1, a_cols)
                    } else {
                        (cols, 1)
                    };
                    gemm_f32(
                        (rows, cols, a_cols),
                        (part, cols, false),
                        (&a[start * a_cols..end * a_cols], a_cols, 1),
                        (we, w_rs, w_cs),
                        1.0,
                        per_gemm,
                    );
                }
                Kind::WeightGrad => {
                    // dw[e][out, in] = dy[rows, out]ᵀ · x[rows, in]
                    let (_, o, i) = out.dims3().expect("3-d");
                    let dy = &a[start * o..end * o];
                    let x = &b[start * i..end * i];
                    gemm_f32(
                        (o, i, rows),
                        (part, i, false),
                        (dy, 1, o),
                        (x, i, 1),
                        1.0,
                        per_gemm,
                    );
                }
            }
        };
        if parallel {
            parts.into_par_iter().for_each(run);
        } else {
            parts.into_iter().for_each(run);
        }
        y
    }
}

impl CustomOp2 for GroupedLinear {
    fn name(&self) -> &'static str {
        "grouped-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        same_dtype(self.name(), &[("a", s1.dtype()), ("b", s2.dtype())])?;
        let out = self.out_shape(l1, l2)?;
        let a = cpu_f32(s1, l1, self.name(), "a")?;
        let b = cpu_f32(s2, l2, self.name(), "b")?;
        let a_cols = l1.shape().dims2()?.1;
        let y = self.cpu(&a, &b, a_cols, &out);
        Ok((cpu_out(y, s1.dtype()), out))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        same_dtype(self.name(), &[("a", s1.dtype()), ("b", s2.dtype())])?;
        let out = self.out_shape(l1, l2)?;
        let y = match s1.dtype() {
            candle_core::DType::BF16 => cuda::run::<half::bf16>(self, (s1, l1), (s2, l2), &out),
            candle_core::DType::F32 => cuda::run::<f32>(self, (s1, l1), (s2, l2), &out),
            other => candle_core::bail!("grouped-linear (cuda): {other:?}, expected f32 or bf16"),
        }?;
        Ok((y, out))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(w, &self.with(Kind::InputGrad))?;
        let dw = if self.weight_grad {
            Some(dy.apply_op2_no_bwd(x, &self.with(Kind::WeightGrad))?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{GroupedLinear, Kind};
    use crate::common::cuda::view;
    use candle_core::cuda_backend::cudarc::cublas::sys as cublas_sys;
    use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::{
        CUBLAS_OP_N, CUBLAS_OP_T,
    };
    use candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType_t;
    use candle_core::cuda_backend::cudarc::cublas::{Gemm, GemmConfig};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Shape, WithDType};

    /// One cuBLAS GEMM per non-empty group, column-major views of the row-major operands:
    /// Forward   yᵀ[out, n] = w[e] (col-major [in, out], op T) · xᵀ[in, n]
    /// InputGrad dxᵀ[in, n] = w[e] (col-major [in, out], op N) · dyᵀ[out, n]
    /// WeightGrad dw[e]ᵀ[in, out] = xᵀ[in, n] · dy (col-major [out, n], op T)
    pub(super) fn run<T>(
        op: &GroupedLinear,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        out: &Shape,
    ) -> candle_core::Result<CudaStorage>
    where
        T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType,
        candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
    {
        let dev = a.0.device.clone();
        let av = view::<T>(a.0, a.1, "grouped-linear", "a")?;
        let bv = view::<T>(b.0, b.1, "grouped-linear", "b")?;
        // Zeros: the weight gradient of an expert without rows is 0 (and empty groups write
        // nothing).
        let mut y = dev.alloc_zeros::<T>(out.elem_count())?;
        let blas = dev.cublas_handle();
        let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
        let a_cols = a.1.shape().dims2()?.1;
        // Each non-empty group: its GEMM and the element ranges of its A, B and C operands.
        let mut groups: Vec<Group<T>> = Vec::new();
        for e in 0..op.offsets.len() - 1 {
            let (start, end) = (op.offsets[e], op.offsets[e + 1]);
            let rows = end - start;
            if rows == 0 {
                continue;
            }
            groups.push(match op.kind {
                Kind::Forward | Kind::InputGrad => {
                    let cols = out.dims2()?.1;
                    // w[e]: [out, in] row-major.
                    let (w_out, w_in) = if op.kind == Kind::Forward {
                        (cols, a_cols)
                    } else {
                        (a_cols, cols)
                    };
                    let cfg = GemmConfig {
                        transa: if op.kind == Kind::Forward {
                            CUBLAS_OP_T
                        } else {
                            CUBLAS_OP_N
                        },
                        transb: CUBLAS_OP_N,
                        m: cols as i32,
                        n: rows as i32,
                        k: a_cols as i32,
                        alpha: one,
                        lda: w_in as i32,
                        ldb: a_cols as i32,
                        beta: zero,
                        ldc: cols as i32,
                    };
                    Group {
                        cfg,
                        a: (Operand::B, e * w_out * w_in..(e + 1) * w_out * w_in),
                        b: (Operand::A, start * a_cols..end * a_cols),
                        c: start * cols..end * cols,
                    }
                }
                Kind::WeightGrad => {
                    let (_, o, i) = out.dims3()?;
                    let cfg = GemmConfig {
                        transa: CUBLAS_OP_N,
                        transb: CUBLAS_OP_T,
                        m: i as i32,
                        n: o as i32,
                        k: rows as i32,
                        alpha: one,
                        lda: i as i32,
                        ldb: o as i32,
                        beta: zero,
                        ldc: i as i32,
                    };
                    // A = x rows (b operand), B = dy rows (a operand).
                    Group {
                        cfg,
                        a: (Operand::B, start * i..end * i),
                        b: (Operand::A, start * o..end * o),
                        c: e * o * i..(e + 1) * o * i,
                    }
                }
            });
        }
        let pick = |(which, range): &(Operand, std::ops::Range<usize>)| match which {
            Operand::A => av.slice(range.clone()),
            Operand::B => bv.slice(range.clone()),
        };
        if super::cublas_grouped() && groups.len() > 1 {
            grouped_call::<T>(&dev, &blas, &groups, &av, &bv, &mut y)?;
        } else {
            for g in &groups {
                let mut y_view = y.slice_mut(g.c.clone());
                // SAFETY: the views hold the m×k, k×n and m×n column-major operands the config
                // describes (checked shapes above), all on candle's stream.
                unsafe { blas.gemm(g.cfg, &pick(&g.a), &pick(&g.b), &mut y_view) }.w()?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    /// Which input of the op an operand is a view of.
    #[derive(Clone, Copy)]
    enum Operand {
        A,
        B,
    }

    /// One expert's GEMM: its configuration and the element ranges of its operands.
    struct Group<T> {
        cfg: GemmConfig<T>,
        a: (Operand, std::ops::Range<usize>),
        b: (Operand, std::ops::Range<usize>),
        c: std::ops::Range<usize>,
    }

    /// The cuBLAS data type of T (f32 or bf16; both computed in f32 with f32 alpha/beta).
    fn data_type<T: WithDType>() -> candle_core::Result<cudaDataType_t> {
        match T::DTYPE {
            candle_core::DType::F32 => Ok(cudaDataType_t::CUDA_R_32F),
            candle_core::DType::BF16 => Ok(cudaDataType_t::CUDA_R_16BF),
            other => candle_core::bail!("grouped-linear (cuda): {other:?}, expected f32 or bf16"),
        }
    }

    /// `groups` as one `cublasGemmGroupedBatchedEx` call: group g is one GEMM (group size 1)
    /// with its own transposes, m, n, k, leading dimensions (host arrays) and operand pointers
    /// (device arrays of pointers into the two inputs and the output, uploaded on the stream
    /// before the call and freed, stream-ordered, after it). Alpha 1 and beta 0 in f32
    /// (CUBLAS_COMPUTE_32F: the per-expert `gemm` path's compute type for f32 and bf16).
    fn grouped_call<T>(
        dev: &candle_core::cuda_backend::CudaDevice,
        blas: &candle_core::cuda_backend::cudarc::cublas::CudaBlas,
        groups: &[Group<T>],
        av: &CudaView<'_, T>,
        bv: &CudaView<'_, T>,
        y: &mut CudaSlice<T>,
    ) -> candle_core::Result<()>
    where
        T: CudaDType + DeviceRepr + WithDType,
    {
        let stream = dev.cuda_stream();
        let dtype = data_type::<T>()?;
        let size = std::mem::size_of::<T>() as u64;
        let (a_base, _a_guard) = av.device_ptr(&stream);
        let (b_base, _b_guard) = bv.device_ptr(&stream);
        let (c_base, _c_guard) = y.device_ptr_mut(&stream);
        let base = |which: Operand| match which {
            Operand::A => a_base,
            Operand::B => b_base,
        };
        let n = groups.len();
        let mut pointers: Vec<u64> = Vec::with_capacity(3 * n);
        pointers.extend(
            groups
                .iter()
                .map(|g| base(g.a.0) + g.a.1.start as u64 * size),
        );
        pointers.extend(
            groups
                .iter()
                .map(|g| base(g.b.0) + g.b.1.start as u64 * size),
        );
        pointers.extend(groups.iter().map(|g| c_base + g.c.start as u64 * size));
        let on_device = stream.clone_htod(&pointers).w()?;
        let (p, _p_guard) = on_device.device_ptr(&stream);
        let ptr_size = std::mem::size_of::<u64>() as u64;
        let (a_ptrs, b_ptrs, c_ptrs) = (p, p + n as u64 * ptr_size, p + 2 * n as u64 * ptr_size);
        let ints = |f: fn(&GemmConfig<T>) -> i32| -> Vec<i32> {
            groups.iter().map(|g| f(&g.cfg)).collect()
        };
        let (m, nn, k) = (ints(|c| c.m), ints(|c| c.n), ints(|c| c.k));
        let (lda, ldb, ldc) = (ints(|c| c.lda), ints(|c| c.ldb), ints(|c| c.ldc));
        let transa: Vec<_> = groups.iter().map(|g| g.cfg.transa).collect();
        let transb: Vec<_> = groups.iter().map(|g| g.cfg.transb).collect();
        let (alpha, beta, sizes) = (vec![1f32; n], vec![0f32; n], vec![1i32; n]);
        // SAFETY: every array has one entry per group; the pointers address the operands the
        // configurations describe (the per-expert path's views), on candle's stream, which the
        // handle uses; the pointer arrays stay allocated until after the call (stream-ordered
        // free).
        let status = unsafe {
            cublas_sys::cublasGemmGroupedBatchedEx(
                *blas.handle(),
                transa.as_ptr(),
                transb.as_ptr(),
                m.as_ptr(),
                nn.as_ptr(),
                k.as_ptr(),
                alpha.as_ptr() as *const std::ffi::c_void,
                a_ptrs as *const *const std::ffi::c_void,
                dtype,
                lda.as_ptr(),
                b_ptrs as *const *const std::ffi::c_void,
                dtype,
                ldb.as_ptr(),
                beta.as_ptr() as *const std::ffi::c_void,
                c_ptrs as *const *mut std::ffi::c_void,
                dtype,
                ldc.as_ptr(),
                n as i32,
                sizes.as_ptr(),
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        };
        if status != cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            candle_core::bail!("grouped-linear (cuda): cublasGemmGroupedBatchedEx: {status:?}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::{rel_diff, tensor};
    use candle_core::{Device, Var};

    /// 4 experts with 3, 0, 5 and 1 rows (one empty), in 6 → out 5.
    fn sample() -> (Tensor, Tensor, Arc<Vec<usize>>, Tensor) {
        let offsets = Arc::new(vec![0, 3, 3, 8, 9]);
        (
            tensor(&[9, 6], 61),
            tensor(&[4, 5, 6], 62),
            offsets,
            tensor(&[9, 5], 63),
        )
    }

    /// The same map with candle's matmul, expert by expert.
    fn plain(x: &Tensor, w: &Tensor, offsets: &[usize]) -> Tensor {
        let parts: Vec<Tensor> = (0..offsets.len() - 1)
            .filter(|&e| offsets[e + 1] > offsets[e])
            .map(|e| {
                x.narrow(0, offsets[e], offsets[e + 1] - offsets[e])
                    .unwrap()
                    .matmul(&w.get(e).unwrap().t().unwrap())
                    .unwrap()
            })
            .collect();
        Tensor::cat(&parts, 0).unwrap()
    }

    /// grouped_linear on (x, w, offsets) against per-expert matmuls: y, and dx, dw of Σ y·g,
    /// within 1e-6 relative; returns dw.
    fn check_against_plain(
        x: &Tensor,
        w: &Tensor,
        offsets: &Arc<Vec<usize>>,
        g: &Tensor,
    ) -> Tensor {
        let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let ours = grouped_linear(xv.as_tensor(), wv.as_tensor(), offsets, true).unwrap();
        let theirs = plain(xv.as_tensor(), wv.as_tensor(), offsets);
        assert!(rel_diff(&ours, &theirs) < 1e-6);
        let go = (ours * g).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (theirs * g).unwrap().sum_all().unwrap().backward().unwrap();
        for (what, v) in [("dx", xv.as_tensor()), ("dw", wv.as_tensor())] {
            let d = rel_diff(go.get(v).unwrap(), gt.get(v).unwrap());
            assert!(d < 1e-6, "{what}: {d}");
        }
        go.get(wv.as_tensor()).unwrap().clone()
    }

    #[test]
    fn forward_and_gradients_equal_per_expert_matmuls() {
        let (x, w, offsets, g) = sample();
        let dw = check_against_plain(&x, &w, &offsets, &g);
        // The empty expert's weight gradient is exactly zero.
        let dw1 = dw.get(1).unwrap();
        assert_eq!(
            dw1.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    /// Fewer groups than threads: the GEMMs run one after the other with every thread (the
    /// other branch of the CPU reference); one group is a plain matmul.
    #[test]
    fn a_single_group_equals_a_matmul_with_its_gradients() {
        let (x, w, g) = (
            tensor(&[70, 33], 81),
            tensor(&[1, 17, 33], 82),
            tensor(&[70, 17], 83),
        );
        check_against_plain(&x, &w, &Arc::new(vec![0, 70]), &g);
    }

    /// bf16 on the CPU: y, dx and dw equal the f32 computation on the same (bf16-exact) values
    /// rounded once to bf16, bit for bit — the op widens its operands to f32, runs the same f32
    /// GEMMs (same summation order) and rounds each output once, as the CUDA path accumulates
    /// in f32 and rounds once (cuBLAS may sum in another order there: within an ulp).
    #[test]
    fn bf16_equals_the_f32_computation_rounded_once() {
        let (x, w, offsets, g) = sample();
        let bf = |t: &Tensor| t.to_dtype(candle_core::DType::BF16).unwrap();
        let f32_of = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let run = |x: &Tensor, w: &Tensor, g: &Tensor| {
            let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
            let y = grouped_linear(xv.as_tensor(), wv.as_tensor(), &offsets, true).unwrap();
            let grads = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
            [
                y,
                grads.get(xv.as_tensor()).unwrap().clone(),
                grads.get(wv.as_tensor()).unwrap().clone(),
            ]
        };
        let (xb, wb, gb) = (bf(&x), bf(&w), bf(&g));
        let got = run(&xb, &wb, &gb);
        let want = run(&f32_of(&xb), &f32_of(&wb), &f32_of(&gb));
        for (what, got, want) in [
            ("y", &got[0], &want[0]),
            ("dx", &got[1], &want[1]),
            ("dw", &got[2], &want[2]),
        ] {
            assert_eq!(got.dtype(), candle_core::DType::BF16, "{what}");
            let bits = |t: &Tensor| {
                f32_of(&bf(t))
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(bits(got), bits(want), "{what}");
        }
        // And the frozen variant's y and dx.
        let xv = Var::from_tensor(&xb).unwrap();
        let weight: WeightFn = Arc::new(move || Ok(wb.clone()));
        let y = grouped_linear_frozen(xv.as_tensor(), weight, (4, 5, 6), &offsets).unwrap();
        let dx = (&y * &gb).unwrap().sum_all().unwrap().backward().unwrap();
        let bits = |t: &Tensor| f32_of(t).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(&y), bits(&got[0]), "frozen y");
        assert_eq!(
            bits(dx.get(xv.as_tensor()).unwrap()),
            bits(&got[1]),
            "frozen dx"
        );
    }

    #[test]
    fn frozen_weights_get_no_gradient() {
        let (x, w, offsets, g) = sample();
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let y = grouped_linear(xv.as_tensor(), wv.as_tensor(), &offsets, false).unwrap();
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(xv.as_tensor()).is_some());
        assert!(grads.get(wv.as_tensor()).is_none());
    }

    /// The frozen variant against `grouped_linear` (forward and dx), materializing its weight
    /// exactly once for the forward and once for the backward.
    #[test]
    fn the_frozen_variant_equals_grouped_linear_and_materializes_per_use() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (x, w, offsets, g) = sample();
        let calls = Arc::new(AtomicUsize::new(0));
        let weight: WeightFn = {
            let (w, calls) = (w.clone(), calls.clone());
            Arc::new(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                // A fresh tensor per call, as a dequantization makes.
                w.affine(1.0, 0.0)
            })
        };
        let xv = Var::from_tensor(&x).unwrap();
        let y = grouped_linear_frozen(xv.as_tensor(), weight, (4, 5, 6), &offsets).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let want_y = grouped_linear(xv.as_tensor(), &w, &offsets, false).unwrap();
        assert!(rel_diff(&y, &want_y) < 1e-7);
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let want = (want_y * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = rel_diff(
            grads.get(xv.as_tensor()).unwrap(),
            want.get(xv.as_tensor()).unwrap(),
        );
        assert!(d < 1e-7, "dx {d}");
        // A weight of the wrong shape is refused when it is materialized.
        let bad: WeightFn = Arc::new(|| Ok(tensor(&[4, 5, 7], 1)));
        let err = grouped_linear_frozen(&x, bad, (4, 5, 6), &offsets)
            .unwrap_err()
            .to_string();
        assert!(err.contains("came out [4, 5, 7]"), "{err}");
    }

    #[test]
    fn bad_offsets_are_refused() {
        let (x, w, _, _) = sample();
        let err = grouped_linear(&x, &w, &Arc::new(vec![0, 3, 2, 8, 9]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must not decrease"), "{err}");
        let err = grouped_linear(&x, &w, &Arc::new(vec![0, 9]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("offsets"), "{err}");
        let _ = Device::Cpu;
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_equals_the_cpu_reference() {
        use candle_core::DType;
        let Some(gpu) = crate::common::test::gpu() else {
            return;
        };
        let (x, w, offsets, g) = sample();
        let run = |x: &Tensor, w: &Tensor, g: &Tensor| {
            let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
            let y = grouped_linear(xv.as_tensor(), wv.as_tensor(), &offsets, true).unwrap();
            let grads = (y.to_dtype(DType::F32).unwrap() * g.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = grads.get(xv.as_tensor()).unwrap().clone();
            let dw = grads.get(wv.as_tensor()).unwrap().clone();
            (y, dx, dw)
        };
        let want = run(&x, &w, &g);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
            let got = run(&on(&x), &on(&w), &on(&g));
            let d = [
                rel_diff(&got.0, &want.0),
                rel_diff(&got.1, &want.1),
                rel_diff(&got.2, &want.2),
            ];
            eprintln!(
                "grouped-linear cuda {dtype:?}: y {:e}, dx {:e}, dw {:e}",
                d[0], d[1], d[2]
            );
            assert!(d.iter().all(|&e| e < tol), "{dtype:?}: {d:?}");
            // The frozen variant: the same y and dx.
            let (xg, wg) = (Var::from_tensor(&on(&x)).unwrap(), on(&w));
            let weight: WeightFn = Arc::new(move || Ok(wg.clone()));
            let y = grouped_linear_frozen(xg.as_tensor(), weight, (4, 5, 6), &offsets).unwrap();
            let grads = (y.to_dtype(DType::F32).unwrap() * on(&g).to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dy = rel_diff(&y, &want.0);
            let dx = rel_diff(grads.get(xg.as_tensor()).unwrap(), &want.1);
            eprintln!("grouped-linear-frozen cuda {dtype:?}: y {dy:e}, dx {dx:e}");
            assert!(dy < tol && dx < tol, "{dtype:?}: frozen y {dy}, dx {dx}");
        }
    }

    /// The opt-in grouped cuBLAS call (`set_cublas_grouped`) against the per-expert GEMM loop on
    /// the GPU and the CPU reference: y, dx and dw, f32 and bf16, on the small sample (an empty
    /// expert) and on 8 experts with 0 to 300 rows of 256 → 192.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_grouped_call_equals_the_per_expert_loop() {
        use candle_core::DType;
        let Some(gpu) = crate::common::test::gpu() else {
            return;
        };
        let rows = [37usize, 0, 300, 1, 128, 129, 0, 64];
        let mut offsets = vec![0usize];
        for r in rows {
            offsets.push(offsets.last().unwrap() + r);
        }
        let n = *offsets.last().unwrap();
        let big = (
            tensor(&[n, 256], 71),
            tensor(&[8, 192, 256], 72),
            Arc::new(offsets),
            tensor(&[n, 192], 73),
        );
        for (x, w, offsets, g) in [sample(), big] {
            let run = |x: &Tensor, w: &Tensor, g: &Tensor| {
                let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
                let y = grouped_linear(xv.as_tensor(), wv.as_tensor(), &offsets, true).unwrap();
                let grads = (y.to_dtype(DType::F32).unwrap() * g.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                [
                    y.to_dtype(DType::F32).unwrap(),
                    grads.get(xv.as_tensor()).unwrap().clone(),
                    grads.get(wv.as_tensor()).unwrap().clone(),
                ]
            };
            let want = run(&x, &w, &g);
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
                let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
                set_cublas_grouped(true);
                let grouped = run(&on(&x), &on(&w), &on(&g));
                set_cublas_grouped(false);
                let looped = run(&on(&x), &on(&w), &on(&g));
                for (i, what) in ["y", "dx", "dw"].iter().enumerate() {
                    let vs_loop = rel_diff(&grouped[i], &looped[i]);
                    let vs_cpu = rel_diff(&grouped[i], &want[i]);
                    eprintln!(
                        "grouped cuBLAS call {dtype:?} {what} (N {}): vs loop {vs_loop:e}, vs CPU {vs_cpu:e}",
                        x.dim(0).unwrap()
                    );
                    assert!(
                        vs_loop < tol && vs_cpu < tol,
                        "{dtype:?} {what}: {vs_loop} / {vs_cpu}"
                    );
                }
            }
        }
    }
}
