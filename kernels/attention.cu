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
