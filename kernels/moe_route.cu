// moe_route: each token's top-k experts from its router probabilities, on the device, so that
// only the k chosen indices per token travel to the host (to build the expert groups) and the
// 0/1 selection mask that weights the combine stays on the device.
//
//   top_k: p [T, E] f32 → out [T, E + k] f32
//     out[t][0..E]     = 1 where expert e is among token t's k largest p[t][e], else 0
//     out[t][E + r]    = the r-th chosen expert (exact in f32 for E < 2^24), by descending
//                        probability; equal probabilities rank by lower expert index, so an
//                        equal value never displaces a lower index (the host loop's order)
//
// One warp per token (8 per block): k rounds of a warp-wide argmax over the experts not yet
// taken (each lane strides over experts lane, lane + 32, …; E ≤ 1024, so a lane's taken
// experts fit one 32-bit mask). NaN ranks as −∞ (ties by index), so every row gets k picks.
// Mirrored by crates/finetune-kernels/src/moe_route.rs (CPU reference and the op).
#include <stdint.h>
#include <math.h>

extern "C" __global__ void moe_top_k(const float* __restrict__ p, float* __restrict__ out,
                                     uint32_t t, uint32_t e, uint32_t k) {
    uint32_t warp = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    uint32_t lane = threadIdx.x % 32;
    if (warp >= t) return;  // whole warps leave together (a warp is one token)
    const float* row = p + (size_t)warp * e;
    float* o = out + (size_t)warp * (e + k);
    // Each lane zeroes, and later marks, only its own experts: no ordering between lanes needed.
    for (uint32_t j = lane; j < e; j += 32) o[j] = 0.0f;
    uint32_t taken = 0;
    for (uint32_t r = 0; r < k; ++r) {
        float best = -INFINITY;
        uint32_t bi = e;  // none yet
        for (uint32_t i = 0, j = lane; j < e; ++i, j += 32) {
            if ((taken >> i) & 1u) continue;
            float v = row[j];
            if (isnan(v)) v = -INFINITY;
            if (v > best || (v == best && j < bi)) {
                best = v;
                bi = j;
            }
        }
        for (int off = 16; off > 0; off >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, off);
            uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
            if (ov > best || (ov == best && oi < bi)) {
                best = ov;
                bi = oi;
            }
        }
        if (bi < e && bi % 32 == lane) {
            taken |= 1u << (bi / 32);
            o[bi] = 1.0f;
        }
        if (lane == 0) o[e + r] = (float)bi;
    }
}
