// grouped_gemm: the MoE experts' frozen GEMM for every expert in ONE launch, reading FP8 E4M3
// block-128 weights directly (dequantized tile by tile into shared memory; no bf16 copy of the
// expert stack) or bf16 weights, on the tensor cores (WMMA 16×16×16 bf16 → f32):
//   nt (forward):        y[n] = x[n]·W[e(n)]ᵀ    x [N, K], W [E, O, K], y [N, O]
//   nn (input gradient): y[n] = x[n]·W[e(n)]     x [N, O], W [E, O, K], y [N, K]
// for rows n of expert e = offsets[e]..offsets[e + 1] (rows sorted by expert), with
// W[e][o][k] = e4m3(q[e][o][k]) · scale_inv[e][o/128][k/128] rounded to bf16 (the value the
// default path's fp8_dequant gives before its cuBLAS GEMM), f32 accumulation, y rounded once.
// Mirrored by crates/finetune-kernels/src/grouped_gemm.rs (CPU reference, tile table, launch).
//
// Block: 128 threads (4 warps) own a 64-row × 64-column tile of y; each warp 16 rows × 64
// columns (4 accumulators). Grid: x = the tile table (one entry per 64 rows of one expert:
// expert, first row, end row; built on the host from the offsets, so an expert with few rows
// costs one partial tile and none costs nothing), y = ⌈columns / 64⌉. The reduction walks 32
// at a time: the x tile and the dequantized W tile go to shared memory (zeros past the edges),
// then two k-steps of WMMA.
#include "fused_common.cuh"
#include <cuda_fp8.h>
#include <mma.h>

#define GG_M 64
#define GG_N 64
#define GG_K 32
#define GG_LD (GG_K + 8)   // bf16 row stride of the shared tiles (32-byte WMMA alignment kept)
#define GG_LS (GG_N + 4)   // f32 row stride of the output staging

typedef __nv_bfloat16 gg_bf16;

__device__ __forceinline__ float gg_weight(const uint8_t* q, const float* scale, size_t at,
                                           size_t scale_at) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)q[at], __NV_E4M3);
    return __half2float(__half(h)) * scale[scale_at];
}
__device__ __forceinline__ float gg_weight(const gg_bf16* w, const float*, size_t at, size_t) {
    return __bfloat162float(w[at]);
}

// k_dim: the reduction length (K for nt, O for nn); n_dim: y's columns (O for nt, K for nn);
// (w_rows, w_cols) = (O, K) of each expert's weight.
template <typename W, bool NN>
__device__ void grouped_gemm(const gg_bf16* __restrict__ x, const W* __restrict__ w,
                             const float* __restrict__ scale, const uint32_t* __restrict__ tiles,
                             gg_bf16* __restrict__ y, int k_dim, int n_dim, int w_rows,
                             int w_cols) {
    __shared__ __align__(32) gg_bf16 xs[GG_M * GG_LD];
    __shared__ __align__(32) gg_bf16 ws[GG_N * GG_LD];  // ws[c][kk] = W tile (column c, k kk)
    __shared__ __align__(32) float stage[GG_M * GG_LS];
    const uint32_t e = tiles[3 * blockIdx.x], r0 = tiles[3 * blockIdx.x + 1];
    const int rows = (int)(tiles[3 * blockIdx.x + 2] - r0);
    const int c0 = blockIdx.y * GG_N;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t w_base = (size_t)e * w_rows * w_cols;
    const int s_rows = (w_rows + 127) / 128, s_cols = (w_cols + 127) / 128;
    const size_t s_base = (size_t)e * s_rows * s_cols;

    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[GG_N / 16];
#pragma unroll
    for (int n = 0; n < GG_N / 16; ++n) nvcuda::wmma::fill_fragment(acc[n], 0.f);
    for (int k0 = 0; k0 < k_dim; k0 += GG_K) {
        __syncthreads();  // the previous step's WMMA loads are done with the tiles
        for (int i = threadIdx.x; i < GG_M * GG_K; i += blockDim.x) {
            int r = i / GG_K, kk = i % GG_K;
            xs[r * GG_LD + kk] = (r < rows && k0 + kk < k_dim)
                                     ? x[(size_t)(r0 + r) * k_dim + k0 + kk]
                                     : __float2bfloat16(0.f);
        }
        for (int i = threadIdx.x; i < GG_N * GG_K; i += blockDim.x) {
            // Consecutive threads read consecutive weight bytes: along k for nt, along the
            // output column (W's k) for nn.
            int c = NN ? i % GG_N : i / GG_K, kk = NN ? i / GG_N : i % GG_K;
            int col = c0 + c, red = k0 + kk;
            float v = 0.f;
            if (col < n_dim && red < k_dim) {
                int wr = NN ? red : col, wc = NN ? col : red;
                v = gg_weight(w, scale, w_base + (size_t)wr * w_cols + wc,
                              s_base + (size_t)(wr / 128) * s_cols + wc / 128);
            }
            ws[c * GG_LD + kk] = __float2bfloat16(v);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GG_K; kk += 16) {
            nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, gg_bf16,
                                   nvcuda::wmma::row_major> a;
            nvcuda::wmma::load_matrix_sync(a, xs + warp * 16 * GG_LD + kk, GG_LD);
#pragma unroll
            for (int n = 0; n < GG_N / 16; ++n) {
                // B[kk][c] = ws[c][kk]: the tile read column-major.
                nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, gg_bf16,
                                       nvcuda::wmma::col_major> b;
                nvcuda::wmma::load_matrix_sync(b, ws + n * 16 * GG_LD + kk, GG_LD);
                nvcuda::wmma::mma_sync(acc[n], a, b, acc[n]);
            }
        }
    }
    // Each warp stages and writes its own 16 rows.
#pragma unroll
    for (int n = 0; n < GG_N / 16; ++n)
        nvcuda::wmma::store_matrix_sync(stage + warp * 16 * GG_LS + n * 16, acc[n], GG_LS,
                                        nvcuda::wmma::mem_row_major);
    __syncwarp();
    for (int i = lane; i < 16 * GG_N; i += 32) {
        int r = warp * 16 + i / GG_N, c = i % GG_N;
        if (r < rows && c0 + c < n_dim)
            y[(size_t)(r0 + r) * n_dim + c0 + c] = __float2bfloat16(stage[r * GG_LS + c]);
    }
}

#define GG_ENTRY(NAME, W, NN)                                                                   \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        grouped_gemm_##NAME(const gg_bf16* x, const W* w, const float* scale,                    \
                            const uint32_t* tiles, gg_bf16* y, int k_dim, int n_dim,             \
                            int w_rows, int w_cols) {                                            \
        grouped_gemm<W, NN>(x, w, scale, tiles, y, k_dim, n_dim, w_rows, w_cols);                \
    }

GG_ENTRY(fp8_nt, uint8_t, false)
GG_ENTRY(fp8_nn, uint8_t, true)
GG_ENTRY(bf16_nt, gg_bf16, false)
GG_ENTRY(bf16_nn, gg_bf16, true)
