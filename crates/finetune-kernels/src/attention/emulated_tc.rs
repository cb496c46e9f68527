//! The tensor-core attention kernels of kernels/attention.cu (`attention_{fwd,bwd_dq,bwd_dkdv}_tc_bf16_d{64,128}`,
//! WMMA, never run on a GPU when written) run on the CPU by finetune-kernel-emu, each kernel on
//! its own: the CUDA launch's argument lists (`mod cuda`: `forward_typed`, `AttentionBwd::typed`)
//! and geometry (`launch_shape`), both fiber orders, against the CPU op's forward and backward
//! (`Attention::forward` / `Attention::backward`, f32) on the same bf16 values. The backward
//! kernels get exactly the reference's inputs (its logsumexps, its output rounded to bf16 as the
//! forward stores it, its D = do·o), so each comparison sees one kernel's error only.
//!
//! Tolerance, per element, from the kernels' arithmetic: they round P (and dS) to bf16 before
//! the products P·V, Pᵀ·dO, dS·K and dSᵀ·Q, and round their outputs to bf16; everything else is
//! f32 in another order than the reference's. With u = 2⁻⁸ (bf16's unit roundoff) an output
//! element Σ_j P̃_ij·x_jc is off by at most u·Σ_j |P_ij|·|x_jc| for the rounded factors, plus
//! u·|want| for its own rounding; `within_bound` adds 2⁻¹² of the same sums, taken without
//! cancellation (dS as P·(|dP| + |D|)), for the f32 differences (scores and dP summed in
//! another order, expf against the reference's polynomial exp: relative 10⁻⁶ or so, so the
//! allowance is generous while far below u). The cases are the GPU test's
//! (`cuda_forward_and_gradients_equal_the_cpu_reference`) plus GQA groups of 1 and 3 over a
//! sequence whose last tile holds one row, and inputs at addresses that rule out `tc_load`'s
//! 16-byte vector loads.

use super::{doc_ends, dot, launch_shape, Attention, Dims, Documents, TcKernel, BLOCK};
use super::{BWD_BC, BWD_BR, FWD_BR};
use crate::common::test::data;
use candle_core::{DType, Device, Tensor};
use finetune_kernel_emu::{launch, Buffer, Order};
use half::bf16;

use super::emulated_kernels::tensor_core_kernels as kernels;

/// bf16's unit roundoff: round to nearest with 8 significant bits.
const U: f32 = 1.0 / 256.0;
/// The allowance for f32 arithmetic in another order (see the module comment).
const F32_SLACK: f32 = 1.0 / 4096.0;

/// One launch configuration: documents (`doc_start`), heads, head dim, cached keys, and whether
/// the inputs sit 2 bytes off a 16-byte boundary (the kernels' element-wise loads).
struct Case {
    doc_start: Vec<u32>,
    h: usize,
    g: usize,
    d: usize,
    past: usize,
    misaligned: bool,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "T {} H {} G {} d {} past {}{}",
            self.doc_start.len(),
            self.h,
            self.g,
            self.d,
            self.past,
            if self.misaligned { " misaligned" } else { "" }
        )
    }

    fn dims(&self) -> Dims {
        let t = self.doc_start.len();
        Dims {
            t,
            h: self.h,
            g: self.g,
            d: self.d,
            s: self.past + t,
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

fn doc_start(docs: &[(u32, u32)]) -> Vec<u32> {
    docs.iter()
        .flat_map(|&(start, len)| std::iter::repeat_n(start, len as usize))
        .collect()
}

/// The GPU test's cases for head dim `d` — 70 tokens in 4 documents (64-row tiles cross
/// document edges) and 150 in 3 (several 64-row tiles, a one-token document), 4 query heads
/// on 2 key/value heads, without and with 5 cached keys — then 65 tokens, a one-token
/// document and one of 64 (the second 64-row tile holds one row, the last query of the
/// first key tile's document: dk/dv's query range ends exactly there), for groups of 1 and 3
/// heads, and 70 tokens from misaligned inputs.
fn cases(d: usize) -> Vec<Case> {
    let gpu_test: [&[(u32, u32)]; 2] = [
        &[(0, 20), (20, 1), (21, 30), (51, 19)],
        &[(0, 60), (60, 1), (61, 89)],
    ];
    let mut cases = Vec::new();
    for docs in gpu_test {
        for past in [0, 5] {
            cases.push(Case {
                doc_start: doc_start(docs),
                h: 4,
                g: 2,
                d,
                past,
                misaligned: false,
            });
        }
    }
    for (h, g, past) in [(2, 2, 3), (3, 1, 0)] {
        cases.push(Case {
            doc_start: doc_start(&[(0, 1), (1, 64)]),
            h,
            g,
            d,
            past,
            misaligned: false,
        });
    }
    cases.push(Case {
        doc_start: doc_start(gpu_test[0]),
        h: 2,
        g: 1,
        d,
        past: 5,
        misaligned: true,
    });
    cases
}

/// The case's inputs (bf16 values, as f32), the CPU reference's forward and backward on them,
/// and the magnitudes of the sums each output element is made of (for `bound`).
struct Reference {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
    /// D = do·o of o rounded to bf16 (what the forward stores and the backward reads).
    big_d: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// Per output element, the sums its rounded factors enter, without cancellation
    /// (`bound`): o Σ_j P_ij·|v_jx|; dq scale·Σ_j |dS_ij|·|k_jx| and, for the f32 allowance,
    /// scale·Σ_j P_ij (|dP_ij| + |D_i|)·|k_jx|; dk the same over the queries and heads that
    /// see the key, with |q_ix|; dv Σ_i P_ij·|do_ix|.
    o_mag: Vec<f32>,
    dq_mag: Vec<f32>,
    dq_slack: Vec<f32>,
    dk_mag: Vec<f32>,
    dk_slack: Vec<f32>,
    dv_mag: Vec<f32>,
}

fn bf16_data(n: usize, salt: u64) -> Vec<f32> {
    data(n, salt)
        .into_iter()
        .map(|x| bf16::from_f32(x).to_f32())
        .collect()
}

fn reference(case: &Case) -> Reference {
    let n = case.dims();
    let Dims { t, h, g, d, s } = n;
    let (q, k, v, d_o) = (
        bf16_data(t * h * d, 51),
        bf16_data(g * s * d, 52),
        bf16_data(g * s * d, 53),
        bf16_data(t * h * d, 54),
    );
    let docs = Documents::new(&case.doc_start, &Device::Cpu).unwrap();
    let shape =
        |dims: (usize, usize, usize)| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let (qt, kt) = (shape((t, h, d)), shape((g, s, d)));
    let op = Attention::new(
        &qt,
        &kt,
        &kt,
        &docs,
        case.past,
        case.scale() as f64,
        BLOCK,
        false,
    )
    .unwrap();
    let (o, lse) = op.forward(&q, &k, &v, &n);
    let o_bf16: Vec<f32> = o.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    let (dq, dk, dv) = op.backward(&q, &k, &v, &o_bf16, &d_o, &lse, &n);
    // The reference's D (Attention::backward's own), which the kernels get too.
    let big_d: Vec<f32> = d_o
        .chunks(d)
        .zip(o_bf16.chunks(d))
        .map(|(a, b)| dot(a, b))
        .collect();
    // P and dS of every visible (query, key) pair, densely, for the error bounds only.
    let mut o_mag = vec![0f32; t * h * d];
    let (mut dq_mag, mut dq_slack) = (vec![0f32; t * h * d], vec![0f32; t * h * d]);
    let (mut dk_mag, mut dk_slack) = (vec![0f32; g * s * d], vec![0f32; g * s * d]);
    let mut dv_mag = vec![0f32; g * s * d];
    let scale = case.scale();
    let add = |acc: &mut [f32], w: f32, x: &[f32]| {
        acc.iter_mut().zip(x).for_each(|(a, x)| *a += w * x.abs())
    };
    for i in 0..t {
        for head in 0..h {
            let row = i * h + head;
            let rows = row * d..(row + 1) * d;
            let kvh = head / (h / g);
            for j in 0..s {
                let visible = j < case.past
                    || (j - case.past <= i && j - case.past >= case.doc_start[i] as usize);
                if !visible {
                    continue;
                }
                let key = kvh * s + j;
                let keys = key * d..(key + 1) * d;
                let p = (dot(&q[rows.clone()], &k[keys.clone()]) * scale - lse[row]).exp();
                let dp = dot(&d_o[rows.clone()], &v[keys.clone()]);
                let ds = scale * (p * (dp - big_d[row])).abs();
                let slack = scale * p * (dp.abs() + big_d[row].abs());
                add(&mut o_mag[rows.clone()], p, &v[keys.clone()]);
                add(&mut dq_mag[rows.clone()], ds, &k[keys.clone()]);
                add(&mut dq_slack[rows.clone()], slack, &k[keys.clone()]);
                add(&mut dk_mag[keys.clone()], ds, &q[rows.clone()]);
                add(&mut dk_slack[keys.clone()], slack, &q[rows.clone()]);
                add(&mut dv_mag[keys], p, &d_o[rows.clone()]);
            }
        }
    }
    Reference {
        q,
        k,
        v,
        d_o,
        o,
        lse,
        big_d,
        dq,
        dk,
        dv,
        o_mag,
        dq_mag,
        dq_slack,
        dk_mag,
        dk_slack,
        dv_mag,
    }
}

/// Checks |got − want| ≤ u·(|want| + mag) + F32_SLACK·slack element by element; returns the
/// largest ratio of the difference to its bound (≤ 1), for the report. NaN (an element the
/// kernel left unwritten) fails.
fn within_bound(what: &str, got: &[f32], want: &[f32], mag: &[f32], slack: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0f32;
    for (e, (&a, &b)) in got.iter().zip(want).enumerate() {
        let bound = U * (b.abs() + mag[e]) + F32_SLACK * slack[e] + f32::MIN_POSITIVE;
        let ratio = (a - b).abs() / bound;
        assert!(
            ratio <= 1.0,
            "{what}: element {e} is {a}, the reference {b}: off by {} > bound {bound}",
            (a - b).abs()
        );
        worst = worst.max(ratio);
    }
    worst
}

fn upload(values: &[f32], misaligned: bool) -> Buffer<u16> {
    let bits: Vec<u16> = values
        .iter()
        .map(|&x| bf16::from_f32(x).to_bits())
        .collect();
    if misaligned {
        // One element more (a NaN the kernel must not read): the data then start 2 bytes
        // before a 16-byte boundary (the buffer ends at a page and holds a multiple of 8
        // elements plus one), so tc_load takes its element-wise path.
        assert_eq!(bits.len() % 8, 0);
        let mut padded = bits;
        padded.push(bf16::NAN.to_bits());
        let buffer = Buffer::from_slice(&padded);
        assert_eq!(buffer.ptr() as usize % 16, 14);
        buffer
    } else {
        Buffer::from_slice(&bits)
    }
}

fn download(buffer: &Buffer<u16>) -> Vec<f32> {
    buffer
        .to_vec()
        .into_iter()
        .map(|b| bf16::from_bits(b).to_f32())
        .collect()
}

/// attention_fwd_tc_bf16_d<d>: o within the bound of P's and o's rounding, the logsumexps within f32 rounding of the reference's (the same sums of
/// exponentials in another order, relative 1e-5 of max(1, |lse|)).
fn check_forward(d: usize) {
    let fwd = kernels(d).fwd;
    for case in cases(d) {
        let r = reference(&case);
        let Dims { t, h, g, .. } = case.dims();
        let what = case.name();
        for order in Order::BOTH {
            let (q, k, v) = (
                upload(&r.q, case.misaligned),
                upload(&r.k, case.misaligned),
                upload(&r.v, case.misaligned),
            );
            let ds = Buffer::from_slice(&case.doc_start);
            let o = Buffer::filled(t * h * d, bf16::NAN.to_bits());
            let lse = Buffer::filled(t * h, f32::NAN);
            let shape = launch_shape(Some(TcKernel::Forward), d, (t, h), FWD_BR);
            let (ti, hi, gi, past) = (t as i32, h as i32, g as i32, case.past as i32);
            launch(shape.into(), order, || unsafe {
                fwd(
                    q.ptr(),
                    k.ptr(),
                    v.ptr(),
                    ds.ptr(),
                    o.mut_ptr(),
                    lse.mut_ptr(),
                    ti,
                    hi,
                    gi,
                    past,
                    case.scale(),
                )
            })
            .unwrap_or_else(|e| panic!("{what} {order:?}: {e}"));
            let w = within_bound(
                &format!("{what} {order:?} o"),
                &download(&o),
                &r.o,
                &r.o_mag,
                &r.o_mag,
            );
            let (dl, at) = finetune_kernel_emu::max_relative_difference(&lse.to_vec(), &r.lse);
            assert!(
                dl <= 1e-5,
                "{what} {order:?}: lse[{at}] {} vs {}",
                lse.to_vec()[at],
                r.lse[at]
            );
            eprintln!(
                "emulated tc forward {what} {order:?}: o at {w:.2} of its bound, lse {dl:.1e}"
            );
        }
    }
}

/// The backward kernels' inputs in device memory: q, k, v, do (misaligned where the case
/// says), the reference's logsumexps and D, the document starts and ends.
struct BwdInputs {
    q: Buffer<u16>,
    k: Buffer<u16>,
    v: Buffer<u16>,
    d_o: Buffer<u16>,
    lse: Buffer<f32>,
    big_d: Buffer<f32>,
    doc_start: Buffer<u32>,
    doc_end: Buffer<u32>,
}

impl BwdInputs {
    fn new(case: &Case, r: &Reference) -> Self {
        let m = case.misaligned;
        BwdInputs {
            q: upload(&r.q, m),
            k: upload(&r.k, m),
            v: upload(&r.v, m),
            d_o: upload(&r.d_o, m),
            lse: Buffer::from_slice(&r.lse),
            big_d: Buffer::from_slice(&r.big_d),
            doc_start: Buffer::from_slice(&case.doc_start),
            doc_end: Buffer::from_slice(&doc_ends(&case.doc_start)),
        }
    }
}

/// attention_bwd_dq_tc_bf16_d<d>, from the reference's logsumexps and D: dq within
/// u·scale·Σ_j |dS_ij|·|k_jc| (dS's rounding) plus its own rounding.
fn check_dq(d: usize) {
    let dq_kernel = kernels(d).dq;
    for case in cases(d) {
        let r = reference(&case);
        let Dims { t, h, g, .. } = case.dims();
        let what = case.name();
        let (ti, hi, gi, past) = (t as i32, h as i32, g as i32, case.past as i32);
        for order in Order::BOTH {
            let x = BwdInputs::new(&case, &r);
            // The CUDA code zero-fills dq | dk | dv; NaN here shows what the kernel leaves out.
            let dq = Buffer::filled(t * h * d, bf16::NAN.to_bits());
            let shape = launch_shape(Some(TcKernel::Dq), d, (t, h), BWD_BR);
            launch(shape.into(), order, || unsafe {
                dq_kernel(
                    x.q.ptr(),
                    x.k.ptr(),
                    x.v.ptr(),
                    x.d_o.ptr(),
                    x.lse.ptr(),
                    x.big_d.ptr(),
                    x.doc_start.ptr(),
                    dq.mut_ptr(),
                    ti,
                    hi,
                    gi,
                    past,
                    case.scale(),
                )
            })
            .unwrap_or_else(|e| panic!("{what} {order:?} dq: {e}"));
            let w = within_bound(
                &format!("{what} {order:?} dq"),
                &download(&dq),
                &r.dq,
                &r.dq_mag,
                &r.dq_slack,
            );
            eprintln!("emulated tc dq {what} {order:?}: at {w:.2} of its bound");
        }
    }
}

/// attention_bwd_dkdv_tc_bf16_d<d>, from the reference's logsumexps and D: dk within
/// u·scale·Σ_i |dS_ij|·|q_ic| plus its own rounding, dv within u·Σ_i P_ij·|do_ic| plus its own.
fn check_dkdv(d: usize) {
    let dkdv_kernel = kernels(d).dkdv;
    for case in cases(d) {
        let r = reference(&case);
        let Dims { t, h, g, s, .. } = case.dims();
        let what = case.name();
        let (ti, hi, gi, past) = (t as i32, h as i32, g as i32, case.past as i32);
        for order in Order::BOTH {
            let x = BwdInputs::new(&case, &r);
            let dkv = Buffer::filled(2 * g * s * d, bf16::NAN.to_bits());
            let shape = launch_shape(Some(TcKernel::DkDv), d, (s, g), BWD_BC);
            launch(shape.into(), order, || unsafe {
                dkdv_kernel(
                    x.q.ptr(),
                    x.k.ptr(),
                    x.v.ptr(),
                    x.d_o.ptr(),
                    x.lse.ptr(),
                    x.big_d.ptr(),
                    x.doc_start.ptr(),
                    x.doc_end.ptr(),
                    dkv.mut_ptr(),
                    ti,
                    hi,
                    gi,
                    past,
                    case.scale(),
                )
            })
            .unwrap_or_else(|e| panic!("{what} {order:?} dk/dv: {e}"));
            // dk [G, S, D] then dv [G, S, D].
            let dkv = download(&dkv);
            let (dk, dv) = dkv.split_at(g * s * d);
            let wk = within_bound(
                &format!("{what} {order:?} dk"),
                dk,
                &r.dk,
                &r.dk_mag,
                &r.dk_slack,
            );
            let wv = within_bound(
                &format!("{what} {order:?} dv"),
                dv,
                &r.dv,
                &r.dv_mag,
                &r.dv_mag,
            );
            eprintln!("emulated tc dk/dv {what} {order:?}: at {wk:.2}, {wv:.2} of their bounds");
        }
    }
}

#[test]
fn emulated_tensor_core_forward_d64_is_within_bf16_rounding_of_the_cpu_reference() {
    check_forward(64);
}

#[test]
fn emulated_tensor_core_forward_d128_is_within_bf16_rounding_of_the_cpu_reference() {
    check_forward(128);
}

#[test]
fn emulated_tensor_core_dq_d64_is_within_bf16_rounding_of_the_cpu_reference() {
    check_dq(64);
}

#[test]
fn emulated_tensor_core_dq_d128_is_within_bf16_rounding_of_the_cpu_reference() {
    check_dq(128);
}

#[test]
fn emulated_tensor_core_dkdv_d64_is_within_bf16_rounding_of_the_cpu_reference() {
    check_dkdv(64);
}

#[test]
fn emulated_tensor_core_dkdv_d128_is_within_bf16_rounding_of_the_cpu_reference() {
    check_dkdv(128);
}
