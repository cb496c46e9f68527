// probes.cu: kernels that break CUDA's rules on purpose, for the scheduler's own tests
// (tests/scheduler.rs): each check of runtime.cpp must be seen to fail.
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

// out[i] = the value thread (i + 1) % n wrote to shared memory; `barrier` says whether the
// read waits for the write.
extern "C" __global__ void probe_neighbour(float* out, int barrier) {
    __shared__ float cell[256];
    int i = threadIdx.x, n = blockDim.x;
    cell[i] = (float)(blockIdx.x * 1000 + i);
    if (barrier) __syncthreads();
    out[blockIdx.x * n + i] = cell[(i + 1) % n];
}

// out[i] = the warp's sum by xor shuffles; lanes ≥ `live` return first.
extern "C" __global__ void probe_warp_sum(float* out, int live) {
    int lane = threadIdx.x % 32;
    if (lane >= live) return;
    float v = (float)lane;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    out[threadIdx.x] = v;
}

// Half a warp at __syncwarp, the other half at __syncthreads: neither can complete.
extern "C" __global__ void probe_deadlock() {
    if (threadIdx.x % 32 < 16) __syncwarp();
    else __syncthreads();
}

// One 16×16×16 WMMA product from global memory at `offset` elements past `a`.
extern "C" __global__ void probe_wmma(const __nv_bfloat16* a, float* out, int offset) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
    wmma::fill_fragment(fc, 0.f);
    wmma::load_matrix_sync(fa, a + offset, 16);
    wmma::load_matrix_sync(fb, a + offset, 16);
    wmma::mma_sync(fc, fa, fb, fc);
    wmma::store_matrix_sync(out, fc, 16, wmma::mem_row_major);
}

// Dynamic shared memory: thread i writes then (after a barrier) reads back element i.
extern "C" __global__ void probe_dynamic(float* out) {
    extern __shared__ __align__(16) float dyn[];
    dyn[threadIdx.x] = 2.f * threadIdx.x;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = dyn[(threadIdx.x + 1) % blockDim.x];
}

// E4M3 conversions of cuda_fp8.h: q[i] = e4m3(x[i]) (saturating), back[i] = its value.
#include <cuda_fp8.h>
extern "C" __global__ void probe_e4m3(const float* x, uint8_t* q, float* back, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    q[i] = __nv_cvt_float_to_fp8(x[i], __NV_SATFINITE, __NV_E4M3);
    back[i] = __half2float(__half(__nv_cvt_fp8_to_halfraw(q[i], __NV_E4M3)));
}

// Static shared memory written only by the first `written` threads, then read by all: the
// rest read what the block started with (poisoned by the emulator, garbage on a GPU).
extern "C" __global__ void probe_unwritten(float* out, int written) {
    __shared__ float cell[64], other;
    if ((int)threadIdx.x < written) cell[threadIdx.x] = (float)blockIdx.x;
    if (threadIdx.x == 0) other = 1.f;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = cell[threadIdx.x] * other;
}

// Two block-wide sums through the same 32-float scratch (cross_entropy.cu's block_reduce):
// out[0] = Σ 1, out[1] = Σ 2 over the block. Without `first_barrier`, a warp that has finished
// the first sum writes its part of the second over a slot another warp has yet to read.
__device__ float probe_warp_total(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
__device__ float probe_block_total(float v, float* scratch, int first_barrier) {
    v = probe_warp_total(v);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (first_barrier) __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return probe_warp_total(v);
}
extern "C" __global__ void probe_two_sums(float* out, int first_barrier) {
    __shared__ float scratch[32];
    float a = probe_block_total(1.f, scratch, first_barrier);
    float b = probe_block_total(2.f, scratch, first_barrier);
    if (threadIdx.x == 0) {
        out[0] = a;
        out[1] = b;
    }
}

// A warp stores a WMMA accumulator tile (all 2.0) to shared memory, then each lane reads an
// element another lane stored: correct only with the __syncwarp between (`sync`).
extern "C" __global__ void probe_wmma_store_read(float* out, int sync) {
    __shared__ __align__(32) float tile[16 * 16];
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c;
    nvcuda::wmma::fill_fragment(c, 2.f);
    nvcuda::wmma::store_matrix_sync(tile, c, 16, nvcuda::wmma::mem_row_major);
    if (sync) __syncwarp();
    out[threadIdx.x] = tile[threadIdx.x * 8 + 1];
}
