// rms_norm: y = x / sqrt(mean(x²) + eps) · w over the last dimension (D) of x, and its input
// gradient dx = r·(dy⊙w) − x·r³·Σⱼ(dyⱼ·wⱼ·xⱼ)/D with r = 1/sqrt(mean(x²) + eps) (w frozen).
//
// One warp per row (rows = all leading dimensions), lanes striding over D, the row sums by warp
// shuffles; f32 arithmetic for f32 and bf16 storage. Mirrored by
// crates/finetune-kernels/src/rms_norm.rs (CPU reference, launch, tests).
#include "fused_common.cuh"

template <typename T>
__device__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                             int rows, int d, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * d;
    T* yr = y + (size_t)row * d;
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) {
        float v = load_f32(xr[i]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    float r = 1.f / sqrtf(ss / d + eps);
    for (int i = lane; i < d; i += 32) yr[i] = store_as<T>(load_f32(xr[i]) * r * load_f32(w[i]));
}

template <typename T>
__device__ void rms_norm_bwd(const T* __restrict__ x, const T* __restrict__ w,
                             const T* __restrict__ dy, T* __restrict__ dx, int rows, int d,
                             float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * d;
    const T* gr = dy + (size_t)row * d;
    T* dr = dx + (size_t)row * d;
    float ss = 0.f, dot = 0.f;
    for (int i = lane; i < d; i += 32) {
        float v = load_f32(xr[i]);
        ss += v * v;
        dot += load_f32(gr[i]) * load_f32(w[i]) * v;
    }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    float r = 1.f / sqrtf(ss / d + eps);
    float c = r * r * r * dot / d;
    for (int i = lane; i < d; i += 32)
        dr[i] = store_as<T>(r * load_f32(gr[i]) * load_f32(w[i]) - load_f32(xr[i]) * c);
}

extern "C" __global__ void rms_norm_fwd_f32(const float* x, const float* w, float* y, int rows,
                                            int d, float eps) {
    rms_norm_fwd(x, w, y, rows, d, eps);
}
extern "C" __global__ void rms_norm_fwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w,
                                             __nv_bfloat16* y, int rows, int d, float eps) {
    rms_norm_fwd(x, w, y, rows, d, eps);
}
extern "C" __global__ void rms_norm_bwd_f32(const float* x, const float* w, const float* dy,
                                            float* dx, int rows, int d, float eps) {
    rms_norm_bwd(x, w, dy, dx, rows, d, eps);
}
extern "C" __global__ void rms_norm_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w,
                                             const __nv_bfloat16* dy, __nv_bfloat16* dx, int rows,
                                             int d, float eps) {
    rms_norm_bwd(x, w, dy, dx, rows, d, eps);
}
