// rope: rotary position embedding on x [N, H, D] (N tokens, H heads) with per-token tables
// cos, sin [N, D] (f32): y = x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁] (halves of
// D). `transpose` = 1 applies the transposed map, the backward dx = dy·cos + rotate_halfᵀ(dy·sin)
// with rotate_halfᵀ(z) = [z₂, −z₁] (the inverse rotation when cos² + sin² = 1).
//
// One thread per (row, i < D/2) pair; f32 arithmetic for f32 and bf16 storage. Mirrored by
// crates/finetune-kernels/src/rope.rs.
#include "fused_common.cuh"

template <typename T>
__device__ void rope(const T* __restrict__ x, const float* __restrict__ cos,
                     const float* __restrict__ sin, T* __restrict__ y, int n, int h, int d,
                     int transpose) {
    int half = d / 2;
    size_t pairs = (size_t)n * h * half;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < pairs;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t row = idx / half;  // (token, head)
        int i = idx % half;
        size_t tok = row / h;
        const float* c = cos + tok * d;
        const float* s = sin + tok * d;
        float x1 = load_f32(x[row * d + i]), x2 = load_f32(x[row * d + i + half]);
        float y1, y2;
        if (transpose) {
            y1 = x1 * c[i] + x2 * s[i + half];
            y2 = x2 * c[i + half] - x1 * s[i];
        } else {
            y1 = x1 * c[i] - x2 * s[i];
            y2 = x2 * c[i + half] + x1 * s[i + half];
        }
        y[row * d + i] = store_as<T>(y1);
        y[row * d + i + half] = store_as<T>(y2);
    }
}

extern "C" __global__ void rope_f32(const float* x, const float* cos, const float* sin, float* y,
                                    int n, int h, int d, int transpose) {
    rope(x, cos, sin, y, n, h, d, transpose);
}
extern "C" __global__ void rope_bf16(const __nv_bfloat16* x, const float* cos, const float* sin,
                                     __nv_bfloat16* y, int n, int h, int d, int transpose) {
    rope(x, cos, sin, y, n, h, d, transpose);
}
