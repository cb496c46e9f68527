// swiglu: y = silu(g) ⊙ u with silu(g) = g·σ(g) = g / (1 + e^(−g)), and its gradients
// dg = dy·u·σ(g)·(1 + g·(1 − σ(g))), du = dy·silu(g), written side by side into one
// [2, n] buffer (dg then du) so that one launch returns both.
//
// Element-wise, grid-stride; f32 arithmetic for f32 and bf16 storage. Mirrored by
// crates/finetune-kernels/src/swiglu.rs.
#include "fused_common.cuh"

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                           size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gv = load_f32(g[i]);
        y[i] = store_as<T>(gv / (1.f + expf(-gv)) * load_f32(u[i]));
    }
}

template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ g, const T* __restrict__ u,
                           const T* __restrict__ dy, T* __restrict__ out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gv = load_f32(g[i]), uv = load_f32(u[i]), dv = load_f32(dy[i]);
        float s = 1.f / (1.f + expf(-gv));
        out[i] = store_as<T>(dv * uv * s * (1.f + gv * (1.f - s)));
        out[n + i] = store_as<T>(dv * gv * s);
    }
}

extern "C" __global__ void swiglu_fwd_f32(const float* g, const float* u, float* y, size_t n) {
    swiglu_fwd(g, u, y, n);
}
extern "C" __global__ void swiglu_fwd_bf16(const __nv_bfloat16* g, const __nv_bfloat16* u,
                                           __nv_bfloat16* y, size_t n) {
    swiglu_fwd(g, u, y, n);
}
extern "C" __global__ void swiglu_bwd_f32(const float* g, const float* u, const float* dy,
                                          float* out, size_t n) {
    swiglu_bwd(g, u, dy, out, n);
}
extern "C" __global__ void swiglu_bwd_bf16(const __nv_bfloat16* g, const __nv_bfloat16* u,
                                           const __nv_bfloat16* dy, __nv_bfloat16* out, size_t n) {
    swiglu_bwd(g, u, dy, out, n);
}
