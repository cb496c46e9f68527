//! kernels/attention.cu's scalar kernels (forward, dq, dk/dv and D = do·o; f32 and bf16, head
//! dims 32, 64, 128) run on the CPU by finetune-kernel-emu with the CUDA launch's geometry and
//! argument lists, in both fiber orders, each kernel against the module's CPU reference
//! (`Attention::forward`, `Attention::backward`, `dot`) on the same f32 values it reads.
//!
//! Tolerance: the kernels and the reference do the same f32 operations in other orders
//! (sequential dot products over d ≤ 128 and sums over ≤ 155 keys here; 8-way or GEMM-blocked
//! sums with FMA there; an online softmax rescaled per key tile here, a whole-row one there), so
//! they agree to a few f32 roundings of the terms summed (inputs in [−2, 2): the measured worst
//! is 3.7e-6 relative to max(1, |want|), printed by each test): [`TOL`] = 1e-5 for every f32
//! output (o, the logsumexps, D, dq, dk, dv). bf16 storage computes in f32 too and rounds each
//! output once, so a bf16 output must be the round-to-nearest of a value within [`TOL`] of the
//! f32 reference ([`bf16_outside`]), not merely within a bf16 ulp.

use super::{
    doc_ends, dot, dot_launch_shape, launch_shape, Attention, Dims, Documents, BLOCK, BWD_BC,
    BWD_BR, FWD_BR,
};
use crate::common::test::{bf16_outside, data};
use candle_core::{Device, Tensor};
use finetune_kernel_emu::{launch, max_relative_difference, Buffer, Order};

use super::emulated_kernels::{bf16_kernels, f32_kernels, BwdDot, Kernels, DOT_BF16, DOT_F32};

/// Relative to max(1, |want|): see the file's comment.
const TOL: f32 = 1e-5;

/// A storage type of the kernels: f32, or bf16 as its bits.
trait Elem: Copy {
    const NAME: &'static str;
    /// The first output (index, got, want) that is not `want` computed within [`TOL`] (and,
    /// for bf16, rounded once).
    fn outside(got: &[Self], want: &[f32]) -> Option<(usize, f32, f32)>;
    fn store(x: f32) -> Self;
    fn load(self) -> f32;
    /// The forward, dq and dk/dv kernels of head dim `d`.
    fn kernels(d: usize) -> Kernels<Self>;
    const BWD_DOT: BwdDot<Self>;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    fn outside(got: &[Self], want: &[f32]) -> Option<(usize, f32, f32)> {
        let (diff, at) = max_relative_difference(got, want);
        (diff > TOL).then(|| (at, got[at], want[at]))
    }
    fn store(x: f32) -> Self {
        x
    }
    fn load(self) -> f32 {
        self
    }
    fn kernels(d: usize) -> Kernels<Self> {
        f32_kernels(d)
    }
    const BWD_DOT: BwdDot<Self> = DOT_F32;
}

impl Elem for u16 {
    const NAME: &'static str = "bf16";
    fn outside(got: &[Self], want: &[f32]) -> Option<(usize, f32, f32)> {
        bf16_outside(got, want, TOL)
    }
    fn store(x: f32) -> Self {
        half::bf16::from_f32(x).to_bits()
    }
    fn load(self) -> f32 {
        half::bf16::from_bits(self).to_f32()
    }
    fn kernels(d: usize) -> Kernels<Self> {
        bf16_kernels(d)
    }
    const BWD_DOT: BwdDot<Self> = DOT_BF16;
}

/// One problem (the head dim aside): documents as (start, length), query heads, key/value
/// heads, cached keys.
#[derive(Clone, Copy)]
struct Case {
    docs: &'static [(u32, u32)],
    h: usize,
    g: usize,
    past: usize,
}

/// The GPU test's two layouts (70 tokens in 4 documents: tiles of 16 and 32 rows cross document
/// edges; 150 in 3 with a one-token document) with 4 query heads over 2 key/value heads, and 5
/// tokens (one partial tile; a one-token document first) with 3 query heads over 1, so that the
/// T·H rows of D (15) are not a multiple of the 8 warps of a block; each without and with 5
/// cached keys.
fn cases() -> Vec<Case> {
    let layouts = [
        Case {
            docs: &[(0, 20), (20, 1), (21, 30), (51, 19)],
            h: 4,
            g: 2,
            past: 0,
        },
        Case {
            docs: &[(0, 60), (60, 1), (61, 89)],
            h: 4,
            g: 2,
            past: 0,
        },
        Case {
            docs: &[(0, 1), (1, 4)],
            h: 3,
            g: 1,
            past: 0,
        },
    ];
    layouts
        .iter()
        .flat_map(|&case| [0, 5].map(|past| Case { past, ..case }))
        .collect()
}

/// A case's inputs stored as `T` (the f32 values the reference reads are the stored ones).
struct Inputs<T: Elem> {
    doc_start: Vec<u32>,
    n: Dims,
    past: usize,
    scale: f32,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    d_o: Vec<T>,
}

impl<T: Elem> Inputs<T> {
    fn new(case: Case, d: usize) -> Self {
        let mut doc_start = Vec::new();
        for &(start, len) in case.docs {
            doc_start.extend(std::iter::repeat_n(start, len as usize));
        }
        let (t, h, g, past) = (doc_start.len(), case.h, case.g, case.past);
        let s = past + t;
        let stored = |n: usize, salt| data(n, salt).into_iter().map(T::store).collect();
        Inputs {
            n: Dims { t, h, g, d, s },
            past,
            scale: (1.0 / (d as f64).sqrt()) as f32,
            q: stored(t * h * d, 51),
            k: stored(g * s * d, 52),
            v: stored(g * s * d, 53),
            d_o: stored(t * h * d, 54),
            doc_start,
        }
    }

    fn f32s(x: &[T]) -> Vec<f32> {
        x.iter().map(|&v| v.load()).collect()
    }

    /// The CPU reference op for these inputs (its `block` as in training).
    fn op(&self) -> Attention {
        let Dims { t, h, g, d, s } = self.n;
        let q = Tensor::from_vec(Self::f32s(&self.q), (t, h, d), &Device::Cpu).unwrap();
        let kv = Tensor::zeros((g, s, d), candle_core::DType::F32, &Device::Cpu).unwrap();
        let docs = Documents::new(&self.doc_start, &Device::Cpu).unwrap();
        Attention::new(
            &q,
            &kv,
            &kv,
            &docs,
            self.past,
            self.scale as f64,
            BLOCK,
            false,
        )
        .unwrap()
    }

    /// The reference o and logsumexps.
    fn forward(&self) -> (Vec<f32>, Vec<f32>) {
        let (q, k, v) = (
            Self::f32s(&self.q),
            Self::f32s(&self.k),
            Self::f32s(&self.v),
        );
        self.op().forward(&q, &k, &v, &self.n)
    }

    fn what(&self, order: Order) -> String {
        let Dims { t, h, g, d, .. } = self.n;
        format!(
            "{} d{d} T {t} H {h} G {g} past {}, {order:?}",
            T::NAME,
            self.past
        )
    }
}

/// Asserts `got` is `want` within [`TOL`] (see [`Elem::outside`]); returns the largest
/// difference relative to max(1, |want|) for the printed summary.
fn check<T: Elem>(got: &[T], want: &[f32], what: &str) -> f32 {
    if let Some((at, g, w)) = T::outside(got, want) {
        panic!("{what}: at {at} got {g}, want {w} (±{TOL:e} relative)");
    }
    max_relative_difference(&Inputs::<T>::f32s(got), want).0
}

/// The forward kernel of head dim `d` on every case: o and the logsumexps (f32 in both
/// dtypes). o and lse start NaN (the Rust launch leaves them uninitialised).
fn forward_equals_the_cpu_reference<T: Elem>(d: usize) {
    let mut worst = [0f32; 2];
    {
        let fwd = T::kernels(d).fwd;
        for case in cases() {
            let x = Inputs::<T>::new(case, d);
            let (want_o, want_lse) = x.forward();
            let Dims { t, h, g, .. } = x.n;
            let (q, k, v) = (
                Buffer::from_slice(&x.q),
                Buffer::from_slice(&x.k),
                Buffer::from_slice(&x.v),
            );
            let ds = Buffer::from_slice(&x.doc_start);
            for order in Order::BOTH {
                let o = Buffer::filled(t * h * d, T::store(f32::NAN));
                let lse = Buffer::filled(t * h, f32::NAN);
                let (ti, hi, gi, past) = (t as i32, h as i32, g as i32, x.past as i32);
                let shape = launch_shape(None, d, (t, h), FWD_BR);
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
                        x.scale,
                    )
                })
                .unwrap();
                let what = x.what(order);
                worst[0] = worst[0].max(check(&o.to_vec(), &want_o, &format!("{what}: o")));
                let lse = lse.to_vec();
                worst[1] = worst[1].max(check(&lse, &want_lse, &format!("{what}: lse")));
            }
        }
    }
    eprintln!(
        "emulated attention fwd {} d{d}: o {:e}, lse {:e}",
        T::NAME,
        worst[0],
        worst[1]
    );
}

/// The backward as the CUDA code chains it — D = do·o (`attention_bwd_dot_*`), then dq, then
/// dk/dv into one zero-filled dq | dk | dv buffer — from the reference forward's o (stored as
/// `T`, as the forward kernel hands it on) and logsumexps, against `Attention::backward` on the
/// same values (D against `dot`).
fn backward_equals_the_cpu_reference<T: Elem>(d: usize) {
    let mut worst = [0f32; 4];
    {
        let Kernels {
            dq: dq_kernel,
            dkdv: dkdv_kernel,
            ..
        } = T::kernels(d);
        for case in cases() {
            let x = Inputs::<T>::new(case, d);
            let (o, lse) = x.forward();
            let o: Vec<T> = o.into_iter().map(T::store).collect();
            let Dims { t, h, g, s, .. } = x.n;
            let f = Inputs::<T>::f32s;
            let (want_dq, want_dk, want_dv) =
                x.op()
                    .backward(&f(&x.q), &f(&x.k), &f(&x.v), &f(&o), &f(&x.d_o), &lse, &x.n);
            let want_big_d: Vec<f32> = f(&x.d_o)
                .chunks(d)
                .zip(f(&o).chunks(d))
                .map(|(a, b)| dot(a, b))
                .collect();
            let (q, k, v, d_o, o) = (
                Buffer::from_slice(&x.q),
                Buffer::from_slice(&x.k),
                Buffer::from_slice(&x.v),
                Buffer::from_slice(&x.d_o),
                Buffer::from_slice(&o),
            );
            let lse = Buffer::from_slice(&lse);
            let ds = Buffer::from_slice(&x.doc_start);
            let de = Buffer::from_slice(&doc_ends(&x.doc_start));
            let (nq, nkv) = (t * h * d, g * s * d);
            let (ti, hi, gi, past) = (t as i32, h as i32, g as i32, x.past as i32);
            for order in Order::BOTH {
                let what = x.what(order);
                let rows = t * h;
                let big_d = Buffer::filled(rows, f32::NAN);
                let (rows_i, d_i) = (rows as i32, d as i32);
                launch(dot_launch_shape(rows).into(), order, || unsafe {
                    T::BWD_DOT(d_o.ptr(), o.ptr(), big_d.mut_ptr(), rows_i, d_i)
                })
                .unwrap();
                let got = big_d.to_vec();
                worst[0] = worst[0].max(check(&got, &want_big_d, &format!("{what}: D")));
                // Keys no query sees keep the zeros (the Rust code allocates the buffer zeroed).
                let out = Buffer::filled(nq + 2 * nkv, T::store(0.0));
                let dq = out.mut_ptr();
                // SAFETY: dk | dv start nq elements into the buffer, as in `typed`'s split.
                let dkv = unsafe { out.mut_ptr().add(nq) };
                let shape = launch_shape(None, d, (t, h), BWD_BR);
                launch(shape.into(), order, || unsafe {
                    dq_kernel(
                        q.ptr(),
                        k.ptr(),
                        v.ptr(),
                        d_o.ptr(),
                        lse.ptr(),
                        big_d.ptr(),
                        ds.ptr(),
                        dq,
                        ti,
                        hi,
                        gi,
                        past,
                        x.scale,
                    )
                })
                .unwrap();
                let shape = launch_shape(None, d, (s, g), BWD_BC);
                launch(shape.into(), order, || unsafe {
                    dkdv_kernel(
                        q.ptr(),
                        k.ptr(),
                        v.ptr(),
                        d_o.ptr(),
                        lse.ptr(),
                        big_d.ptr(),
                        ds.ptr(),
                        de.ptr(),
                        dkv,
                        ti,
                        hi,
                        gi,
                        past,
                        x.scale,
                    )
                })
                .unwrap();
                let got = out.to_vec();
                let parts = [
                    ("dq", &got[..nq], &want_dq),
                    ("dk", &got[nq..nq + nkv], &want_dk),
                    ("dv", &got[nq + nkv..], &want_dv),
                ];
                for (i, (name, got, want)) in parts.into_iter().enumerate() {
                    let e = check(got, want, &format!("{what}: {name}"));
                    worst[i + 1] = worst[i + 1].max(e);
                }
            }
        }
    }
    eprintln!(
        "emulated attention bwd {} d{d}: D {:e}, dq {:e}, dk {:e}, dv {:e}",
        T::NAME,
        worst[0],
        worst[1],
        worst[2],
        worst[3]
    );
}

/// One test per kernel, storage type and head dim (each well under 2 s).
macro_rules! tests {
    ($($name:ident: $check:ident::<$t:ty>($d:literal);)*) => {
        $(
            #[test]
            fn $name() {
                $check::<$t>($d);
            }
        )*
    };
}

tests! {
    emulated_forward_f32_d32: forward_equals_the_cpu_reference::<f32>(32);
    emulated_forward_f32_d64: forward_equals_the_cpu_reference::<f32>(64);
    emulated_forward_f32_d128: forward_equals_the_cpu_reference::<f32>(128);
    emulated_forward_bf16_d32: forward_equals_the_cpu_reference::<u16>(32);
    emulated_forward_bf16_d64: forward_equals_the_cpu_reference::<u16>(64);
    emulated_forward_bf16_d128: forward_equals_the_cpu_reference::<u16>(128);
    emulated_backward_f32_d32: backward_equals_the_cpu_reference::<f32>(32);
    emulated_backward_f32_d64: backward_equals_the_cpu_reference::<f32>(64);
    emulated_backward_f32_d128: backward_equals_the_cpu_reference::<f32>(128);
    emulated_backward_bf16_d32: backward_equals_the_cpu_reference::<u16>(32);
    emulated_backward_bf16_d64: backward_equals_the_cpu_reference::<u16>(64);
    emulated_backward_bf16_d128: backward_equals_the_cpu_reference::<u16>(128);
}
