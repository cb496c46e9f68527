// adamw: one launch that applies an AdamW step (decoupled weight decay, bias correction) to
// many f32 tensors in place, in exactly the operation order of finetune-train's AdamW (PyTorch's
// torch.optim.AdamW), each f32 operation rounded once (no FMA contraction: __f*_rn):
//   d = p·decay                  decay = f32(1 − lr·wd)
//   m ← m·β₁ + g·(1 − β₁)
//   v ← v·β₂ + (g·g)·(1 − β₂)
//   p ← d − (m / (√v·inv_b2 + ε))·step     inv_b2 = f32(1/√(1 − β₂ᵗ)), step = f32(lr/(1 − β₁ᵗ))
// meta holds 7 u64 per tensor: p, m, v, g (device addresses), element count, decay | step << 32
// (f32 bits), inv_b2 (f32 bits); chunks holds (tensor, chunk) u32 pairs, one per block, each
// chunk `chunk_len` elements. Mirrored by crates/finetune-kernels/src/adamw.rs.
#include <stdint.h>

extern "C" __global__ void adamw_multi(const uint64_t* __restrict__ meta,
                                       const uint32_t* __restrict__ chunks, int chunk_len,
                                       float beta1, float one_minus_beta1, float beta2,
                                       float one_minus_beta2, float eps) {
    uint32_t tensor = chunks[2 * blockIdx.x], chunk = chunks[2 * blockIdx.x + 1];
    const uint64_t* mt = meta + 7 * (size_t)tensor;
    float* p = (float*)mt[0];
    float* m = (float*)mt[1];
    float* v = (float*)mt[2];
    const float* g = (const float*)mt[3];
    size_t len = mt[4];
    float decay = __uint_as_float((uint32_t)(mt[5] & 0xFFFFFFFFu));
    float step = __uint_as_float((uint32_t)(mt[5] >> 32));
    float inv_b2 = __uint_as_float((uint32_t)(mt[6] & 0xFFFFFFFFu));
    size_t start = (size_t)chunk * chunk_len;
    size_t end = start + chunk_len < len ? start + chunk_len : len;
    for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        float gi = g[i];
        float d = __fmul_rn(p[i], decay);
        float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(gi, one_minus_beta1));
        float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), one_minus_beta2));
        float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_b2), eps);
        m[i] = mi;
        v[i] = vi;
        p[i] = __fsub_rn(d, __fmul_rn(__fdiv_rn(mi, denom), step));
    }
}
