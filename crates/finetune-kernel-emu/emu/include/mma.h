// mma.h for finetune-kernel-emu: nvcuda::wmma on the CPU. A fragment's element layout across
// the warp's lanes is unspecified by CUDA, so here every lane holds the whole tile: each lane
// loads and multiplies all of it, which gives the warp-level result the API defines; a store
// writes each lane's share only (below), so reads of a stored tile need the __syncwarp the GPU
// needs.
// A kernel that indexes fragment elements by position (layout-dependent code) would not port;
// uniform element-wise updates over x[0..num_elements) do. Alignment rules of the API are
// checked: pointers 256-bit aligned, ldm a multiple of 16 bytes.
#pragma once
#include "cuda_bf16.h"
#include "cuda_emu.h"  // emu_lane, emu::fail
#include <stdint.h>

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct tile_shape;
template <int M, int N, int K> struct tile_shape<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K> struct tile_shape<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K> struct tile_shape<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int rows = tile_shape<Use, M, N, K>::rows;
    static constexpr int cols = tile_shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    T x[num_elements];  // row-major tile
};

template <typename T>
inline void check_operand(const void* p, unsigned ldm, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail(what);
    if ((ldm * sizeof(T)) % 16 != 0) emu::fail(what);
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T v) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}
template <typename Use, int M, int N, int K, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, __nv_bfloat16, Layout>& f, float v) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = __nv_bfloat16(v);
}

template <typename Use, int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const T* p, unsigned ldm) {
    check_operand<T>(p, ldm, "wmma::load_matrix_sync: pointer not 256-bit aligned or ldm not a multiple of 16 bytes");
    for (int r = 0; r < f.rows; ++r)
        for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = p[(size_t)r * ldm + c];
}
template <typename Use, int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, col_major>& f, const T* p, unsigned ldm) {
    check_operand<T>(p, ldm, "wmma::load_matrix_sync: pointer not 256-bit aligned or ldm not a multiple of 16 bytes");
    for (int r = 0; r < f.rows; ++r)
        for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = p[(size_t)c * ldm + r];
}
template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm,
                             layout_t layout) {
    check_operand<T>(p, ldm, "wmma::load_matrix_sync: pointer not 256-bit aligned or ldm not a multiple of 16 bytes");
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c)
            f.x[r * N + c] = layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
}
// Each lane stores only its share of the tile (element e where e % 32 is the lane), as on the
// GPU, where each lane holds part of the fragment: a lane that reads elements of the stored
// tile before a __syncwarp sees the other lanes' elements unwritten.
template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                              layout_t layout) {
    check_operand<T>(p, ldm, "wmma::store_matrix_sync: pointer not 256-bit aligned or ldm not a multiple of 16 bytes");
    const int lane = emu_lane();
    for (int e = lane; e < M * N; e += 32) {
        int r = e / N, c = e % N;
        if (layout == mem_row_major) p[(size_t)r * ldm + c] = f.x[e];
        else p[(size_t)c * ldm + r] = f.x[e];
    }
}

// d = a·b + c: exact products of the 16-bit inputs summed in f32, k in order.
template <int M, int N, int K, typename TA, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
    float out[M * N];
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float s = c.x[i * N + j];
            for (int k = 0; k < K; ++k) s += (float)a.x[i * K + k] * (float)b.x[k * N + j];
            out[i * N + j] = s;
        }
    for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda
