// moe_permute: the token permutation of a MoE block and its inverse, as two gathers (no atomics,
// deterministic, every output element computed by one thread).
//
//   gather_rows: out[n][j] = rows[n] < T ? x[rows[n]][j] : 0          (x [T, H] → out [N, H])
//   sum_rows:    out[t][j] = Σ_{i < k, inv[t][i] < N} src[inv[t][i]][j] (src [N, H] → out [T, H])
//
// rows lists, expert after expert, the token of each slot of the padded [E, C] expert groups
// (T marks a pad slot); inv[t] lists the slots of token t in the same (expert) order, N marking
// an unused entry. sum_rows is gather_rows' adjoint and the other way round, so each op's
// backward is the other kernel. Sums accumulate in f32 in slot order and round once.
// Mirrored by crates/finetune-kernels/src/moe_permute.rs (CPU reference and the ops).
#include <cuda_bf16.h>
#include <stdint.h>

template <typename T>
__device__ __forceinline__ float load(const T* p, size_t i);
template <>
__device__ __forceinline__ float load<float>(const float* p, size_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, size_t i) {
    return __bfloat162float(p[i]);
}
template <typename T>
__device__ __forceinline__ void store(T* p, size_t i, float v);
template <>
__device__ __forceinline__ void store<float>(float* p, size_t i, float v) { p[i] = v; }
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, size_t i, float v) {
    p[i] = __float2bfloat16(v);
}

template <typename T>
__device__ void gather_rows(const T* __restrict__ x, const uint32_t* __restrict__ rows,
                            T* __restrict__ out, uint32_t n, uint32_t h, uint32_t t) {
    size_t total = (size_t)n * h;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        uint32_t slot = idx / h, j = idx % h;
        uint32_t row = rows[slot];
        store(out, idx, row < t ? load(x, (size_t)row * h + j) : 0.0f);
    }
}

template <typename T>
__device__ void sum_rows(const T* __restrict__ src, const uint32_t* __restrict__ inv,
                         T* __restrict__ out, uint32_t t, uint32_t k, uint32_t h, uint32_t n) {
    size_t total = (size_t)t * h;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        uint32_t tok = idx / h, j = idx % h;
        float acc = 0.0f;
        for (uint32_t i = 0; i < k; ++i) {
            uint32_t slot = inv[(size_t)tok * k + i];
            if (slot < n) acc += load(src, (size_t)slot * h + j);
        }
        store(out, idx, acc);
    }
}

#define INSTANTIATE(NAME, T)                                                                    \
    extern "C" __global__ void gather_rows_##NAME(const T* x, const uint32_t* rows, T* out,    \
                                                  uint32_t n, uint32_t h, uint32_t t) {        \
        gather_rows<T>(x, rows, out, n, h, t);                                                 \
    }                                                                                          \
    extern "C" __global__ void sum_rows_##NAME(const T* src, const uint32_t* inv, T* out,      \
                                               uint32_t t, uint32_t k, uint32_t h,             \
                                               uint32_t n) {                                   \
        sum_rows<T>(src, inv, out, t, k, h, n);                                                \
    }

INSTANTIATE(f32, float)
INSTANTIATE(bf16, __nv_bfloat16)
