// runtime.cpp: the scheduler behind cuda_emu.h. A launch runs its blocks one after the other on
// the calling OS thread; a block's CUDA threads are ucontext fibers that run, one at a time,
// until they reach a synchronisation point or return. When no fiber can run, the scheduler
// releases what is complete — a __syncthreads once every live thread of the block waits at
// one, a warp's __syncwarp or shuffle once every lane of its mask waits at one (a shuffle's
// results are computed at that moment, from the values the lanes brought) — and reports a
// deadlock when nothing is. Warps run one at a time up to the block barrier (run_block), so
// a kernel that reads shared memory another warp or lane writes without the barrier between
// them reads it stale or unwritten in one of the two orders (`order`): the tests run both.
#include "cuda_emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <string>
#include <unordered_map>
#include <vector>

namespace emu {
thread_local Coordinates current;
thread_local unsigned char* dynamic_shared;

namespace {
enum class Wait { Ready, Block, WarpSync, Shuffle, Done };

struct Fiber {
    ucontext_t context;
    Wait wait = Wait::Ready;
    dim3 thread;
    unsigned mask = 0;
    uint64_t bits = 0;  // a shuffle's value in, its result out
    int source = 0;
};

struct Stack {
    unsigned char* base;  // the guard page, then the usable stack
    size_t size;
};

constexpr size_t kStackBytes = 512 * 1024;
constexpr unsigned kMaxDynamicShared = 227 * 1024;  // H100/H200 opt-in maximum per block

struct State {
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    Fiber* running = nullptr;
    bool failed = false;
    std::string error;
    void (*body)(const void*) = nullptr;
    const void* context = nullptr;
};

thread_local State* state = nullptr;
// Counts blocks run on this OS thread (never reset, so every block is a new generation).
thread_local unsigned long block_generation = 0;
thread_local std::vector<Stack> stack_pool;

unsigned char* map_or_die(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("finetune-kernel-emu: mmap");
        abort();
    }
    return static_cast<unsigned char*>(p);
}

const Stack& stack_for(size_t i) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    while (stack_pool.size() <= i) {
        unsigned char* base = map_or_die(kStackBytes + page);
        mprotect(base, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
        stack_pool.push_back({base, kStackBytes + page});
    }
    return stack_pool[i];
}

std::string where(const Fiber& f) {
    char buf[160];
    snprintf(buf, sizeof buf, "block (%u, %u, %u), thread (%u, %u, %u)", current.block.x,
             current.block.y, current.block.z, f.thread.x, f.thread.y, f.thread.z);
    return buf;
}

void fiber_entry() {
    State* s = state;
    s->body(s->context);
    s->running->wait = Wait::Done;
    // returning resumes uc_link, the scheduler
}

void park(Wait wait) {
    State* s = state;
    Fiber* f = s->running;
    f->wait = wait;
    swapcontext(&f->context, &s->scheduler);
}

void fail_launch(std::string what) {
    if (!state->failed) {
        state->failed = true;
        state->error = std::move(what);
    }
}

// Releases the complete warp operations of the warp whose lane 0 is `base`; false with an
// error set on undefined behaviour.
bool release_warp(State& s, unsigned base, unsigned threads, bool& released) {
    for (unsigned lane = 0; lane < 32 && base + lane < threads; ++lane) {
        Fiber& f = s.fibers[base + lane];
        if (f.wait != Wait::WarpSync && f.wait != Wait::Shuffle) continue;
        bool complete = true;
        for (unsigned other = 0; other < 32; ++other) {
            if (!((f.mask >> other) & 1u)) continue;
            if (base + other >= threads) {
                fail_launch(where(f) + ": mask names lane " + std::to_string(other) +
                            ", which the block does not have");
                return false;
            }
            Fiber& o = s.fibers[base + other];
            if (o.wait == Wait::Done) {
                fail_launch(where(f) + ": a " + (f.wait == Wait::Shuffle ? "shuffle" : "__syncwarp") +
                            "'s mask names lane " + std::to_string(other) +
                            ", which has exited (undefined behaviour)");
                return false;
            }
            if (o.wait == Wait::Ready || o.wait == Wait::Block) {
                complete = false;
                continue;
            }
            if (o.wait != f.wait || o.mask != f.mask) {
                fail_launch(where(f) + " and lane " + std::to_string(other) +
                            " meet at different warp operations (shuffle vs __syncwarp or "
                            "different masks)");
                return false;
            }
        }
        if (!complete) continue;
        // Everyone in the mask is here: compute shuffle results from the values brought.
        uint64_t out[32] = {};
        for (unsigned other = 0; other < 32; ++other) {
            if (!((f.mask >> other) & 1u)) continue;
            Fiber& o = s.fibers[base + other];
            if (o.wait == Wait::Shuffle) {
                unsigned src = (unsigned)o.source;
                if (src >= 32 || !((f.mask >> src) & 1u)) {
                    fail_launch(where(o) + ": shuffle reads lane " + std::to_string(src) +
                                ", outside its mask");
                    return false;
                }
                out[other] = s.fibers[base + src].bits;
            }
        }
        for (unsigned other = 0; other < 32; ++other) {
            if (!((f.mask >> other) & 1u)) continue;
            Fiber& o = s.fibers[base + other];
            if (o.wait == Wait::Shuffle) o.bits = out[other];
            o.wait = Wait::Ready;
        }
        released = true;
    }
    return true;
}

bool run_block(State& s, unsigned threads, int order) {
    for (unsigned i = 0; i < threads; ++i) {
        Fiber& f = s.fibers[i];
        const Stack& st = stack_for(i);
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        f.wait = Wait::Ready;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = st.base + page;
        f.context.uc_stack.ss_size = st.size - page;
        f.context.uc_link = &s.scheduler;
        makecontext(&f.context, fiber_entry, 0);
    }
    // Warp by warp (ascending or descending): a warp's lanes run (in the same order) until
    // each is blocked, its complete warp operations are released, and again, until the warp
    // waits at __syncthreads, has exited or is stuck; only then does the next warp start. So
    // one warp always runs ahead of the others to the barrier, and within a warp one lane
    // ahead of the others to the next warp operation: a read that another warp's or lane's
    // write must precede, without the barrier that orders them, comes first in one order.
    const unsigned warps = (threads + 31) / 32;
    for (;;) {
        for (unsigned wn = 0; wn < warps; ++wn) {
            unsigned base = 32 * (order == 0 ? wn : warps - 1 - wn);
            unsigned width = threads - base < 32 ? threads - base : 32;
            for (;;) {
                bool ran = false;
                for (unsigned n = 0; n < width; ++n) {
                    Fiber& f = s.fibers[base + (order == 0 ? n : width - 1 - n)];
                    if (f.wait != Wait::Ready) continue;
                    s.running = &f;
                    current.thread = f.thread;
                    swapcontext(&s.scheduler, &f.context);
                    if (s.failed) return false;
                    ran = true;
                }
                bool released = false;
                if (!release_warp(s, base, threads, released)) return false;
                if (!ran && !released) break;
            }
        }
        unsigned live = 0, at_block = 0, at_warp = 0;
        for (unsigned i = 0; i < threads; ++i) {
            Wait w = s.fibers[i].wait;
            if (w == Wait::Done) continue;
            ++live;
            if (w == Wait::Block) ++at_block;
            if (w == Wait::WarpSync || w == Wait::Shuffle) ++at_warp;
        }
        if (live == 0) return true;
        if (at_block == live) {
            for (unsigned i = 0; i < threads; ++i)
                if (s.fibers[i].wait == Wait::Block) s.fibers[i].wait = Wait::Ready;
            continue;
        }
        char buf[256];
        snprintf(buf, sizeof buf,
                 "deadlock in block (%u, %u, %u): %u live threads, %u at __syncthreads, %u at a "
                 "warp operation whose mask includes a thread at __syncthreads",
                 current.block.x, current.block.y, current.block.z, live, at_block, at_warp);
        fail_launch(buf);
        return false;
    }
}
}  // namespace

void sync_block() { park(Wait::Block); }

void poison_shared(void* p, size_t bytes) {
    static thread_local std::unordered_map<void*, unsigned long> poisoned_in;
    unsigned long& generation = poisoned_in[p];
    if (generation != block_generation) {
        memset(p, 0xff, bytes);
        generation = block_generation;
    }
}

void sync_warp(unsigned mask) {
    state->running->mask = mask;
    park(Wait::WarpSync);
}

uint64_t shuffle(unsigned mask, uint64_t bits, int src_lane) {
    Fiber* f = state->running;
    f->mask = mask;
    f->bits = bits;
    f->source = src_lane;
    park(Wait::Shuffle);
    return f->bits;
}

void fail(const char* what) {
    fail_launch(where(*state->running) + ": " + what);
    swapcontext(&state->running->context, &state->scheduler);
    abort();  // a failed launch never resumes its fibers
}
}  // namespace emu

// Runs body(context) as every thread of a grid × block launch. 0 on success; otherwise 1 and
// a NUL-terminated message in error[0..error_len).
extern "C" int finetune_emu_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                   unsigned by, unsigned bz, unsigned shared_bytes, int order,
                                   void (*body)(const void*), const void* context, char* error,
                                   size_t error_len) {
    using namespace emu;
    auto refuse = [&](const std::string& msg) {
        snprintf(error, error_len, "%s", msg.c_str());
        return 1;
    };
    unsigned threads = bx * by * bz;
    if (threads == 0 || threads > 1024 || bz > 64)
        return refuse("block of " + std::to_string(threads) + " threads (1..=1024 allowed)");
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535)
        return refuse("grid (" + std::to_string(gx) + ", " + std::to_string(gy) + ", " +
                      std::to_string(gz) + ") outside the device's limits");
    if (shared_bytes > kMaxDynamicShared)
        return refuse(std::to_string(shared_bytes) + " bytes of dynamic shared memory (> " +
                      std::to_string(kMaxDynamicShared) + ")");
    if (state != nullptr) return refuse("launch from inside a launch");

    // Dynamic shared memory ends at a guard page, and starts filled with 0xff bytes (NaN as
    // f32) so that a read of memory no thread wrote shows up in the results.
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t span = (shared_bytes + 127) / 128 * 128;
    size_t mapped = (span + page - 1) / page * page + page;
    unsigned char* region = map_or_die(mapped);
    mprotect(region + mapped - page, page, PROT_NONE);
    unsigned char* shared = region + mapped - page - span;

    State s;
    s.body = body;
    s.context = context;
    s.fibers.resize(threads);
    for (unsigned i = 0; i < threads; ++i)
        s.fibers[i].thread = {i % bx, (i / bx) % by, i / (bx * by)};
    state = &s;
    current.block_dim = {bx, by, bz};
    current.grid_dim = {gx, gy, gz};
    dynamic_shared = shared;
    bool ok = true;
    for (unsigned z = 0; z < gz && ok; ++z)
        for (unsigned y = 0; y < gy && ok; ++y)
            for (unsigned x = 0; x < gx && ok; ++x) {
                current.block = {x, y, z};
                ++block_generation;
                memset(shared, 0xff, span);
                ok = run_block(s, threads, order);
            }
    state = nullptr;
    dynamic_shared = nullptr;
    munmap(region, mapped);
    if (!ok) return refuse(s.error);
    return 0;
}
