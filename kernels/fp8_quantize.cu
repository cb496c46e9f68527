// fp8_quantize: activations x [rows, cols] (f32 or bf16) to FP8 E4M3 with one f32 scale per row
// and 128-column block, the DeepSeek-V3 recipe: s = amax / 448 over the block (s = 1 where that
// is 0: a zero block or an underflow), q = e4m3(x / s) rounded to nearest even and saturated
// to ±448, so that x ≈ q · s. The input of the block-scaled cuBLASLt GEMM (crates/finetune-kernels/src/fp8_linear.rs),
// whose CPU reference (`quantize_rows_cpu`) does the same operations in the same order
// (an IEEE f32 division each, then the `float8` crate's port of cuda_fp8.hpp's rounding).
//
// Scale layout (cuBLASLt CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F on the non-transposed B
// operand: one float per 128 elements along K, consecutive rows adjacent, i.e. PyTorch's
// "outer-dim-major" [rows, cols/128] with strides (1, rows)), per row group: rows
// offsets[g]..offsets[g+1] (one expert's rows, one GEMM each) have their own block starting at
// bases[g] (a multiple of 4 floats, so every group's scale pointer is 16-byte aligned), and
// row r of the group, column block b is at bases[g] + b · rows_g + (r − offsets[g]).
//
// One block of 128 threads per (row, column block): each thread one element, the block's amax by
// warp shuffles and shared memory.
#include "fused_common.cuh"
#include <cuda_fp8.h>

template <typename T>
__device__ void quantize_rows(const T* __restrict__ x, uint8_t* __restrict__ q,
                              float* __restrict__ scales, int rows, int cols,
                              const int* __restrict__ offsets, const int* __restrict__ bases,
                              int groups) {
    __shared__ float warp_amax[4];
    __shared__ float block_scale;
    // Rows on x (up to 2³¹ − 1 blocks), column blocks on y (≤ 65,535, K ≤ 8 Mi).
    const int row = blockIdx.x;
    const int blk = blockIdx.y;
    const int col = blk * 128 + threadIdx.x;
    float v = 0.f;
    if (row < rows && col < cols) v = load_f32(x[(size_t)row * cols + col]);
    float a = warp_max(fabsf(v));
    if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = a;
    __syncthreads();
    if (threadIdx.x == 0) {
        float amax = fmaxf(fmaxf(warp_amax[0], warp_amax[1]), fmaxf(warp_amax[2], warp_amax[3]));
        float s = amax / 448.f;
        if (!(s > 0.f)) s = 1.f;  // a zero block, or an amax so small that s underflows to 0
        block_scale = s;
        // The row's group: the last g with offsets[g] <= row (offsets non-decreasing, empty
        // groups skipped because their successor has the same start).
        int lo = 0, hi = groups - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (offsets[mid] <= row) lo = mid; else hi = mid - 1;
        }
        int g_rows = offsets[lo + 1] - offsets[lo];
        if (row < rows) scales[bases[lo] + (size_t)blk * g_rows + (row - offsets[lo])] = s;
    }
    __syncthreads();
    if (row < rows && col < cols) {
        q[(size_t)row * cols + col] =
            (uint8_t)__nv_cvt_float_to_fp8(v / block_scale, __NV_SATFINITE, __NV_E4M3);
    }
}

extern "C" __global__ void fp8_quantize_rows_f32(const float* x, uint8_t* q, float* scales,
                                                 int rows, int cols, const int* offsets,
                                                 const int* bases, int groups) {
    quantize_rows(x, q, scales, rows, cols, offsets, bases, groups);
}

extern "C" __global__ void fp8_quantize_rows_bf16(const __nv_bfloat16* x, uint8_t* q,
                                                  float* scales, int rows, int cols,
                                                  const int* offsets, const int* bases,
                                                  int groups) {
    quantize_rows(x, q, scales, rows, cols, offsets, bases, groups);
}
