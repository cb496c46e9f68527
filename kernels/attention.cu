// attention: per-document causal grouped-query attention over packed sequences, flash-attention
// style (no [heads, T, keys] tensor is ever stored). The math is the doc comment of
// crates/finetune-kernels/src/attention.rs (the CPU reference and the test oracle):
//   o[i, h] = Σ_{j ∈ A(i)} softmax_j(scale · q[i, h]·k[g(h), j]) · v[g(h), j]
// with A(i) = the cached keys j < past, plus past + doc_start[i] ≤ j ≤ past + i.
// Backward from the forward's row logsumexps lse: P_ij = exp(s_ij − lse_i), dP_ij = do_i·v_j,
// D_i = do_i·o_i, dS_ij = P_ij (dP_ij − D_i):
//   dq_i = scale Σ_j dS_ij k_j,   dk_j = scale Σ_i dS_ij q_i,   dv_j = Σ_i P_ij do_i.
// dq in blocks of query rows, dk/dv in blocks of key rows (no atomics), as the CPU reference.
//
// Layouts: q, o, do [T, H, D]; k, v, dk, dv [G, S, D] with S = past + T; lse, D [T·H] f32 in
// (token, head) order. f32 arithmetic for f32 and bf16 storage. D (the head dim) is a template
// parameter: 32, 64 and 128 are instantiated (others take candle's plain path).
//
// Thread mapping: 4 threads per row ("quad", consecutive lanes of one warp); a thread owns
// columns sub, sub + 4, … of its row's D-vector (bank-conflict free in shared memory) and the
// keys (or queries) sub, sub + 4, … of the current tile. Quad reductions are two shuffles.
// Scalar FMA arithmetic (no tensor cores yet): memory O(T·D), compute is the price.
#include "fused_common.cuh"
#include <math_constants.h>

#define QUAD 4
#define PAD 1  // row padding of shared tiles (D + 1 floats) against bank conflicts

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Whether query i (0-based among the T new tokens) sees key j (absolute, < S).
__device__ __forceinline__ bool visible(int i, int j, int past, const uint32_t* doc_start) {
    if (j < past) return true;
    int jj = j - past;
    return jj <= i && jj >= (int)doc_start[i];
}

// rows × D tile from src (row stride `stride` elements, rows ≥ n_rows read as 0) into f32
// shared memory with row stride D + PAD.
template <typename T, int D>
__device__ void load_tile(float* dst, const T* src, int rows, int n_rows, size_t stride) {
    for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
        int r = e / D, x = e % D;
        dst[r * (D + PAD) + x] = r < n_rows ? load_f32(src[(size_t)r * stride + x]) : 0.f;
    }
}

template <int D>
__device__ __forceinline__ float dot_smem(const float* a, const float* b) {
    float s = 0.f;
#pragma unroll 8
    for (int x = 0; x < D; ++x) s += a[x] * b[x];
    return s;
}

// ---------------------------------------------------------------------------------------------
// Forward: block = BR query rows of one head (BR·4 threads); key tiles of BC.
// grid (ceil(T / BR), H).
template <typename T, int D, int BR, int BC>
__device__ void attn_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const uint32_t* __restrict__ doc_start, T* __restrict__ o,
                         float* __restrict__ lse, int t, int h, int g, int past, float scale) {
    __shared__ float qs[BR * (D + PAD)];
    __shared__ float ks[BC * (D + PAD)];
    __shared__ float vs[BC * (D + PAD)];
    __shared__ float ps[BR * (BC + PAD)];
    const int head = blockIdx.y, kvh = head / (h / g), s_len = past + t;
    const int i0 = blockIdx.x * BR;
    const int r = threadIdx.x / QUAD, sub = threadIdx.x % QUAD;
    const int i = i0 + r;
    const bool row_ok = i < t;
    const int rows = min(BR, t - i0);
    load_tile<T, D>(qs, q + ((size_t)i0 * h + head) * D, BR, rows, (size_t)h * D);
    const T* kh = k + (size_t)kvh * s_len * D;
    const T* vh = v + (size_t)kvh * s_len * D;
    float acc[D / QUAD];
#pragma unroll
    for (int u = 0; u < D / QUAD; ++u) acc[u] = 0.f;
    float m = -CUDART_INF_F, l = 0.f;
    const int j_begin = past > 0 ? 0 : (int)doc_start[i0];
    const int j_end = past + i0 + rows;  // exclusive
    for (int j0 = j_begin; j0 < j_end; j0 += BC) {
        __syncthreads();
        const int n_keys = min(BC, s_len - j0);
        load_tile<T, D>(ks, kh + (size_t)j0 * D, BC, n_keys, D);
        load_tile<T, D>(vs, vh + (size_t)j0 * D, BC, n_keys, D);
        __syncthreads();
        float sc[BC / QUAD];
        float tile_max = -CUDART_INF_F;
#pragma unroll
        for (int c4 = 0; c4 < BC / QUAD; ++c4) {
            int c = sub + QUAD * c4, j = j0 + c;
            bool ok = row_ok && j < j_end && visible(i, j, past, doc_start);
            sc[c4] = ok ? dot_smem<D>(qs + r * (D + PAD), ks + c * (D + PAD)) * scale
                        : -CUDART_INF_F;
            tile_max = fmaxf(tile_max, sc[c4]);
        }
        tile_max = quad_max(tile_max);
        const float m_new = fmaxf(m, tile_max);
        float psum = 0.f;
#pragma unroll
        for (int c4 = 0; c4 < BC / QUAD; ++c4) {
            float p = sc[c4] == -CUDART_INF_F ? 0.f : expf(sc[c4] - m_new);
            ps[r * (BC + PAD) + sub + QUAD * c4] = p;
            psum += p;
        }
        psum = quad_sum(psum);
        const float corr = m == -CUDART_INF_F ? 0.f : expf(m - m_new);
        l = l * corr + psum;
        m = m_new;
        __syncwarp();
#pragma unroll
        for (int u = 0; u < D / QUAD; ++u) {
            int x = sub + QUAD * u;
            float a = acc[u] * corr;
            for (int c = 0; c < BC; ++c) a += ps[r * (BC + PAD) + c] * vs[c * (D + PAD) + x];
            acc[u] = a;
        }
        __syncwarp();
    }
    if (row_ok) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
        T* orow = o + ((size_t)i * h + head) * D;
#pragma unroll
        for (int u = 0; u < D / QUAD; ++u) orow[sub + QUAD * u] = store_as<T>(acc[u] * inv);
        if (sub == 0) lse[(size_t)i * h + head] = m + logf(l);
    }
}

// D_i = do_i · o_i per (token, head) row: one warp per row. grid ceil(rows / 8), 256 threads.
template <typename T>
__device__ void attn_bwd_dot(const T* __restrict__ d_o, const T* __restrict__ o,
                             float* __restrict__ out, int rows, int d) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    float s = 0.f;
    for (int x = lane; x < d; x += 32)
        s += load_f32(d_o[(size_t)row * d + x]) * load_f32(o[(size_t)row * d + x]);
    s = warp_sum(s);
    if (lane == 0) out[row] = s;
}

// dq: block = BR query rows of one head; grid (ceil(T / BR), H).
template <typename T, int D, int BR, int BC>
__device__ void attn_bwd_dq(const T* __restrict__ q, const T* __restrict__ k,
                            const T* __restrict__ v, const T* __restrict__ d_o,
                            const float* __restrict__ lse, const float* __restrict__ big_d,
                            const uint32_t* __restrict__ doc_start, T* __restrict__ dq, int t,
                            int h, int g, int past, float scale) {
    __shared__ float qs[BR * (D + PAD)];
    __shared__ float dos[BR * (D + PAD)];
    __shared__ float ks[BC * (D + PAD)];
    __shared__ float vs[BC * (D + PAD)];
    __shared__ float dss[BR * (BC + PAD)];
    const int head = blockIdx.y, kvh = head / (h / g), s_len = past + t;
    const int i0 = blockIdx.x * BR;
    const int r = threadIdx.x / QUAD, sub = threadIdx.x % QUAD;
    const int i = i0 + r;
    const bool row_ok = i < t;
    const int rows = min(BR, t - i0);
    load_tile<T, D>(qs, q + ((size_t)i0 * h + head) * D, BR, rows, (size_t)h * D);
    load_tile<T, D>(dos, d_o + ((size_t)i0 * h + head) * D, BR, rows, (size_t)h * D);
    const float lse_i = row_ok ? lse[(size_t)i * h + head] : 0.f;
    const float d_i = row_ok ? big_d[(size_t)i * h + head] : 0.f;
    const T* kh = k + (size_t)kvh * s_len * D;
    const T* vh = v + (size_t)kvh * s_len * D;
    float acc[D / QUAD];
#pragma unroll
    for (int u = 0; u < D / QUAD; ++u) acc[u] = 0.f;
    const int j_begin = past > 0 ? 0 : (int)doc_start[i0];
    const int j_end = past + i0 + rows;
    for (int j0 = j_begin; j0 < j_end; j0 += BC) {
        __syncthreads();
        const int n_keys = min(BC, s_len - j0);
        load_tile<T, D>(ks, kh + (size_t)j0 * D, BC, n_keys, D);
        load_tile<T, D>(vs, vh + (size_t)j0 * D, BC, n_keys, D);
        __syncthreads();
#pragma unroll
        for (int c4 = 0; c4 < BC / QUAD; ++c4) {
            int c = sub + QUAD * c4, j = j0 + c;
            float ds = 0.f;
            if (row_ok && j < j_end && visible(i, j, past, doc_start)) {
                float s = dot_smem<D>(qs + r * (D + PAD), ks + c * (D + PAD)) * scale;
                float p = expf(s - lse_i);
                float dp = dot_smem<D>(dos + r * (D + PAD), vs + c * (D + PAD));
                ds = p * (dp - d_i);
            }
            dss[r * (BC + PAD) + c] = ds;
        }
        __syncwarp();
#pragma unroll
        for (int u = 0; u < D / QUAD; ++u) {
            int x = sub + QUAD * u;
            float a = acc[u];
            for (int c = 0; c < BC; ++c) a += dss[r * (BC + PAD) + c] * ks[c * (D + PAD) + x];
            acc[u] = a;
        }
        __syncwarp();
    }
    if (row_ok) {
        T* row = dq + ((size_t)i * h + head) * D;
#pragma unroll
        for (int u = 0; u < D / QUAD; ++u) row[sub + QUAD * u] = store_as<T>(acc[u] * scale);
    }
}

// dk, dv: block = BC key rows of one key/value head, over the query heads of its group and the
// queries that see these keys; grid (ceil(S / BC), G). doc_end[i] = the last token of token i's
// document (key past + j is seen by queries j ..= doc_end[j]; a cached key by every query).
template <typename T, int D, int BR, int BC>
__device__ void attn_bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const T* __restrict__ d_o,
                              const float* __restrict__ lse, const float* __restrict__ big_d,
                              const uint32_t* __restrict__ doc_start,
                              const uint32_t* __restrict__ doc_end, T* __restrict__ dkv,
                              int t, int h, int g, int past, float scale) {
    __shared__ float ks[BC * (D + PAD)];
    __shared__ float vs[BC * (D + PAD)];
    __shared__ float qs[BR * (D + PAD)];
    __shared__ float dos[BR * (D + PAD)];
    __shared__ float ps[BC * (BR + PAD)];
    __shared__ float dss[BC * (BR + PAD)];
    __shared__ float lses[BR], ds_rows[BR];
    const int kvh = blockIdx.y, group = h / g, s_len = past + t;
    const int j0 = blockIdx.x * BC;
    const int c = threadIdx.x / QUAD, sub = threadIdx.x % QUAD;
    const int j = j0 + c;
    const bool key_ok = j < s_len;
    const int n_keys = min(BC, s_len - j0);
    load_tile<T, D>(ks, k + ((size_t)kvh * s_len + j0) * D, BC, n_keys, D);
    load_tile<T, D>(vs, v + ((size_t)kvh * s_len + j0) * D, BC, n_keys, D);
    float acc_k[D / QUAD], acc_v[D / QUAD];
#pragma unroll
    for (int u = 0; u < D / QUAD; ++u) acc_k[u] = acc_v[u] = 0.f;
    const int j_last = j0 + n_keys - 1;
    const int i_begin = j0 < past ? 0 : j0 - past;
    // Cached keys (j < past) are seen by every query.
    const int i_end = j0 < past ? t : (int)doc_end[j_last - past] + 1;  // exclusive
    for (int head = kvh * group; head < (kvh + 1) * group; ++head) {
        for (int i0 = i_begin; i0 < i_end; i0 += BR) {
            const int rows = min(BR, t - i0);
            __syncthreads();
            load_tile<T, D>(qs, q + ((size_t)i0 * h + head) * D, BR, rows, (size_t)h * D);
            load_tile<T, D>(dos, d_o + ((size_t)i0 * h + head) * D, BR, rows, (size_t)h * D);
            for (int r = threadIdx.x; r < BR; r += blockDim.x) {
                bool ok = r < rows;
                lses[r] = ok ? lse[(size_t)(i0 + r) * h + head] : 0.f;
                ds_rows[r] = ok ? big_d[(size_t)(i0 + r) * h + head] : 0.f;
            }
            __syncthreads();
#pragma unroll
            for (int r4 = 0; r4 < BR / QUAD; ++r4) {
                int r = sub + QUAD * r4, i = i0 + r;
                float p = 0.f, ds = 0.f;
                if (key_ok && r < rows && visible(i, j, past, doc_start)) {
                    float s = dot_smem<D>(qs + r * (D + PAD), ks + c * (D + PAD)) * scale;
                    p = expf(s - lses[r]);
                    float dp = dot_smem<D>(dos + r * (D + PAD), vs + c * (D + PAD));
                    ds = p * (dp - ds_rows[r]);
                }
                ps[c * (BR + PAD) + r] = p;
                dss[c * (BR + PAD) + r] = ds;
            }
            __syncwarp();
#pragma unroll
            for (int u = 0; u < D / QUAD; ++u) {
                int x = sub + QUAD * u;
                float ak = acc_k[u], av = acc_v[u];
                for (int r = 0; r < BR; ++r) {
                    av += ps[c * (BR + PAD) + r] * dos[r * (D + PAD) + x];
                    ak += dss[c * (BR + PAD) + r] * qs[r * (D + PAD) + x];
                }
                acc_k[u] = ak;
                acc_v[u] = av;
            }
            __syncwarp();
        }
    }
    if (key_ok) {
        // dkv holds dk [G, S, D] then dv [G, S, D].
        T* krow = dkv + ((size_t)kvh * s_len + j) * D;
        T* vrow = krow + (size_t)g * s_len * D;
#pragma unroll
        for (int u = 0; u < D / QUAD; ++u) {
            krow[sub + QUAD * u] = store_as<T>(acc_k[u] * scale);
            vrow[sub + QUAD * u] = store_as<T>(acc_v[u]);
        }
    }
}

// Tile sizes per head dim: shared memory stays under the 48 KB static limit.
// fwd: BR = 32 rows (128 threads), BC = 16 keys; bwd: BR = 16, BC = 16 (64 threads).
#define FWD_BR 32
#define FWD_BC 16
#define BWD_BR 16
#define BWD_BC 16

#define INSTANTIATE(NAME, T, D)                                                                 \
    extern "C" __global__ void attention_fwd_##NAME##_d##D(                                    \
        const T* q, const T* k, const T* v, const uint32_t* doc_start, T* o, float* lse, int t, \
        int h, int g, int past, float scale) {                                                  \
        attn_fwd<T, D, FWD_BR, FWD_BC>(q, k, v, doc_start, o, lse, t, h, g, past, scale);      \
    }                                                                                           \
    extern "C" __global__ void attention_bwd_dq_##NAME##_d##D(                                 \
        const T* q, const T* k, const T* v, const T* d_o, const float* lse, const float* big_d, \
        const uint32_t* doc_start, T* dq, int t, int h, int g, int past, float scale) {         \
        attn_bwd_dq<T, D, BWD_BR, BWD_BC>(q, k, v, d_o, lse, big_d, doc_start, dq, t, h, g,    \
                                          past, scale);                                         \
    }                                                                                           \
    extern "C" __global__ void attention_bwd_dkdv_##NAME##_d##D(                               \
        const T* q, const T* k, const T* v, const T* d_o, const float* lse, const float* big_d, \
        const uint32_t* doc_start, const uint32_t* doc_end, T* dkv, int t, int h, int g,        \
        int past, float scale) {                                                                \
        attn_bwd_dkdv<T, D, BWD_BR, BWD_BC>(q, k, v, d_o, lse, big_d, doc_start, doc_end, dkv, \
                                            t, h, g, past, scale);                              \
    }

INSTANTIATE(f32, float, 32)
INSTANTIATE(f32, float, 64)
INSTANTIATE(f32, float, 128)
INSTANTIATE(bf16, __nv_bfloat16, 32)
INSTANTIATE(bf16, __nv_bfloat16, 64)
INSTANTIATE(bf16, __nv_bfloat16, 128)

extern "C" __global__ void attention_bwd_dot_f32(const float* d_o, const float* o, float* out,
                                                 int rows, int d) {
    attn_bwd_dot(d_o, o, out, rows, d);
}
extern "C" __global__ void attention_bwd_dot_bf16(const __nv_bfloat16* d_o,
                                                  const __nv_bfloat16* o, float* out, int rows,
                                                  int d) {
    attn_bwd_dot(d_o, o, out, rows, d);
}

// =============================================================================================
// Tensor-core variants (bf16 storage, head dims 64 and 128): the same math, with every product
// of two tiles on the tensor cores (WMMA 16×16×16 bf16 → f32) and the row work (masking, exp,
// sums) in f32 on shared-memory copies of the score tiles. P and dS are rounded to bf16 before
// their products, as in flash-attention 2. Blocks of 4 warps; a warp owns 16 rows of the block's
// 64 (query rows in the forward and dq kernels, keys in the dk/dv kernel) and the row work of a
// row is shared by a lane pair (columns c ≡ lane mod 2). Dynamic shared memory (the launcher sets
// the per-kernel limit): tc_smem_* below give the sizes, mirrored in attention.rs.
//
// Forward in two passes over the key tiles so that no accumulator ever needs rescaling (the
// WMMA accumulator layout is opaque): pass 1 computes each row's logsumexp from S = Q·Kᵀ,
// pass 2 recomputes S, P = exp(scale·S − lse) (final, normalised) and O += P·V. One extra Q·Kᵀ
// (a third more tensor-core work) buys an O accumulator that lives in registers throughout.
// =============================================================================================
#include <mma.h>

#define TC_ROWS 64  // query rows (or keys) per block: 4 warps × 16
#define TC_TILE 64  // keys (or query rows) per inner tile
#define TC_PAD_H 8  // bf16 row padding: keeps WMMA's 32-byte alignment, spreads the banks
#define TC_PAD_F 4  // f32 row padding

typedef __nv_bfloat16 bf16_t;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bf16_t, nvcuda::wmma::row_major>
    FragA;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16_t, nvcuda::wmma::row_major>
    FragBRow;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16_t, nvcuda::wmma::col_major>
    FragBCol;
typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> FragC;

// rows × D bf16 rows from global memory (row stride `stride` elements; rows ≥ n_rows as 0) into
// shared memory with row stride D + TC_PAD_H; 16-byte vectors when the source allows them.
template <int D>
__device__ void tc_load(bf16_t* dst, const bf16_t* src, int rows, int n_rows, size_t stride) {
    const bool vec = ((reinterpret_cast<uintptr_t>(src) | (stride * sizeof(bf16_t))) & 15) == 0;
    if (vec) {
        constexpr int V = D / 8;
        for (int e = threadIdx.x; e < rows * V; e += blockDim.x) {
            int r = e / V, x = (e % V) * 8;
            uint4 val = make_uint4(0u, 0u, 0u, 0u);
            if (r < n_rows) val = *reinterpret_cast<const uint4*>(src + (size_t)r * stride + x);
            *reinterpret_cast<uint4*>(dst + r * (D + TC_PAD_H) + x) = val;
        }
    } else {
        for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
            int r = e / D, x = e % D;
            dst[r * (D + TC_PAD_H) + x] =
                r < n_rows ? src[(size_t)r * stride + x] : __float2bfloat16(0.f);
        }
    }
}

// out[16 × TC_TILE] (f32, row stride TC_TILE + TC_PAD_F) = a[16 × D] · b[TC_TILE × D]ᵀ, a and b
// bf16 in shared memory with row stride D + TC_PAD_H. One warp.
template <int D>
__device__ void tc_abt(float* out, const bf16_t* a, const bf16_t* b) {
    constexpr int LH = D + TC_PAD_H;
    FragC c[TC_TILE / 16];
#pragma unroll
    for (int n = 0; n < TC_TILE / 16; ++n) nvcuda::wmma::fill_fragment(c[n], 0.f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        FragA fa;
        nvcuda::wmma::load_matrix_sync(fa, a + kk * 16, LH);
#pragma unroll
        for (int n = 0; n < TC_TILE / 16; ++n) {
            FragBCol fb;  // element (k, n) of bᵀ is b[n][k]: b read column-major
            nvcuda::wmma::load_matrix_sync(fb, b + n * 16 * LH + kk * 16, LH);
            nvcuda::wmma::mma_sync(c[n], fa, fb, c[n]);
        }
    }
#pragma unroll
    for (int n = 0; n < TC_TILE / 16; ++n)
        nvcuda::wmma::store_matrix_sync(out + n * 16, c[n], TC_TILE + TC_PAD_F,
                                        nvcuda::wmma::mem_row_major);
}

// acc[16 × D] += a[16 × TC_TILE] · b[TC_TILE × D]; a bf16 with row stride TC_TILE + TC_PAD_H,
// b bf16 with row stride D + TC_PAD_H, both in shared memory. One warp.
template <int D>
__device__ void tc_ab_acc(FragC* acc, const bf16_t* a, const bf16_t* b) {
    constexpr int LH = D + TC_PAD_H;
#pragma unroll
    for (int kk = 0; kk < TC_TILE / 16; ++kk) {
        FragA fa;
        nvcuda::wmma::load_matrix_sync(fa, a + kk * 16, TC_TILE + TC_PAD_H);
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
            FragBRow fb;
            nvcuda::wmma::load_matrix_sync(fb, b + kk * 16 * LH + n * 16, LH);
            nvcuda::wmma::mma_sync(acc[n], fa, fb, acc[n]);
        }
    }
}

// The 16 × D accumulators of each warp → rows [0, n_rows) of `dst` (global, row stride
// `stride`), times `mul`, through `stage` (f32 shared, ≥ TC_ROWS × (D + TC_PAD_F)). Whole block.
template <int D>
__device__ void tc_store_rows(bf16_t* dst, size_t stride, int n_rows, FragC* acc, float* stage,
                              float mul) {
    constexpr int LO = D + TC_PAD_F;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int n = 0; n < D / 16; ++n)
        nvcuda::wmma::store_matrix_sync(stage + warp * 16 * LO + n * 16, acc[n], LO,
                                        nvcuda::wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < n_rows * D; e += blockDim.x) {
        int r = e / D, x = e % D;
        dst[(size_t)r * stride + x] = __float2bfloat16(stage[r * LO + x] * mul);
    }
}

// Forward: grid (ceil(T / TC_ROWS), H), 128 threads.
// Shared: qs, ks, vs [64][D + 8] bf16; ss [64][68] f32; ps [64][72] bf16 (the O staging aliases
// ks and vs at the end).
template <int D>
__device__ void attn_fwd_tc(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                            const bf16_t* __restrict__ v, const uint32_t* __restrict__ doc_start,
                            bf16_t* __restrict__ o, float* __restrict__ lse, int t, int h, int g,
                            int past, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int LH = D + TC_PAD_H, LS = TC_TILE + TC_PAD_F, LP = TC_TILE + TC_PAD_H;
    bf16_t* qs = reinterpret_cast<bf16_t*>(smem);
    bf16_t* ks = qs + TC_ROWS * LH;
    bf16_t* vs = ks + TC_TILE * LH;
    float* ss = reinterpret_cast<float*>(vs + TC_TILE * LH);
    bf16_t* ps = reinterpret_cast<bf16_t*>(ss + TC_ROWS * LS);
    const int head = blockIdx.y, kvh = head / (h / g), s_len = past + t;
    const int i0 = blockIdx.x * TC_ROWS, rows = min(TC_ROWS, t - i0);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wr = warp * 16 + lane / 2, half = lane % 2;  // this lane pair's row
    const int i = i0 + wr;
    const bool row_ok = wr < rows;
    tc_load<D>(qs, q + ((size_t)i0 * h + head) * D, TC_ROWS, rows, (size_t)h * D);
    const bf16_t* kh = k + (size_t)kvh * s_len * D;
    const bf16_t* vh = v + (size_t)kvh * s_len * D;
    const int j_begin = past > 0 ? 0 : (int)doc_start[i0];
    const int j_end = past + i0 + rows;  // exclusive
    // Pass 1: the row's max and sum of exponentials, online.
    float m = -CUDART_INF_F, l = 0.f;
    for (int j0 = j_begin; j0 < j_end; j0 += TC_TILE) {
        __syncthreads();
        tc_load<D>(ks, kh + (size_t)j0 * D, TC_TILE, min(TC_TILE, s_len - j0), D);
        __syncthreads();
        tc_abt<D>(ss + warp * 16 * LS, qs + warp * 16 * LH, ks);
        __syncwarp();
        float tmax = -CUDART_INF_F;
        for (int c = half; c < TC_TILE; c += 2) {
            int j = j0 + c;
            if (row_ok && j < j_end && visible(i, j, past, doc_start))
                tmax = fmaxf(tmax, ss[wr * LS + c] * scale);
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        const float m_new = fmaxf(m, tmax);
        float sum = 0.f;
        for (int c = half; c < TC_TILE; c += 2) {
            int j = j0 + c;
            if (row_ok && j < j_end && visible(i, j, past, doc_start))
                sum += expf(ss[wr * LS + c] * scale - m_new);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = (m == -CUDART_INF_F ? 0.f : l * expf(m - m_new)) + sum;
        m = m_new;
    }
    const float row_lse = l > 0.f ? m + logf(l) : 0.f;
    // Pass 2: P with its final normalisation, O += P·V in the accumulators.
    FragC acc[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; ++n) nvcuda::wmma::fill_fragment(acc[n], 0.f);
    for (int j0 = j_begin; j0 < j_end; j0 += TC_TILE) {
        __syncthreads();
        const int n_keys = min(TC_TILE, s_len - j0);
        tc_load<D>(ks, kh + (size_t)j0 * D, TC_TILE, n_keys, D);
        tc_load<D>(vs, vh + (size_t)j0 * D, TC_TILE, n_keys, D);
        __syncthreads();
        tc_abt<D>(ss + warp * 16 * LS, qs + warp * 16 * LH, ks);
        __syncwarp();
        for (int c = half; c < TC_TILE; c += 2) {
            int j = j0 + c;
            bool ok = row_ok && j < j_end && visible(i, j, past, doc_start);
            ps[wr * LP + c] = __float2bfloat16(ok ? expf(ss[wr * LS + c] * scale - row_lse) : 0.f);
        }
        __syncwarp();
        tc_ab_acc<D>(acc, ps + warp * 16 * LP, vs);
    }
    __syncthreads();  // the staging below overwrites ks and vs
    tc_store_rows<D>(o + ((size_t)i0 * h + head) * D, (size_t)h * D, rows, acc,
                     reinterpret_cast<float*>(ks), 1.f);
    if (row_ok && half == 0) lse[(size_t)i * h + head] = row_lse;
}

// dq: grid (ceil(T / TC_ROWS), H), 128 threads.
// Shared: qs, dos, ks, vs [64][D + 8] bf16; ss, dps [64][68] f32; dss [64][72] bf16.
template <int D>
__device__ void attn_bwd_dq_tc(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                               const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_o,
                               const float* __restrict__ lse, const float* __restrict__ big_d,
                               const uint32_t* __restrict__ doc_start, bf16_t* __restrict__ dq,
                               int t, int h, int g, int past, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int LH = D + TC_PAD_H, LS = TC_TILE + TC_PAD_F, LP = TC_TILE + TC_PAD_H;
    bf16_t* qs = reinterpret_cast<bf16_t*>(smem);
    bf16_t* dos = qs + TC_ROWS * LH;
    bf16_t* ks = dos + TC_ROWS * LH;
    bf16_t* vs = ks + TC_TILE * LH;
    float* ss = reinterpret_cast<float*>(vs + TC_TILE * LH);
    float* dps = ss + TC_ROWS * LS;
    bf16_t* dss = reinterpret_cast<bf16_t*>(dps + TC_ROWS * LS);
    const int head = blockIdx.y, kvh = head / (h / g), s_len = past + t;
    const int i0 = blockIdx.x * TC_ROWS, rows = min(TC_ROWS, t - i0);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wr = warp * 16 + lane / 2, half = lane % 2;
    const int i = i0 + wr;
    const bool row_ok = wr < rows;
    tc_load<D>(qs, q + ((size_t)i0 * h + head) * D, TC_ROWS, rows, (size_t)h * D);
    tc_load<D>(dos, d_o + ((size_t)i0 * h + head) * D, TC_ROWS, rows, (size_t)h * D);
    const float lse_i = row_ok ? lse[(size_t)i * h + head] : 0.f;
    const float d_i = row_ok ? big_d[(size_t)i * h + head] : 0.f;
    const bf16_t* kh = k + (size_t)kvh * s_len * D;
    const bf16_t* vh = v + (size_t)kvh * s_len * D;
    FragC acc[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; ++n) nvcuda::wmma::fill_fragment(acc[n], 0.f);
    const int j_begin = past > 0 ? 0 : (int)doc_start[i0];
    const int j_end = past + i0 + rows;
    for (int j0 = j_begin; j0 < j_end; j0 += TC_TILE) {
        __syncthreads();
        const int n_keys = min(TC_TILE, s_len - j0);
        tc_load<D>(ks, kh + (size_t)j0 * D, TC_TILE, n_keys, D);
        tc_load<D>(vs, vh + (size_t)j0 * D, TC_TILE, n_keys, D);
        __syncthreads();
        tc_abt<D>(ss + warp * 16 * LS, qs + warp * 16 * LH, ks);    // S = Q·Kᵀ
        tc_abt<D>(dps + warp * 16 * LS, dos + warp * 16 * LH, vs);  // dP = dO·Vᵀ
        __syncwarp();
        for (int c = half; c < TC_TILE; c += 2) {
            int j = j0 + c;
            float ds = 0.f;
            if (row_ok && j < j_end && visible(i, j, past, doc_start)) {
                float p = expf(ss[wr * LS + c] * scale - lse_i);
                ds = p * (dps[wr * LS + c] - d_i);
            }
            dss[wr * LP + c] = __float2bfloat16(ds);
        }
        __syncwarp();
        tc_ab_acc<D>(acc, dss + warp * 16 * LP, ks);  // dq += dS·K
    }
    __syncthreads();  // the staging below overwrites ks and vs
    tc_store_rows<D>(dq + ((size_t)i0 * h + head) * D, (size_t)h * D, rows, acc,
                     reinterpret_cast<float*>(ks), scale);
}

// dk, dv: grid (ceil(S / TC_ROWS), G), 128 threads; keys as in attn_bwd_dkdv.
// Shared: ks, vs, qs, dos [64][D + 8] bf16; sts, dpts [64][68] f32; pts, dsts [64][72] bf16;
// lses, drows [64] f32 (the staging aliases qs and dos at the end).
template <int D>
__device__ void attn_bwd_dkdv_tc(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                 const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_o,
                                 const float* __restrict__ lse, const float* __restrict__ big_d,
                                 const uint32_t* __restrict__ doc_start,
                                 const uint32_t* __restrict__ doc_end, bf16_t* __restrict__ dkv,
                                 int t, int h, int g, int past, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int LH = D + TC_PAD_H, LS = TC_TILE + TC_PAD_F, LP = TC_TILE + TC_PAD_H;
    bf16_t* ks = reinterpret_cast<bf16_t*>(smem);
    bf16_t* vs = ks + TC_ROWS * LH;
    bf16_t* qs = vs + TC_ROWS * LH;
    bf16_t* dos = qs + TC_TILE * LH;
    float* sts = reinterpret_cast<float*>(dos + TC_TILE * LH);
    float* dpts = sts + TC_ROWS * LS;
    bf16_t* pts = reinterpret_cast<bf16_t*>(dpts + TC_ROWS * LS);
    bf16_t* dsts = pts + TC_ROWS * LP;
    float* lses = reinterpret_cast<float*>(dsts + TC_ROWS * LP);
    float* drows = lses + TC_TILE;
    const int kvh = blockIdx.y, group = h / g, s_len = past + t;
    const int j0 = blockIdx.x * TC_ROWS;
    const int n_keys = min(TC_ROWS, s_len - j0);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wc = warp * 16 + lane / 2, half = lane % 2;  // this lane pair's key
    const int j = j0 + wc;
    const bool key_ok = wc < n_keys;
    tc_load<D>(ks, k + ((size_t)kvh * s_len + j0) * D, TC_ROWS, n_keys, D);
    tc_load<D>(vs, v + ((size_t)kvh * s_len + j0) * D, TC_ROWS, n_keys, D);
    FragC acc_k[D / 16], acc_v[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
        nvcuda::wmma::fill_fragment(acc_k[n], 0.f);
        nvcuda::wmma::fill_fragment(acc_v[n], 0.f);
    }
    const int j_last = j0 + n_keys - 1;
    const int i_begin = j0 < past ? 0 : j0 - past;
    // Cached keys (j < past) are seen by every query.
    const int i_end = j0 < past ? t : (int)doc_end[j_last - past] + 1;  // exclusive
    for (int head = kvh * group; head < (kvh + 1) * group; ++head) {
        for (int i0 = i_begin; i0 < i_end; i0 += TC_TILE) {
            const int rows = min(TC_TILE, t - i0);
            __syncthreads();
            tc_load<D>(qs, q + ((size_t)i0 * h + head) * D, TC_TILE, rows, (size_t)h * D);
            tc_load<D>(dos, d_o + ((size_t)i0 * h + head) * D, TC_TILE, rows, (size_t)h * D);
            for (int r = threadIdx.x; r < TC_TILE; r += blockDim.x) {
                bool ok = r < rows;
                lses[r] = ok ? lse[(size_t)(i0 + r) * h + head] : 0.f;
                drows[r] = ok ? big_d[(size_t)(i0 + r) * h + head] : 0.f;
            }
            __syncthreads();
            tc_abt<D>(sts + warp * 16 * LS, ks + warp * 16 * LH, qs);    // Sᵀ = K·Qᵀ
            tc_abt<D>(dpts + warp * 16 * LS, vs + warp * 16 * LH, dos);  // dPᵀ = V·dOᵀ
            __syncwarp();
            for (int r = half; r < TC_TILE; r += 2) {
                float p = 0.f, ds = 0.f;
                if (key_ok && r < rows && visible(i0 + r, j, past, doc_start)) {
                    p = expf(sts[wc * LS + r] * scale - lses[r]);
                    ds = p * (dpts[wc * LS + r] - drows[r]);
                }
                pts[wc * LP + r] = __float2bfloat16(p);
                dsts[wc * LP + r] = __float2bfloat16(ds);
            }
            __syncwarp();
            tc_ab_acc<D>(acc_v, pts + warp * 16 * LP, dos);  // dv += Pᵀ·dO
            tc_ab_acc<D>(acc_k, dsts + warp * 16 * LP, qs);  // dk += dSᵀ·Q
        }
    }
    // dkv holds dk [G, S, D] then dv [G, S, D].
    bf16_t* dk_rows = dkv + ((size_t)kvh * s_len + j0) * D;
    bf16_t* dv_rows = dk_rows + (size_t)g * s_len * D;
    float* stage = reinterpret_cast<float*>(qs);
    __syncthreads();  // the staging overwrites qs and dos
    tc_store_rows<D>(dk_rows, D, n_keys, acc_k, stage, scale);
    __syncthreads();
    tc_store_rows<D>(dv_rows, D, n_keys, acc_v, stage, 1.f);
}

#define INSTANTIATE_TC(D)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) attention_fwd_tc_bf16_d##D(              \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const uint32_t* doc_start, bf16_t* o, \
        float* lse, int t, int h, int g, int past, float scale) {                               \
        attn_fwd_tc<D>(q, k, v, doc_start, o, lse, t, h, g, past, scale);                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_dq_tc_bf16_d##D(           \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* d_o, const float* lse, \
        const float* big_d, const uint32_t* doc_start, bf16_t* dq, int t, int h, int g,         \
        int past, float scale) {                                                                \
        attn_bwd_dq_tc<D>(q, k, v, d_o, lse, big_d, doc_start, dq, t, h, g, past, scale);       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_dkdv_tc_bf16_d##D(         \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* d_o, const float* lse, \
        const float* big_d, const uint32_t* doc_start, const uint32_t* doc_end, bf16_t* dkv,    \
        int t, int h, int g, int past, float scale) {                                           \
        attn_bwd_dkdv_tc<D>(q, k, v, d_o, lse, big_d, doc_start, doc_end, dkv, t, h, g, past,  \
                            scale);                                                             \
    }

INSTANTIATE_TC(64)
INSTANTIATE_TC(128)
