//! The kernels of kernels/attention.cu, declared once for the emulated tests (emulated.rs,
//! emulated_scalar.rs, emulated_tc.rs): their C signatures with the storage type `T` (f32, or
//! u16 for `__nv_bfloat16`'s bits), and each family's forward, dq and dk/dv by head dim.

pub(super) type Fwd<T> = unsafe extern "C" fn(
    *const T,   // q
    *const T,   // k
    *const T,   // v
    *const u32, // doc_start
    *mut T,     // o
    *mut f32,   // lse
    i32,        // t
    i32,        // h
    i32,        // g
    i32,        // past
    f32,        // scale
);
pub(super) type Dq<T> = unsafe extern "C" fn(
    *const T,   // q
    *const T,   // k
    *const T,   // v
    *const T,   // d_o
    *const f32, // lse
    *const f32, // big_d
    *const u32, // doc_start
    *mut T,     // dq
    i32,        // t
    i32,        // h
    i32,        // g
    i32,        // past
    f32,        // scale
);
pub(super) type DkDv<T> = unsafe extern "C" fn(
    *const T,   // q
    *const T,   // k
    *const T,   // v
    *const T,   // d_o
    *const f32, // lse
    *const f32, // big_d
    *const u32, // doc_start
    *const u32, // doc_end
    *mut T,     // dkv: dk then dv
    i32,        // t
    i32,        // h
    i32,        // g
    i32,        // past
    f32,        // scale
);
pub(super) type BwdDot<T> = unsafe extern "C" fn(*const T, *const T, *mut f32, i32, i32);

/// The forward, dq and dk/dv kernels of one family and head dim.
pub(super) struct Kernels<T> {
    pub(super) fwd: Fwd<T>,
    pub(super) dq: Dq<T>,
    pub(super) dkdv: DkDv<T>,
}

/// Declares one family's instantiations (attention.cu's INSTANTIATE / INSTANTIATE_TC) and the
/// function that picks them by head dim.
macro_rules! family {
    ($(#[$doc:meta])* $name:ident, $t:ty, { $($d:literal: $fwd:ident $dq:ident $dkdv:ident;)* }) => {
        extern "C" {
            $(
                fn $fwd(
                    q: *const $t, k: *const $t, v: *const $t, doc_start: *const u32,
                    o: *mut $t, lse: *mut f32, t: i32, h: i32, g: i32, past: i32, scale: f32,
                );
                fn $dq(
                    q: *const $t, k: *const $t, v: *const $t, d_o: *const $t,
                    lse: *const f32, big_d: *const f32, doc_start: *const u32, dq: *mut $t,
                    t: i32, h: i32, g: i32, past: i32, scale: f32,
                );
                fn $dkdv(
                    q: *const $t, k: *const $t, v: *const $t, d_o: *const $t,
                    lse: *const f32, big_d: *const f32, doc_start: *const u32,
                    doc_end: *const u32, dkv: *mut $t, t: i32, h: i32, g: i32, past: i32,
                    scale: f32,
                );
            )*
        }
        $(#[$doc])*
        pub(super) fn $name(d: usize) -> Kernels<$t> {
            match d {
                $($d => Kernels { fwd: $fwd, dq: $dq, dkdv: $dkdv },)*
                _ => panic!("{}: head dim {d} is not instantiated", stringify!($name)),
            }
        }
    };
}

family!(
    /// The scalar f32 kernels.
    f32_kernels, f32, {
    32: attention_fwd_f32_d32 attention_bwd_dq_f32_d32 attention_bwd_dkdv_f32_d32;
    64: attention_fwd_f32_d64 attention_bwd_dq_f32_d64 attention_bwd_dkdv_f32_d64;
    128: attention_fwd_f32_d128 attention_bwd_dq_f32_d128 attention_bwd_dkdv_f32_d128;
});
family!(
    /// The scalar bf16 kernels.
    bf16_kernels, u16, {
    32: attention_fwd_bf16_d32 attention_bwd_dq_bf16_d32 attention_bwd_dkdv_bf16_d32;
    64: attention_fwd_bf16_d64 attention_bwd_dq_bf16_d64 attention_bwd_dkdv_bf16_d64;
    128: attention_fwd_bf16_d128 attention_bwd_dq_bf16_d128 attention_bwd_dkdv_bf16_d128;
});
family!(
    /// The tensor-core (WMMA) kernels, bf16 only.
    tensor_core_kernels, u16, {
    64: attention_fwd_tc_bf16_d64 attention_bwd_dq_tc_bf16_d64 attention_bwd_dkdv_tc_bf16_d64;
    128: attention_fwd_tc_bf16_d128 attention_bwd_dq_tc_bf16_d128 attention_bwd_dkdv_tc_bf16_d128;
});

extern "C" {
    fn attention_bwd_dot_f32(d_o: *const f32, o: *const f32, out: *mut f32, rows: i32, d: i32);
    fn attention_bwd_dot_bf16(d_o: *const u16, o: *const u16, out: *mut f32, rows: i32, d: i32);
}

/// D = do·o per row, f32 storage.
pub(super) const DOT_F32: BwdDot<f32> = attention_bwd_dot_f32;
/// D = do·o per row, bf16 storage.
pub(super) const DOT_BF16: BwdDot<u16> = attention_bwd_dot_bf16;
