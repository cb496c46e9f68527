// cuda_fp8.h for finetune-kernel-emu: FP8 E4M3 ("fn": bias 7, no infinities, NaN = S.1111.111,
// largest finite 448) conversions, written from the format's definition (OCP FP8 spec) rather
// than ported from cuda_fp8.hpp, so that the emulated kernels check the `float8` crate that the
// CPU references use instead of repeating it.
#pragma once
#include "cuda_fp16.h"
#include <math.h>
#include <stdint.h>

typedef unsigned char __nv_fp8_storage_t;
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };

// Round to nearest even, saturating to ±448 (__NV_SATFINITE); NaN → 0x7f with the sign.
inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t sat,
                                                __nv_fp8_interpretation_t kind) {
    if (kind != __NV_E4M3 || sat != __NV_SATFINITE) __builtin_trap();  // only what kernels use
    unsigned sign = signbit(x) ? 0x80u : 0u;
    double a = fabs((double)x);
    if (isnan(x)) return (__nv_fp8_storage_t)(sign | 0x7f);
    if (a >= 448.0) return (__nv_fp8_storage_t)(sign | 0x7e);
    if (a < ldexp(1.0, -6)) {  // subnormal: multiples of 2^-9 (rint rounds half to even)
        return (__nv_fp8_storage_t)(sign | (unsigned)rint(a * 512.0));  // 8 → the least normal
    }
    int e;
    frexp(a, &e);  // a = m · 2^e, m ∈ [0.5, 1)
    e -= 1;        // a = (1 + f) · 2^e
    unsigned mant = (unsigned)rint((ldexp(a, -e) - 1.0) * 8.0);
    if (mant == 8) {
        mant = 0;
        e += 1;
    }
    unsigned code = ((unsigned)(e + 7) << 3) | mant;
    if (code > 0x7e) code = 0x7e;
    return (__nv_fp8_storage_t)(sign | code);
}

// The exact binary16 of an E4M3 value (every E4M3 value is a normal or zero binary16).
inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t b, __nv_fp8_interpretation_t kind) {
    if (kind != __NV_E4M3) __builtin_trap();
    unsigned sign = (b & 0x80u) << 8, exp = (b >> 3) & 15u, mant = b & 7u;
    __half_raw h;
    if (exp == 15 && mant == 7) {
        h.x = (unsigned short)(sign | 0x7e00u);  // NaN
    } else if (exp == 0 && mant == 0) {
        h.x = (unsigned short)sign;
    } else if (exp == 0) {  // mant · 2^-9: normalise
        int e = -9;
        while (mant < 8) {
            mant <<= 1;
            e -= 1;
        }
        // value = (mant/8) · 2^(e+3), mant ∈ [8, 16)
        h.x = (unsigned short)(sign | ((unsigned)(e + 3 + 15) << 10) | ((mant & 7u) << 7));
    } else {
        h.x = (unsigned short)(sign | ((exp - 7 + 15) << 10) | (mant << 7));
    }
    return h;
}
