// cuda_emu.h: the CUDA C++ device dialect of kernels/*.cu, on the CPU, for finetune-kernel-emu.
// Force-included (-include) before each kernel file, which build.rs compiles with g++ after two
// textual rewrites (static `__shared__` → `static thread_local`, `extern __shared__ T name[]` →
// a pointer to this launch's dynamic shared memory). Every CUDA thread of a block is a fiber
// (runtime.cpp); the built-ins below read the running fiber's coordinates, and every
// synchronising intrinsic (__syncthreads, __syncwarp, the shuffles) is a point where the fiber
// yields to the block's scheduler. What the hardware leaves undefined and we can see is an error
// of the launch: a shuffle or __syncwarp naming a lane that has exited or waits elsewhere,
// participants with different masks, a deadlock, a misaligned WMMA pointer or stride, dynamic
// shared memory over the H100's 227 KiB.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct uint4 {
    unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

namespace emu {
struct Coordinates {
    dim3 thread, block, block_dim, grid_dim;
};
// The running fiber's coordinates (runtime.cpp sets them before resuming a fiber).
extern thread_local Coordinates current;
extern thread_local unsigned char* dynamic_shared;
// Synchronisation points: they return once the scheduler releases them.
void sync_block();
void sync_warp(unsigned mask);
// Exchanges `bits` within the warp: every lane in `mask` names a source lane and gets that
// lane's bits. Returns the source lane's value.
uint64_t shuffle(unsigned mask, uint64_t bits, int src_lane);
[[noreturn]] void fail(const char* what);
// Fills a static shared array with 0xff bytes once per block (build.rs inserts the calls).
void poison_shared(void* p, size_t bytes);
}  // namespace emu

#define threadIdx (emu::current.thread)
#define blockIdx (emu::current.block)
#define blockDim (emu::current.block_dim)
#define gridDim (emu::current.grid_dim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define EMU_DYNAMIC_SHARED(T) (reinterpret_cast<T*>(emu::dynamic_shared))
#define EMU_POISON_SHARED(x) emu::poison_shared(&(x), sizeof(x))

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::sync_warp(mask); }

template <typename T>
inline T emu_shuffle(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = emu::shuffle(mask, bits, src);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}
inline int emu_lane() {
    return (int)((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    int lane = emu_lane();
    int src = (lane & ~(width - 1)) | ((lane % width) ^ lane_mask);
    return emu_shuffle(mask, v, src >= (lane & ~(width - 1)) + width ? lane : src);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    int lane = emu_lane();
    return emu_shuffle(mask, v, (lane & ~(width - 1)) + (src_lane % width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = emu_lane();
    int base = lane & ~(width - 1);
    int src = lane + (int)delta;
    return emu_shuffle(mask, v, src < base + width ? src : lane);
}

// Arithmetic: one CPU thread runs a block's fibers one at a time, so atomics are plain updates.
inline float atomicAdd(float* p, float v) {
    float old = *p;
    *p = old + v;
    return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    unsigned old = *p;
    *p = old + v;
    return old;
}
inline int atomicAdd(int* p, int v) {
    int old = *p;
    *p = old + v;
    return old;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
// The _rn intrinsics are IEEE operations rounded to nearest (build.rs turns off contraction, so
// a product is never fused into a following sum unless the kernel writes fmaf).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline int __float_as_int(float f) {
    int u;
    memcpy(&u, &f, 4);
    return u;
}
