// cross_entropy: the row-wise part of a chunked linear + cross-entropy. For one chunk of
// logits z [N, V] (computed by cuBLAS through candle) and targets t [N] (u32, 0xFFFFFFFF =
// ignored), writes into out (f32, N·V + N values):
//   out[r·V + j] = softmax(z_r)_j − [j = t_r]   (the gradient of the row's loss; 0 if ignored)
//   out[N·V + r] = logsumexp(z_r) − z_r[t_r]   (the row's loss; 0 if ignored)
// One block per row: max, then Σ exp(z − max) by block reduction (warp shuffles + shared
// memory), then the gradient row. f32 arithmetic for f32 and bf16 logits. Mirrored by
// crates/finetune-kernels/src/cross_entropy.rs.
#include "fused_common.cuh"

#define CE_IGNORE 0xFFFFFFFFu

// Reduces v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
template <bool IS_MAX>
__device__ float block_reduce(float v, float* shared) {
    v = IS_MAX ? warp_max(v) : warp_sum(v);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();  // shared may still be read by a previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : (IS_MAX ? -INFINITY : 0.f);
    return IS_MAX ? warp_max(v) : warp_sum(v);
}

template <typename T>
__device__ void ce_rows(const T* __restrict__ z, const uint32_t* __restrict__ targets,
                        float* __restrict__ out, int n, int v) {
    __shared__ float shared[32];
    int row = blockIdx.x;
    if (row >= n) return;
    const T* zr = z + (size_t)row * v;
    float* gr = out + (size_t)row * v;
    uint32_t t = targets[row];
    if (t == CE_IGNORE) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) gr[j] = 0.f;
        if (threadIdx.x == 0) out[(size_t)n * v + row] = 0.f;
        return;
    }
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, load_f32(zr[j]));
    m = block_reduce<true>(m, shared);
    float s = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(load_f32(zr[j]) - m);
    s = block_reduce<false>(s, shared);
    float lse = logf(s);  // of the shifted row
    for (int j = threadIdx.x; j < v; j += blockDim.x)
        gr[j] = expf(load_f32(zr[j]) - m - lse) - (j == (int)t ? 1.f : 0.f);
    if (threadIdx.x == 0) out[(size_t)n * v + row] = lse - (load_f32(zr[t]) - m);
}

extern "C" __global__ void ce_rows_f32(const float* z, const uint32_t* targets, float* out, int n,
                                       int v) {
    ce_rows(z, targets, out, n, v);
}
extern "C" __global__ void ce_rows_bf16(const __nv_bfloat16* z, const uint32_t* targets,
                                        float* out, int n, int v) {
    ce_rows(z, targets, out, n, v);
}
