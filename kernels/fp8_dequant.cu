// fp8_dequant: W[o][i] = e4m3(q[o][i]) · scale_inv[o / 128][i / 128], written as bf16 or f32.
//
// The FP8 block-128 layout of Qwen3-Coder-*-FP8: q is [out, in] E4M3 ("fn": no infinities,
// 0x7f/0xff are NaN) bytes, scale_inv is [ceil(out/128), ceil(in/128)] f32. One thread per
// element (grid-stride); the E4M3 → f32 conversion is exact (cuda_fp8.h's __nv_cvt_fp8_to_halfraw
// goes through half, which holds every E4M3 value exactly). Mirrored by
// crates/finetune-kernels/src/fp8_dequant.rs, whose CPU reference uses the 256-entry table.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

__device__ __forceinline__ float e4m3_to_f32(uint8_t bits) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)bits, __NV_E4M3);
    return __half2float(__half(h));
}

extern "C" __global__ void fp8_dequant_bf16(const uint8_t* __restrict__ q,
                                            const float* __restrict__ scale_inv,
                                            __nv_bfloat16* __restrict__ out, int rows, int cols,
                                            int scale_cols) {
    size_t n = (size_t)rows * cols;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        int r = idx / cols, c = idx % cols;
        float s = scale_inv[(r / 128) * scale_cols + c / 128];
        out[idx] = __float2bfloat16(e4m3_to_f32(q[idx]) * s);
    }
}

extern "C" __global__ void fp8_dequant_f32(const uint8_t* __restrict__ q,
                                           const float* __restrict__ scale_inv,
                                           float* __restrict__ out, int rows, int cols,
                                           int scale_cols) {
    size_t n = (size_t)rows * cols;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        int r = idx / cols, c = idx % cols;
        float s = scale_inv[(r / 128) * scale_cols + c / 128];
        out[idx] = e4m3_to_f32(q[idx]) * s;
    }
}
