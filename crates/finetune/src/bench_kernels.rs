//! `finetune bench kernels`: every fused op of finetune-kernels at the layer shapes of a preset,
//! timed with the device synchronized around each call, next to candle's own matmul (cuBLAS on a
//! GPU, the `gemm` crate on the CPU) or element-wise copy on the same sizes, measured in the same
//! run: issue #9's "per-kernel TFLOPS vs cuBLAS GEMM of the same size".
//!
//! What each row counts (T = `--seq` tokens, one document; h hidden, H query heads of dim d,
//! E experts of which k active, i the expert width, V the vocabulary, r the rank):
//! - `frozen_linear` (q_proj, x [T, h] · W [H·d, h]ᵀ): 2·T·h·H·d flops forward, twice that for
//!   forward + dX; baseline: candle's matmul x·Wᵀ.
//! - `lora_linear` (q_proj with its adapter): the frozen product plus 2·T·r·(h + H·d); baseline
//!   the frozen product's matmul.
//! - `grouped_linear` (gate_proj of all experts, T·k rows split evenly over E experts):
//!   2·T·k·h·i; baseline: one matmul [T·k, h]·[h, i] of the same flops.
//! - `grouped_linear(cublas grouped call)` (GPU): the same GEMMs as one
//!   `cublasGemmGroupedBatchedEx` call (`FINETUNE_GROUPED_GEMM_CUBLAS=1`).
//! - `grouped_linear_frozen(fp8)` (GPU): the same from an FP8 block-128 stack dequantized in the op.
//! - `grouped_gemm(fp8 kernel)` (GPU, bf16): the same product by kernels/grouped_gemm.cu, one
//!   launch for all experts reading the FP8 stack directly; forward + dX = its nt then nn
//!   launches; baseline: `grouped_linear_frozen(fp8)`'s forward.
//! - `fp8_linear` (GPU, bf16, q_proj's shape) and `fp8_grouped_linear` (GPU, the experts' shape):
//!   the FP8 tensor-core GEMM including the activations' quantization, the same flops as their
//!   bf16 rows; baselines: candle's bf16 matmul and the bf16 `grouped_linear`. Each also as a
//!   percentage of the H100 SXM's dense FP8 peak, 1,978.9 TFLOPS (the bf16 baseline of 989.4).
//! - `causal_attention` (scalar kernels) and `causal_attention(tensor-core)` (GPU, bf16, d 64 or
//!   128): 2·T²·d·H useful flops forward (the causal half of QKᵀ and PV), 7·T²·d·H forward +
//!   backward (5 products in the backward); baseline: one full batched QKᵀ [H, T, d]·[H, d, T]
//!   (2·T²·d·H flops, the forward's count).
//! - `linear_cross_entropy` (h [T, h] against V rows): 4·T·h·V flops (logits and dh, both in
//!   its forward); baseline: the logits matmul alone (2·T·h·V).
//! - `rms_norm`, `swiglu`, `rope`, `fp8_dequant` (GPU): bytes read + written, as GB/s; baseline:
//!   candle's affine (a read and a write) on the same elements.
//!
//! The backward timings include the multiply by an upstream gradient, its sum and their
//! backward (small next to the products, not next to the element-wise ops, which are timed
//! forward only).

use crate::cli::BenchKernelsArgs;
use crate::Outcome;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use finetune_model::Preset;
use std::sync::Arc;
use std::time::Instant;

/// One measured op.
#[derive(serde::Serialize)]
struct Row {
    op: String,
    shape: String,
    /// Forward, median seconds.
    fwd_s: f64,
    /// Forward + backward, median seconds (products only).
    fwd_bwd_s: Option<f64>,
    /// Work per forward: flops for products, bytes for memory-bound ops.
    work: f64,
    /// Work per forward + backward.
    work_bwd: Option<f64>,
    /// "TFLOPS" or "GB/s".
    unit: &'static str,
    fwd_rate: f64,
    fwd_bwd_rate: Option<f64>,
    baseline: String,
    baseline_s: f64,
    baseline_rate: f64,
    /// fwd_rate / baseline_rate.
    ratio: f64,
    /// FP8 GEMM rows: fwd_rate as a percentage of [`H100_FP8_DENSE_TFLOPS`].
    #[serde(skip_serializing_if = "Option::is_none")]
    fp8_peak_pct: Option<f64>,
}

/// Dense (no 2:4 sparsity) tensor-core peaks of the H100 SXM5, NVIDIA's H100 datasheet (3,958 FP8
/// and 1,979 BF16 TFLOPS "with sparsity", half of each without); the H200 SXM lists the same.
const H100_FP8_DENSE_TFLOPS: f64 = 1978.9;
const H100_BF16_DENSE_TFLOPS: f64 = 989.4;

/// Median of `iters` timed calls of `f` after `warmup` untimed ones, the device synchronized
/// before and after each.
fn time(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Deterministic values in [−1, 1) of `shape` in `dtype` on `device` (a hash of the index).
fn values(shape: &[usize], salt: u64, dtype: DType, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D);
            z = (z ^ (z >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// Forward + backward of `op` on `inputs` (made variables) with an upstream gradient of ones.
fn fwd_bwd(
    inputs: &[&Tensor],
    op: &dyn Fn(&[&Tensor]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<()> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t))
        .collect::<candle_core::Result<_>>()?;
    let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let y = op(&ts)?;
    y.to_dtype(DType::F32)?.sum_all()?.backward()?;
    Ok(())
}

pub fn kernels(args: &BenchKernelsArgs) -> Result<Outcome> {
    if args.seq < 2 || args.iters == 0 {
        bail!(
            "flags --seq = {} and --iters = {}: need at least 2 tokens and 1 iteration",
            args.seq,
            args.iters
        );
    }
    let preset = Preset::ALL
        .into_iter()
        .find(|p| p.name() == args.preset)
        .with_context(|| {
            let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
            format!("flag --preset = {}: expected one of {names:?}", args.preset)
        })?;
    let device = if args.cpu || !finetune_kernels::BUILT_WITH_CUDA {
        Device::Cpu
    } else {
        Device::new_cuda(0).context("opening CUDA device 0 (use --cpu to bench the CPU)")?
    };
    let dtype = match (args.dtype.as_deref(), device.is_cpu()) {
        (Some("f32"), _) | (None, true) => DType::F32,
        (Some("bf16"), false) | (None, false) => DType::BF16,
        (Some("bf16"), true) => bail!("flag --dtype = bf16: the CPU computes in f32"),
        (Some(other), _) => bail!("flag --dtype = {other}: expected f32 or bf16"),
    };
    let c = preset.config();
    let (t, h, nh, nkv, d) = (
        args.seq,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim(),
    );
    let (e, k, i, v, r) = (
        c.num_experts,
        c.num_experts_per_tok,
        c.moe_intermediate_size,
        c.vocab_size,
        args.rank,
    );
    let machine = match finetune_kernels::device::cuda_devices() {
        Ok(gpus) if !device.is_cpu() && !gpus.is_empty() => gpus[0].name.clone(),
        _ => format!(
            "CPU, {} threads",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    };
    println!(
        "finetune bench kernels --preset {} --seq {t} --iters {} ({machine}, {dtype:?})",
        preset.name(),
        args.iters
    );
    let (w0, it) = (args.warmup, args.iters);
    let time = |f: &mut dyn FnMut() -> candle_core::Result<()>| time(&device, w0, it, f);
    let size = dtype.size_in_bytes() as f64;
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |op: &str,
                    shape: String,
                    (fwd_s, fwd_bwd_s): (f64, Option<f64>),
                    (work, work_bwd): (f64, Option<f64>),
                    unit: &'static str,
                    (baseline, baseline_s, baseline_work): (&str, f64, f64)| {
        let scale = if unit == "TFLOPS" { 1e12 } else { 1e9 };
        let fwd_rate = work / fwd_s / scale;
        let baseline_rate = baseline_work / baseline_s / scale;
        let row = Row {
            op: op.into(),
            shape,
            fwd_s,
            fwd_bwd_s,
            work,
            work_bwd,
            unit,
            fwd_rate,
            fwd_bwd_rate: fwd_bwd_s.zip(work_bwd).map(|(s, w)| w / s / scale),
            baseline: baseline.into(),
            baseline_s,
            baseline_rate,
            ratio: fwd_rate / baseline_rate,
            fp8_peak_pct: None,
        };
        println!(
            "{:<34} {:<28} fwd {:>9.3} ms {:>8.2} {unit}  fwd+bwd {:>9}  baseline {} {:.2} {unit}  ratio {:.2}",
            row.op,
            row.shape,
            row.fwd_s * 1e3,
            row.fwd_rate,
            row.fwd_bwd_rate
                .map_or("-".into(), |r| format!("{r:.2} {unit}")),
            row.baseline,
            row.baseline_rate,
            row.ratio
        );
        rows.push(row);
    };

    // Frozen projection and LoRA linear at q_proj's shape.
    let out = nh * d;
    let x = values(&[t, h], 1, dtype, &device)?;
    let w = values(&[out, h], 2, dtype, &device)?;
    let gemm_s = time(&mut || x.matmul(&w.t()?).map(|_| ()))?;
    let flops = 2.0 * (t * h * out) as f64;
    let frozen = |ts: &[&Tensor]| finetune_kernels::frozen_linear(ts[0], &w);
    let fwd = time(&mut || frozen(&[&x]).map(|_| ()))?;
    let bwd = time(&mut || fwd_bwd(&[&x], &frozen))?;
    push(
        "frozen_linear",
        format!("[{t}, {h}]·[{out}, {h}]ᵀ"),
        (fwd, Some(bwd)),
        (flops, Some(2.0 * flops)),
        "TFLOPS",
        ("matmul", gemm_s, flops),
    );
    let (a, b) = (
        values(&[r, h], 3, DType::F32, &device)?,
        values(&[out, r], 4, DType::F32, &device)?,
    );
    let lora_flops = flops + 2.0 * (t * r * (h + out)) as f64;
    let lora = |ts: &[&Tensor]| finetune_kernels::lora_linear(ts[0], &w, ts[1], ts[2], 2.0);
    let fwd = time(&mut || lora(&[&x, &a, &b]).map(|_| ()))?;
    let bwd = time(&mut || fwd_bwd(&[&x, &a, &b], &lora))?;
    push(
        "lora_linear",
        format!("[{t}, {h}]·[{out}, {h}]ᵀ r {r}"),
        (fwd, Some(bwd)),
        // Backward: dX through W and the adapter, dA, dB (3 products the size of the forward's).
        (
            lora_flops,
            Some(lora_flops + flops + 4.0 * (t * r * (h + out)) as f64),
        ),
        "TFLOPS",
        ("matmul", gemm_s, flops),
    );

    // Experts: gate_proj of all experts, tokens split evenly.
    let n = t * k;
    let offsets: Arc<Vec<usize>> = Arc::new((0..=e).map(|j| j * n / e).collect());
    let xe = values(&[n, h], 5, dtype, &device)?;
    let we = values(&[e, i, h], 6, dtype, &device)?;
    let wd = values(&[h, i], 7, dtype, &device)?;
    let flops = 2.0 * (n * h * i) as f64;
    let dense_s = time(&mut || xe.matmul(&wd).map(|_| ()))?;
    let grouped = |ts: &[&Tensor]| finetune_kernels::grouped_linear(ts[0], &we, &offsets, false);
    let fwd = time(&mut || grouped(&[&xe]).map(|_| ()))?;
    let bwd = time(&mut || fwd_bwd(&[&xe], &grouped))?;
    push(
        "grouped_linear",
        format!("{e}× [{}, {h}]·[{i}, {h}]ᵀ", n / e),
        (fwd, Some(bwd)),
        (flops, Some(2.0 * flops)),
        "TFLOPS",
        ("matmul (one GEMM, same flops)", dense_s, flops),
    );
    if !device.is_cpu() {
        // The same GEMMs as one grouped cuBLAS call (opt-in path of grouped_linear).
        let before = finetune_kernels::grouped_linear::cublas_grouped();
        finetune_kernels::grouped_linear::set_cublas_grouped(true);
        let fwd = time(&mut || grouped(&[&xe]).map(|_| ()));
        let bwd = time(&mut || fwd_bwd(&[&xe], &grouped));
        finetune_kernels::grouped_linear::set_cublas_grouped(before);
        push(
            "grouped_linear(cublas grouped call)",
            format!("{e}× [{}, {h}]·[{i}, {h}]ᵀ", n / e),
            (fwd?, Some(bwd?)),
            (flops, Some(2.0 * flops)),
            "TFLOPS",
            ("matmul (one GEMM, same flops)", dense_s, flops),
        );
        // FP8 block-128 stack as the GPU holds it: E4M3 bytes (U8; no NaN patterns) and scales.
        let bytes: Vec<u8> = (0..e * i * h)
            .map(|j| ((j * 37) % 0x70) as u8 | if j % 3 == 0 { 0x80 } else { 0 })
            .collect();
        let q = Tensor::from_vec(bytes, (e * i, h), &device)?;
        let scales = values(
            &[(e * i).div_ceil(128), h.div_ceil(128)],
            8,
            DType::F32,
            &device,
        )?
        .abs()?;
        let dq_s = time(&mut || finetune_kernels::fp8_dequant(&q, &scales, dtype).map(|_| ()))?;
        let bytes_moved = (e * i * h) as f64 * (1.0 + size);
        let copy_s = time(&mut || we.affine(1.0, 0.0).map(|_| ()))?;
        push(
            "fp8_dequant",
            format!("[{}, {h}]", e * i),
            (dq_s, None),
            (bytes_moved, None),
            "GB/s",
            ("affine copy", copy_s, 2.0 * (e * i * h) as f64 * size),
        );
        let (q2, s2) = (q.clone(), scales.clone());
        let weight: finetune_kernels::WeightFn =
            Arc::new(move || finetune_kernels::fp8_dequant(&q2, &s2, dtype)?.reshape((e, i, h)));
        let frozen8 = |ts: &[&Tensor]| {
            finetune_kernels::grouped_linear_frozen(ts[0], weight.clone(), (e, i, h), &offsets)
        };
        let fwd = time(&mut || frozen8(&[&xe]).map(|_| ()))?;
        let bwd = time(&mut || fwd_bwd(&[&xe], &frozen8))?;
        push(
            "grouped_linear_frozen(fp8)",
            format!("{e}× [{}, {h}]·[{i}, {h}]ᵀ", n / e),
            (fwd, Some(bwd)),
            (flops, Some(2.0 * flops)),
            "TFLOPS",
            ("matmul (one GEMM, same flops)", dense_s, flops),
        );
        if dtype == DType::BF16 {
            // The same product by the one-launch grouped kernel reading the FP8 stack directly
            // (finetune_kernels::grouped_gemm, not wired into the model): forward = nt, forward
            // + dX = nt then nn, against the dequantize + per-expert cuBLAS path just above.
            let frozen8_fwd_s = fwd;
            let q3 = q.reshape((e, i, h))?;
            let s3 = values(
                &[e, i.div_ceil(128), h.div_ceil(128)],
                23,
                DType::F32,
                &device,
            )?
            .abs()?;
            let dy = values(&[n, i], 24, dtype, &device)?;
            let experts = || finetune_kernels::grouped_gemm::Experts::Fp8 {
                q: &q3,
                scale_inv: &s3,
            };
            let gg = |x: &Tensor, nn: bool| {
                finetune_kernels::grouped_gemm::grouped_gemm(x, experts(), &offsets, nn)
            };
            let fwd = time(&mut || gg(&xe, false).map(|_| ()))?;
            let bwd = time(&mut || gg(&xe, false).and_then(|_| gg(&dy, true)).map(|_| ()))?;
            push(
                "grouped_gemm(fp8 kernel)",
                format!("{e}× [{}, {h}]·[{i}, {h}]ᵀ", n / e),
                (fwd, Some(bwd)),
                (flops, Some(2.0 * flops)),
                "TFLOPS",
                ("grouped_linear_frozen(fp8)", frozen8_fwd_s, flops),
            );
        }
        // The FP8 tensor-core GEMM (finetune_kernels::fp8_linear: activations quantized per
        // row and 128 columns, block-scaled cuBLASLt), timed with its quantization, against
        // cuBLAS bf16 of the same size: q_proj's dense shape, then the experts' grouped one.
        use finetune_kernels::fp8_linear::unsupported;
        match unsupported(dtype, &device, out, h).or_else(|| unsupported(dtype, &device, i, h)) {
            Some(why) => println!("fp8_linear: skipped ({why})"),
            None => {
                let qd = Tensor::from_vec(
                    (0..out * h)
                        .map(|j| ((j * 37) % 0x70) as u8 | if j % 3 == 0 { 0x80 } else { 0 })
                        .collect::<Vec<u8>>(),
                    (out, h),
                    &device,
                )?;
                let sd = values(&[out.div_ceil(128), h / 128], 21, DType::F32, &device)?.abs()?;
                let lin8 = |ts: &[&Tensor]| finetune_kernels::fp8_linear(ts[0], &qd, &sd);
                let fwd = time(&mut || lin8(&[&x]).map(|_| ()))?;
                let bwd = time(&mut || fwd_bwd(&[&x], &lin8))?;
                let flops = 2.0 * (t * h * out) as f64;
                push(
                    "fp8_linear",
                    format!("[{t}, {h}]·[{out}, {h}]ᵀ fp8"),
                    (fwd, Some(bwd)),
                    (flops, Some(2.0 * flops)),
                    "TFLOPS",
                    ("matmul bf16", gemm_s, flops),
                );
                let q3 = q.reshape((e, i, h))?;
                let s3 = values(&[e, i.div_ceil(128), h / 128], 22, DType::F32, &device)?.abs()?;
                let grouped8 = |ts: &[&Tensor]| {
                    finetune_kernels::fp8_grouped_linear(ts[0], &q3, &s3, &offsets)
                };
                let fwd = time(&mut || grouped8(&[&xe]).map(|_| ()))?;
                let bwd = time(&mut || fwd_bwd(&[&xe], &grouped8))?;
                let flops = 2.0 * (n * h * i) as f64;
                let bf16_grouped_s = time(&mut || grouped(&[&xe]).map(|_| ()))?;
                push(
                    "fp8_grouped_linear",
                    format!("{e}× [{}, {h}]·[{i}, {h}]ᵀ fp8", n / e),
                    (fwd, Some(bwd)),
                    (flops, Some(2.0 * flops)),
                    "TFLOPS",
                    ("grouped_linear bf16", bf16_grouped_s, flops),
                );
            }
        }
    }

    // Attention over one document of T tokens.
    let q = values(&[t, nh, d], 9, dtype, &device)?;
    let kk = values(&[nkv, t, d], 10, dtype, &device)?;
    let vv = values(&[nkv, t, d], 11, dtype, &device)?;
    let doc_start = vec![0u32; t];
    let scale = 1.0 / (d as f64).sqrt();
    let qh = values(&[nh, t, d], 12, dtype, &device)?;
    let kh = values(&[nh, d, t], 13, dtype, &device)?;
    let flops = 2.0 * (t * t * d * nh) as f64;
    let qk_s = time(&mut || qh.matmul(&kh).map(|_| ()))?;
    let kernels: &[bool] =
        if !device.is_cpu() && finetune_kernels::attention::tensor_cores_cover(d, dtype) {
            &[false, true]
        } else {
            &[false]
        };
    for &tc in kernels {
        finetune_kernels::attention::set_tensor_cores(tc);
        let attn = |ts: &[&Tensor]| {
            finetune_kernels::causal_attention(ts[0], ts[1], ts[2], &doc_start, 0, scale)
        };
        let fwd = time(&mut || attn(&[&q, &kk, &vv]).map(|_| ()))?;
        let bwd = time(&mut || fwd_bwd(&[&q, &kk, &vv], &attn))?;
        push(
            if tc {
                "causal_attention(tensor-core)"
            } else {
                "causal_attention"
            },
            format!("T {t}, {nh}/{nkv} heads, d {d}"),
            (fwd, Some(bwd)),
            (flops, Some(3.5 * flops)),
            "TFLOPS",
            ("batched matmul QKᵀ", qk_s, flops),
        );
    }
    finetune_kernels::attention::set_tensor_cores(false);

    // The head: lm_head + cross-entropy, chunked.
    let hh = values(&[t, h], 14, dtype, &device)?;
    let head = values(&[v, h], 15, dtype, &device)?;
    let targets: Vec<i64> = (0..t as i64).map(|j| (j * 7919) % v as i64).collect();
    let logits_s = time(&mut || hh.matmul(&head.t()?).map(|_| ()))?;
    let flops = 2.0 * (t * h * v) as f64;
    let ce = |ts: &[&Tensor]| finetune_kernels::linear_cross_entropy(ts[0], &head, &targets, None);
    let fwd = time(&mut || ce(&[&hh]).map(|_| ()))?;
    let bwd = time(&mut || fwd_bwd(&[&hh], &ce))?;
    push(
        "linear_cross_entropy",
        format!("[{t}, {h}]·[{v}, {h}]ᵀ"),
        (fwd, Some(bwd)),
        (2.0 * flops, Some(2.0 * flops)),
        "TFLOPS",
        ("matmul (logits only)", logits_s, flops),
    );

    // Element-wise ops, forward only, against a read + write of the same elements.
    let norm_w = values(&[h], 16, DType::F32, &device)?;
    let copy_s = time(&mut || x.affine(1.0, 0.0).map(|_| ()))?;
    let elems = (t * h) as f64;
    let fwd = time(&mut || finetune_kernels::rms_norm(&x, &norm_w, 1e-6).map(|_| ()))?;
    push(
        "rms_norm",
        format!("[{t}, {h}]"),
        (fwd, None),
        (2.0 * elems * size, None),
        "GB/s",
        ("affine copy", copy_s, 2.0 * elems * size),
    );
    let g = values(&[n, i], 17, dtype, &device)?;
    let u = values(&[n, i], 18, dtype, &device)?;
    let elems = (n * i) as f64;
    let copy_s = time(&mut || g.affine(1.0, 0.0).map(|_| ()))?;
    let fwd = time(&mut || finetune_kernels::swiglu(&g, &u).map(|_| ()))?;
    push(
        "swiglu",
        format!("[{n}, {i}]"),
        (fwd, None),
        (3.0 * elems * size, None),
        "GB/s",
        ("affine copy", copy_s, 2.0 * elems * size),
    );
    let cos = values(&[t, d], 19, DType::F32, &device)?;
    let sin = values(&[t, d], 20, DType::F32, &device)?;
    let elems = (t * nh * d) as f64;
    let copy_s = time(&mut || q.affine(1.0, 0.0).map(|_| ()))?;
    let fwd = time(&mut || finetune_kernels::rope(&q, &cos, &sin).map(|_| ()))?;
    push(
        "rope",
        format!("[{t}, {nh}, {d}]"),
        (fwd, None),
        (2.0 * elems * size, None),
        "GB/s",
        ("affine copy", copy_s, 2.0 * elems * size),
    );

    for row in rows
        .iter_mut()
        .filter(|r| r.op.starts_with("fp8_") && r.unit == "TFLOPS")
    {
        let pct = 100.0 * row.fwd_rate / H100_FP8_DENSE_TFLOPS;
        println!(
            "{}: {:.1}% of the H100 SXM's dense FP8 peak ({H100_FP8_DENSE_TFLOPS} TFLOPS; its bf16 baseline {:.1}% of {H100_BF16_DENSE_TFLOPS})",
            row.op,
            pct,
            100.0 * row.baseline_rate / H100_BF16_DENSE_TFLOPS
        );
        row.fp8_peak_pct = Some(pct);
    }
    if let Some(path) = &args.json {
        let mut text = String::new();
        for row in &rows {
            text.push_str(&serde_json::to_string(row)?);
            text.push('\n');
        }
        crate::run_dir::write_atomic(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(Outcome::Done)
}
