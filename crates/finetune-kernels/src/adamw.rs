//! `adamw`: one AdamW step over many f32 tensors at once (on CUDA: one kernel launch for all
//! of them instead of about ten candle ops per tensor), in place, with decoupled weight decay and
//! per-tensor bias correction, in exactly the operation order of finetune-train's `AdamW`
//! (PyTorch's torch.optim.AdamW). For a tensor at its t-th update (1-based) with gradient g:
//!   d = p·f32(1 − lr·wd)
//!   m ← m·f32(β₁) + g·f32(1 − β₁)
//!   v ← v·f32(β₂) + (g·g)·f32(1 − β₂)
//!   p ← d − (m / (√v·f32(1/√(1 − β₂ᵗ)) + f32(ε)))·f32(lr/(1 − β₁ᵗ))
//! every scalar computed in f64 and rounded to f32 once (as candle's affine does), every f32
//! operation rounded once (no fused multiply-add), so that results are bit-identical to the
//! candle ops of finetune-train's `AdamW::step`.
//!
//! - CPU (the reference): [`adamw_step`] on CPU tensors, a plain loop per tensor.
//! - CUDA (`cuda` feature, kernels/adamw.cu): a table of (p, m, v, g) device addresses and
//!   per-tensor scalars, one block per 4,096-element chunk of any tensor, one launch.
//!
//! Parameters, moments and gradients are `Var`s / tensors the caller owns: p, m and v are
//! written in place (on CUDA through their device addresses, so they must not share storage
//! with any other live tensor).

use crate::common::LaunchShape;
use candle_core::{DType, Device, Tensor, Var};

/// The hyper-parameters of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One tensor's part of the step: the parameter, its moments, its gradient and `t`, this
/// update's 1-based count for this tensor (the bias corrections' exponent).
pub struct AdamWTensor<'a> {
    pub param: &'a Var,
    pub m: &'a Var,
    pub v: &'a Var,
    pub grad: &'a Tensor,
    pub t: u64,
}

/// The f32 scalars of one tensor's update: (decay, step, inv_b2) as finetune-train's AdamW
/// rounds them.
fn scalars(h: &AdamWHyper, t: u64) -> (f32, f32, f32) {
    let t = t as i32;
    let bias1 = 1.0 - h.beta1.powi(t);
    let bias2_sqrt = (1.0 - h.beta2.powi(t)).sqrt();
    (
        (1.0 - h.lr * h.weight_decay) as f32,
        (h.lr / bias1) as f32,
        (1.0 / bias2_sqrt) as f32,
    )
}

/// Elements per block of kernels/adamw.cu.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const CHUNK: usize = 4096;

/// kernels/adamw.cu's scalar arguments after the chunk length: β₁, 1 − β₁, β₂, 1 − β₂, ε, each
/// rounded to f32 once (as [`cpu_step`] rounds them).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernel_scalars(h: &AdamWHyper) -> [f32; 5] {
    [
        h.beta1 as f32,
        (1.0 - h.beta1) as f32,
        h.beta2 as f32,
        (1.0 - h.beta2) as f32,
        h.eps as f32,
    ]
}

/// kernels/adamw.cu's metadata row of one tensor with `len` elements at its `t`-th update:
/// the device addresses of p, m, v and g, the element count, decay | step << 32 and inv_b2
/// (f32 bits).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn meta_row(addresses: [u64; 4], len: usize, h: &AdamWHyper, t: u64) -> [u64; 7] {
    let (decay, step, inv_b2) = scalars(h, t);
    let [p, m, v, g] = addresses;
    [
        p,
        m,
        v,
        g,
        len as u64,
        u64::from(decay.to_bits()) | (u64::from(step.to_bits()) << 32),
        u64::from(inv_b2.to_bits()),
    ]
}

/// Appends tensor `tensor`'s (tensor, chunk) pairs, one per block, for `len` elements.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn push_chunks(chunks: &mut Vec<u32>, tensor: usize, len: usize) {
    for c in 0..len.div_ceil(CHUNK) {
        chunks.extend([tensor as u32, c as u32]);
    }
}

/// kernels/adamw.cu's launch for a chunk table of `blocks` pairs: one block of 256 threads per
/// chunk.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn launch_shape(blocks: usize) -> LaunchShape {
    LaunchShape {
        grid: (blocks as u32, 1, 1),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check(tensors: &[AdamWTensor]) -> candle_core::Result<Option<Device>> {
    let Some(first) = tensors.first() else {
        return Ok(None);
    };
    let device = first.param.device().clone();
    for (i, x) in tensors.iter().enumerate() {
        let dims = x.param.dims();
        for (what, t) in [
            ("param", x.param.as_tensor()),
            ("m", x.m.as_tensor()),
            ("v", x.v.as_tensor()),
            ("grad", x.grad),
        ] {
            if t.dtype() != DType::F32 || t.dims() != dims || !t.device().same_device(&device) {
                candle_core::bail!(
                    "adamw: tensor {i}'s {what} is {:?} {:?} on {:?}; its param is F32 {dims:?} on {:?}",
                    t.dtype(),
                    t.dims(),
                    t.device().location(),
                    device.location()
                );
            }
        }
        if x.t == 0 {
            candle_core::bail!("adamw: tensor {i}'s update count t is 0 (it is 1-based)");
        }
    }
    Ok(Some(device))
}

/// Applies one AdamW step to every tensor (all on one device, f32); p, m and v in place.
pub fn adamw_step(tensors: &[AdamWTensor], h: &AdamWHyper) -> candle_core::Result<()> {
    match check(tensors)? {
        None => Ok(()),
        Some(Device::Cpu) => cpu_step(tensors, h),
        #[cfg(feature = "cuda")]
        Some(Device::Cuda(dev)) => cuda::step(&dev, tensors, h),
        Some(other) => candle_core::bail!("adamw: no kernel for {:?}", other.location()),
    }
}

/// The reference: each tensor read into a Vec, updated element by element, written back.
fn cpu_step(tensors: &[AdamWTensor], h: &AdamWHyper) -> candle_core::Result<()> {
    let (b1, omb1) = (h.beta1 as f32, (1.0 - h.beta1) as f32);
    let (b2, omb2) = (h.beta2 as f32, (1.0 - h.beta2) as f32);
    let eps = h.eps as f32;
    for x in tensors {
        let (decay, step, inv_b2) = scalars(h, x.t);
        let read = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (mut p, mut m, mut v) = (
            read(x.param.as_tensor())?,
            read(x.m.as_tensor())?,
            read(x.v.as_tensor())?,
        );
        let g = read(x.grad)?;
        for i in 0..p.len() {
            let d = p[i] * decay;
            m[i] = m[i] * b1 + g[i] * omb1;
            v[i] = v[i] * b2 + (g[i] * g[i]) * omb2;
            let denom = v[i].sqrt() * inv_b2 + eps;
            p[i] = d - (m[i] / denom) * step;
        }
        let shape = x.param.shape();
        let dev = x.param.device();
        x.param.set(&Tensor::from_vec(p, shape, dev)?)?;
        x.m.set(&Tensor::from_vec(m, shape, dev)?)?;
        x.v.set(&Tensor::from_vec(v, shape, dev)?)?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{
        kernel_scalars, launch_shape, meta_row, push_chunks, AdamWHyper, AdamWTensor, CHUNK,
    };
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{Storage, Tensor};

    pub(super) fn step(
        dev: &CudaDevice,
        tensors: &[AdamWTensor],
        h: &AdamWHyper,
    ) -> candle_core::Result<()> {
        let stream = dev.cuda_stream();
        // Read guards of every storage, held until the launch is queued (the kernel writes
        // p, m and v through their addresses: the caller owns them, see the module doc).
        let all: Vec<&Tensor> = tensors
            .iter()
            .flat_map(|x| {
                [
                    x.param.as_tensor(),
                    x.m.as_tensor(),
                    x.v.as_tensor(),
                    x.grad,
                ]
            })
            .collect();
        let guards: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
        let mut meta = Vec::with_capacity(7 * tensors.len());
        let mut chunks = Vec::new();
        let mut records = Vec::new();
        for (i, x) in tensors.iter().enumerate() {
            let mut addresses = [0u64; 4];
            for (a, (storage, layout)) in addresses.iter_mut().zip(&guards[4 * i..4 * i + 4]) {
                let Storage::Cuda(s) = &**storage else {
                    candle_core::bail!("adamw: tensor {i} is not on the CUDA device");
                };
                let (start, _) = layout.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg(format!("adamw: tensor {i} is not contiguous"))
                })?;
                let (ptr, record) = s.as_cuda_slice::<f32>()?.device_ptr(&stream);
                *a = ptr + (start * 4) as u64;
                records.push(record);
            }
            let len = x.param.elem_count();
            meta.extend(meta_row(addresses, len, h, x.t));
            push_chunks(&mut chunks, i, len);
        }
        if chunks.is_empty() {
            return Ok(());
        }
        let meta_d = dev.clone_htod(&meta)?;
        let chunks_d = dev.clone_htod(&chunks)?;
        let f = dev.get_or_load_custom_func("adamw_multi", "adamw", crate::ptx::ADAMW)?;
        let chunk_len = CHUNK as i32;
        let [b1, omb1, b2, omb2, eps] = kernel_scalars(h);
        let mut b = f.builder();
        b.arg(&meta_d)
            .arg(&chunks_d)
            .arg(&chunk_len)
            .arg(&b1)
            .arg(&omb1)
            .arg(&b2)
            .arg(&omb2)
            .arg(&eps);
        let cfg = LaunchConfig::from(launch_shape(chunks.len() / 2));
        unsafe { b.launch(cfg) }.w()?;
        drop(records);
        drop(guards);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::tensor;

    const H: AdamWHyper = AdamWHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };

    /// Three tensors (one spanning several CUDA chunks) with moments from earlier steps and
    /// different update counts.
    fn sample(device: &Device) -> Vec<(Var, Var, Var, Tensor, u64)> {
        [(vec![16, 300], 1u64), (vec![5], 3), (vec![7, 11], 10)]
            .into_iter()
            .enumerate()
            .map(|(i, (shape, t))| {
                let on = |x: Tensor| x.to_device(device).unwrap();
                let salt = 100 * i as u64;
                (
                    Var::from_tensor(&on(tensor(&shape, salt + 1))).unwrap(),
                    Var::from_tensor(&on((tensor(&shape, salt + 2) * 0.01).unwrap())).unwrap(),
                    Var::from_tensor(&on(
                        (tensor(&shape, salt + 3).sqr().unwrap() * 1e-4).unwrap()
                    ))
                    .unwrap(),
                    on(tensor(&shape, salt + 4)),
                    t,
                )
            })
            .collect()
    }

    fn run(s: &[(Var, Var, Var, Tensor, u64)]) {
        let ts: Vec<AdamWTensor> = s
            .iter()
            .map(|(p, m, v, g, t)| AdamWTensor {
                param: p,
                m,
                v,
                grad: g,
                t: *t,
            })
            .collect();
        adamw_step(&ts, &H).unwrap();
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_device(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// The doc comment's formula written with candle ops on whole tensors (as finetune-train's
    /// AdamW::step writes it; tests/adamw_multi.rs there compares with that code itself).
    #[test]
    fn cpu_step_equals_the_formula_in_candle_ops_bit_for_bit() {
        let s = sample(&Device::Cpu);
        let want: Vec<_> = s
            .iter()
            .map(|(p, m, v, g, t)| {
                let bias1 = 1.0 - H.beta1.powi(*t as i32);
                let bias2_sqrt = (1.0 - H.beta2.powi(*t as i32)).sqrt();
                let d = (p.as_tensor() * (1.0 - H.lr * H.weight_decay)).unwrap();
                let m =
                    ((m.as_tensor() * H.beta1).unwrap() + (g * (1.0 - H.beta1)).unwrap()).unwrap();
                let v = ((v.as_tensor() * H.beta2).unwrap()
                    + (g.sqr().unwrap() * (1.0 - H.beta2)).unwrap())
                .unwrap();
                let denom = ((v.sqrt().unwrap() / bias2_sqrt).unwrap() + H.eps).unwrap();
                let p = (d - (m.div(&denom).unwrap() * (H.lr / bias1)).unwrap()).unwrap();
                (values(&p), values(&m), values(&v))
            })
            .collect();
        run(&s);
        for (i, ((p, m, v, _, _), (wp, wm, wv))) in s.iter().zip(&want).enumerate() {
            assert_eq!(&values(p.as_tensor()), wp, "param {i}");
            assert_eq!(&values(m.as_tensor()), wm, "m {i}");
            assert_eq!(&values(v.as_tensor()), wv, "v {i}");
        }
    }

    #[test]
    fn mismatched_shapes_and_zero_counts_are_refused() {
        let s = sample(&Device::Cpu);
        let other = tensor(&[5], 9);
        let bad = AdamWTensor {
            param: &s[0].0,
            m: &s[0].1,
            v: &s[0].2,
            grad: &other,
            t: 1,
        };
        let err = adamw_step(&[bad], &H).unwrap_err().to_string();
        assert!(err.contains("grad") && err.contains("[16, 300]"), "{err}");
        let zero = AdamWTensor {
            param: &s[1].0,
            m: &s[1].1,
            v: &s[1].2,
            grad: &s[1].3,
            t: 0,
        };
        let err = adamw_step(&[zero], &H).unwrap_err().to_string();
        assert!(err.contains("1-based"), "{err}");
    }

    /// kernels/adamw.cu run on the CPU by finetune-kernel-emu in both fiber orders, with the
    /// metadata table, chunk table, scalars and geometry the CUDA path builds (the same
    /// functions; the "device addresses" are those of the emulator's buffers): p, m and v bit
    /// for bit the CPU reference's (no tolerance: the kernel does the reference's f32
    /// operations in its order, each rounded once, and √ and ÷ are correctly rounded on both).
    /// Tensors of 8,194 elements (two full chunks and a 2-element one), exactly one chunk, 5,
    /// 77 and none (no chunk at all, its row still in the table), at different update counts.
    #[test]
    fn emulated_kernel_equals_the_cpu_reference_bit_for_bit() {
        use finetune_kernel_emu::{launch, Buffer, Order};
        extern "C" {
            fn adamw_multi(
                meta: *const u64,
                chunks: *const u32,
                chunk_len: i32,
                beta1: f32,
                one_minus_beta1: f32,
                beta2: f32,
                one_minus_beta2: f32,
                eps: f32,
            );
        }
        let shapes = [
            (vec![2, 4097], 1u64),
            (vec![5], 3),
            (vec![0], 2),
            (vec![4096], 7),
            (vec![7, 11], 10),
        ];
        let sample: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(i, (shape, t))| {
                let salt = 100 * i as u64;
                (
                    tensor(shape, salt + 1),
                    (tensor(shape, salt + 2) * 0.01).unwrap(),
                    (tensor(shape, salt + 3).sqr().unwrap() * 1e-4).unwrap(),
                    tensor(shape, salt + 4),
                    *t,
                )
            })
            .collect();
        // The reference, on Vars holding copies.
        let cpu: Vec<_> = sample
            .iter()
            .map(|(p, m, v, g, t)| {
                let var = |x: &Tensor| Var::from_tensor(&x.copy().unwrap()).unwrap();
                (var(p), var(m), var(v), g.clone(), *t)
            })
            .collect();
        run(&cpu);
        for order in Order::BOTH {
            let buffers: Vec<[Buffer<f32>; 4]> = sample
                .iter()
                .map(|(p, m, v, g, _)| [p, m, v, g].map(|x| Buffer::from_slice(&values(x))))
                .collect();
            let (mut meta, mut chunks) = (Vec::new(), Vec::new());
            for (i, (b, (_, _, _, _, t))) in buffers.iter().zip(&sample).enumerate() {
                let addresses = [0, 1, 2, 3].map(|j| b[j].ptr() as u64);
                meta.extend(meta_row(addresses, b[0].len(), &H, *t));
                push_chunks(&mut chunks, i, b[0].len());
            }
            // 3 + 1 + 0 + 1 + 1 chunks.
            assert_eq!(chunks.len() / 2, 6);
            let (meta_b, chunks_b) = (Buffer::from_slice(&meta), Buffer::from_slice(&chunks));
            let [b1, omb1, b2, omb2, eps] = kernel_scalars(&H);
            launch(launch_shape(chunks.len() / 2).into(), order, || unsafe {
                adamw_multi(
                    meta_b.ptr(),
                    chunks_b.ptr(),
                    CHUNK as i32,
                    b1,
                    omb1,
                    b2,
                    omb2,
                    eps,
                )
            })
            .unwrap();
            for (i, (b, want)) in buffers.iter().zip(&cpu).enumerate() {
                for (j, (what, w)) in [("param", &want.0), ("m", &want.1), ("v", &want.2)]
                    .into_iter()
                    .enumerate()
                {
                    let got = b[j].to_vec();
                    assert_eq!(
                        finetune_kernel_emu::first_bit_difference(&got, &values(w.as_tensor())),
                        None,
                        "tensor {i} {what}, {order:?}"
                    );
                }
                // The gradient is only read.
                assert_eq!(b[3].to_vec(), values(&sample[i].3), "tensor {i} grad");
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_step_equals_the_cpu_reference_bit_for_bit() {
        let Some(gpu) = crate::common::test::gpu() else {
            return;
        };
        let (cpu, dev) = (sample(&Device::Cpu), sample(&gpu));
        for _ in 0..3 {
            run(&cpu);
            run(&dev);
        }
        let mut worst = 0f32;
        for (i, (a, b)) in cpu.iter().zip(&dev).enumerate() {
            for (what, x, y) in [("param", &a.0, &b.0), ("m", &a.1, &b.1), ("v", &a.2, &b.2)] {
                let (x, y) = (values(x.as_tensor()), values(y.as_tensor()));
                for (u, w) in x.iter().zip(&y) {
                    worst = worst.max((u - w).abs());
                }
                assert_eq!(x, y, "tensor {i} {what}");
            }
        }
        eprintln!("adamw cuda: 3 steps, max abs diff vs CPU {worst:e}");
    }
}
