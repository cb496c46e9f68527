// kernel_profile.c: a per-kernel GPU time profiler for ANY CUDA process, built as a CUDA
// injection library on NVIDIA's CUPTI activity API. The same .so profiles `finetune` (Rust,
// candle, cuBLAS, our kernels) and the PyTorch + PEFT baseline, so both sides of
// scripts/bench-gpu.sh are measured by one instrument.
//
// Use (the driver loads the library at cuInit and calls InitializeInjection()):
//   CUDA_INJECTION64_PATH=/abs/path/libkernel_profile.so   (an absolute path)
//   KERNEL_PROFILE_OUT=/tmp/run.kernels.tsv   (default: stderr; "%p" is replaced by the pid)
//   KERNEL_PROFILE_LABEL=ours-bf16            (free text for the table's header)
//   set in the environment of any CUDA program, e.g. `env CUDA_INJECTION64_PATH=... CMD ARGS`.
// libcupti.so.13 must be on the loader path (scripts/device-run.sh exec puts PyTorch's
// site-packages/nvidia/*/lib there). Build: scripts/device-run.sh build (gcc -shared -fPIC
// -O2 -Wall -Wextra -Werror against the headers of the nvidia-cuda-cupti wheel, -lcupti).
//
// What it records: CUPTI activity records of kind CONCURRENT_KERNEL (does not serialize
// kernels, unlike KIND_KERNEL), MEMCPY and MEMSET, for the whole life of the process. Each
// record carries GPU start and end timestamps in ns. At exit (atexit, after
// cuptiActivityFlushAll(FORCED); also flushed when a context is being destroyed, since Rust
// drops its context before atexit handlers run) it writes one TSV:
//   - one row per distinct kernel name (the full mangled name is the key, so two template
//     instantiations stay two rows), one row per memcpy direction (HtoD, DtoH, DtoD, ...) and
//     one for memset, sorted by total time;
//   - per row: calls; total_ns = Σ (end − start) over the row's records; mean_ns = total_ns /
//     calls; min_ns, max_ns; share = total_ns / Σ total_ns over all rows (kernels + copies +
//     sets, so the column sums to 1); bytes (copies and sets); grid and block of the first
//     launch ('*' appended when a later launch of the same kernel used another shape); the
//     short name (demangled with libstdc++'s __cxa_demangle when the process has it, argument
//     lists emptied and the deepest template arguments elided until it fits 160 characters)
//     and the full demangled name;
//   - header lines ('#'): kernel_ns = Σ kernel durations (kernels on concurrent streams both
//     count, so this can exceed the wall time), gpu_busy_ns = length of the UNION of all
//     record intervals (time with at least one kernel/copy/set running), span_ns = last end −
//     first start, idle_ns = span_ns − gpu_busy_ns (GPU waiting for the host: launch overhead,
//     host work, synchronizations), and the counts of dropped records and of records CUPTI
//     delivered without timestamps (both should be 0; if not, totals are undercounts).
// Scope: if the program marks a profiler range (cuProfilerStart .. cuProfilerStop, or the
// runtime's cudaProfilerStart/Stop, e.g. torch.cuda.profiler.start/stop; the first range
// only), everything recorded before it opened is dropped and only records that START inside
// it count, whenever CUPTI delivers them (header `scope=range range_ns=… outside_range=…`);
// `finetune bench train` and scripts/bench_gpu_train.py mark their measured steps, having
// synchronized the device. Without a range the totals cover the whole process, model loading
// included (`scope=process`). scripts/bench-gpu.sh divides by the measured steps, or by
// warm-up + measured steps for a whole-process table.
//
// Record layouts: CUpti_ActivityKernel10 / Memcpy6 / Memset4 are the CUPTI 13.0 headers'
// current versions. CUPTI fills the newest version of its own release; the fields read here
// (kind, start, end, grid, block, name, copyKind, bytes) sit at the same offsets in CUPTI
// 13.0.48, 13.0.85 (Kernel10, Memcpy6, Memset4) and 13.5.25 (Kernel13, Memcpy7, Memset5),
// checked by compiling offsetof against each wheel's headers; the _Static_asserts below pin
// them, and the table header prints the runtime CUPTI version next to the compiled one.
#define _GNU_SOURCE
#include <cupti.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef CUpti_ActivityKernel10 kp_kernel_record;
typedef CUpti_ActivityMemcpy6 kp_memcpy_record;
typedef CUpti_ActivityMemset4 kp_memset_record;

// The offsets that CUPTI 13.0 and 13.5 agree on (see the header comment): a header whose
// layout differs fails the build instead of silently misreading records.
_Static_assert(offsetof(kp_kernel_record, start) == 16, "kernel start offset");
_Static_assert(offsetof(kp_kernel_record, end) == 24, "kernel end offset");
_Static_assert(offsetof(kp_kernel_record, gridX) == 52, "kernel gridX offset");
_Static_assert(offsetof(kp_kernel_record, blockZ) == 72, "kernel blockZ offset");
_Static_assert(offsetof(kp_kernel_record, name) == 104, "kernel name offset");
_Static_assert(offsetof(kp_memcpy_record, copyKind) == 4, "memcpy copyKind offset");
_Static_assert(offsetof(kp_memcpy_record, bytes) == 8, "memcpy bytes offset");
_Static_assert(offsetof(kp_memcpy_record, start) == 16, "memcpy start offset");
_Static_assert(offsetof(kp_memset_record, bytes) == 8, "memset bytes offset");
_Static_assert(offsetof(kp_memset_record, start) == 16, "memset start offset");

#define KP_BUFFER_BYTES (8u << 20)
#define KP_SHORT_NAME 160

enum kp_kind { KP_KERNEL, KP_MEMCPY, KP_MEMSET };

typedef struct {
  char *key;  // full (mangled) kernel name, or "HtoD" etc. for copies, "memset"
  uint64_t hash;
  enum kp_kind kind;
  uint64_t calls, total_ns, min_ns, max_ns, bytes;
  int32_t grid[3], block[3];
  int shape_varies;
} kp_entry;

typedef struct {
  uint64_t start, end;
} kp_interval;

static struct {
  pthread_mutex_t lock;
  int initialized, reported, flushing;
  pid_t pid;
  kp_entry *table;  // open addressing, capacity a power of two
  size_t cap, len;
  kp_interval *iv;  // every timed record, for the busy-time union
  size_t iv_len, iv_cap;
  uint64_t n_kernel, n_memcpy, n_memset, n_untimed, n_dropped, n_bad_buffers, n_outside_range;
  CUpti_SubscriberHandle subscriber;
  // The profiler range (cuProfilerStart/cudaProfilerStart .. Stop, the first one only): when
  // it starts, everything recorded so far is cleared (after a flush), and from then on only
  // records that start inside it count. range_state: 0 none, 1 open, 2 closed.
  int range_state;
  uint64_t range_start, range_end;
} g = {.lock = PTHREAD_MUTEX_INITIALIZER};

__attribute__((format(printf, 1, 2))) static void kp_log(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("[kernel-profile] ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

static const char *kp_cupti_error(CUptiResult r) {
  const char *s = "unknown CUPTI error";
  cuptiGetResultString(r, &s);
  return s;
}

// FNV-1a: the keys are short strings, and a distinct hash only has to spread them.
static uint64_t kp_hash(const char *s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

static int kp_grow_table(void) {
  size_t cap = g.cap ? g.cap * 2 : 1024;
  kp_entry *t = calloc(cap, sizeof *t);
  if (!t) return -1;
  for (size_t i = 0; i < g.cap; i++) {
    if (!g.table[i].key) continue;
    size_t j = g.table[i].hash & (cap - 1);
    while (t[j].key) j = (j + 1) & (cap - 1);
    t[j] = g.table[i];
  }
  free(g.table);
  g.table = t;
  g.cap = cap;
  return 0;
}

// The row of (kind, key), created on first sight; NULL only when out of memory.
static kp_entry *kp_row(enum kp_kind kind, const char *key) {
  if ((g.len + 1) * 2 > g.cap && kp_grow_table() != 0) return NULL;
  uint64_t h = kp_hash(key) ^ (uint64_t)kind;
  size_t j = h & (g.cap - 1);
  while (g.table[j].key) {
    if (g.table[j].hash == h && g.table[j].kind == kind && strcmp(g.table[j].key, key) == 0)
      return &g.table[j];
    j = (j + 1) & (g.cap - 1);
  }
  kp_entry *e = &g.table[j];
  e->key = strdup(key);
  if (!e->key) return NULL;
  e->hash = h;
  e->kind = kind;
  e->min_ns = UINT64_MAX;
  g.len++;
  return e;
}

static void kp_add_interval(uint64_t start, uint64_t end) {
  if (g.iv_len == g.iv_cap) {
    size_t cap = g.iv_cap ? g.iv_cap * 2 : 65536;
    kp_interval *p = realloc(g.iv, cap * sizeof *p);
    if (!p) return;  // the union then misses some intervals; the per-row totals stay exact
    g.iv = p;
    g.iv_cap = cap;
  }
  g.iv[g.iv_len++] = (kp_interval){start, end};
}

// Whether a record starting at `start` counts: always without a profiler range, else only
// inside it (a record that started before the range was opened, or after it was closed, is
// left out, whenever its buffer arrives). Caller holds g.lock.
static int kp_in_range(uint64_t start) {
  if (g.range_state == 0) return 1;
  return start >= g.range_start && (g.range_state == 1 || start <= g.range_end);
}

// Forgets every row's figures, the intervals and the record counters (the keys stay; rows
// without calls are not reported). Caller holds g.lock.
static void kp_clear(void) {
  for (size_t i = 0; i < g.cap; i++) {
    kp_entry *e = &g.table[i];
    if (!e->key) continue;
    e->calls = e->total_ns = e->max_ns = e->bytes = 0;
    e->min_ns = UINT64_MAX;
    e->shape_varies = 0;
  }
  g.iv_len = 0;
  g.n_kernel = g.n_memcpy = g.n_memset = g.n_untimed = 0;
}

// The first profiler range opens at `ts` (CUPTI's clock, that of the records): what was
// recorded so far is dropped. Later ranges are ignored. Caller holds g.lock.
static void kp_range_begin(uint64_t ts) {
  if (g.range_state != 0) return;
  kp_clear();
  g.range_start = ts;
  g.range_state = 1;
}

// The open range closes at `ts`. Caller holds g.lock.
static void kp_range_end(uint64_t ts) {
  if (g.range_state != 1) return;
  g.range_end = ts;
  g.range_state = 2;
}

// Adds one timed activity to its row. Caller holds g.lock.
static void kp_record(enum kp_kind kind, const char *key, uint64_t start, uint64_t end,
                      uint64_t bytes, const int32_t grid[3], const int32_t block[3]) {
  if ((start == 0 && end == 0) || end < start) {
    g.n_untimed++;
    return;
  }
  if (!kp_in_range(start)) {
    g.n_outside_range++;
    return;
  }
  kp_entry *e = kp_row(kind, key);
  if (!e) {
    g.n_untimed++;
    return;
  }
  uint64_t d = end - start;
  if (e->calls == 0 && grid) {
    memcpy(e->grid, grid, sizeof e->grid);
    memcpy(e->block, block, sizeof e->block);
  } else if (grid && (memcmp(e->grid, grid, sizeof e->grid) || memcmp(e->block, block, sizeof e->block))) {
    e->shape_varies = 1;
  }
  e->calls++;
  e->total_ns += d;
  e->bytes += bytes;
  if (d < e->min_ns) e->min_ns = d;
  if (d > e->max_ns) e->max_ns = d;
  kp_add_interval(start, end);
}

static const char *kp_memcpy_kind(uint8_t k) {
  switch (k) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "memcpy HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "memcpy DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "memcpy DtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOH: return "memcpy HtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_PTOP: return "memcpy PtoP";
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOA: return "memcpy HtoA";
    case CUPTI_ACTIVITY_MEMCPY_KIND_ATOH: return "memcpy AtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_ATOA: return "memcpy AtoA";
    case CUPTI_ACTIVITY_MEMCPY_KIND_ATOD: return "memcpy AtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOA: return "memcpy DtoA";
    default: return "memcpy other";
  }
}

// Walks one buffer of records. Caller holds g.lock.
static void kp_consume(uint8_t *buffer, size_t valid) {
  CUpti_Activity *rec = NULL;
  for (;;) {
    CUptiResult r = cuptiActivityGetNextRecord(buffer, valid, &rec);
    if (r == CUPTI_ERROR_MAX_LIMIT_REACHED) break;
    if (r != CUPTI_SUCCESS) {
      g.n_bad_buffers++;  // rest of this buffer unreadable (reported in the header)
      break;
    }
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const kp_kernel_record *k = (const kp_kernel_record *)rec;
        int32_t grid[3] = {k->gridX, k->gridY, k->gridZ};
        int32_t block[3] = {k->blockX, k->blockY, k->blockZ};
        if (!kp_in_range(k->start)) {
          g.n_outside_range++;
          break;
        }
        g.n_kernel++;
        kp_record(KP_KERNEL, k->name ? k->name : "(unnamed kernel)", k->start, k->end, 0, grid, block);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const kp_memcpy_record *m = (const kp_memcpy_record *)rec;
        if (!kp_in_range(m->start)) {
          g.n_outside_range++;
          break;
        }
        g.n_memcpy++;
        kp_record(KP_MEMCPY, kp_memcpy_kind(m->copyKind), m->start, m->end, m->bytes, NULL, NULL);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const kp_memset_record *m = (const kp_memset_record *)rec;
        if (!kp_in_range(m->start)) {
          g.n_outside_range++;
          break;
        }
        g.n_memset++;
        kp_record(KP_MEMSET, "memset", m->start, m->end, m->bytes, NULL, NULL);
        break;
      }
      default:
        break;
    }
  }
}

static void CUPTIAPI kp_buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  void *p = NULL;
  // Activity buffers must be 8-byte aligned (ACTIVITY_RECORD_ALIGNMENT).
  if (posix_memalign(&p, 8, KP_BUFFER_BYTES) != 0) p = NULL;
  *buffer = p;
  *size = p ? KP_BUFFER_BYTES : 0;
  *max_records = 0;
}

static void CUPTIAPI kp_buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer,
                                         size_t size, size_t valid) {
  (void)size;
  size_t dropped = 0;
  pthread_mutex_lock(&g.lock);
  if (buffer && valid > 0) kp_consume(buffer, valid);
  if (cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped) == CUPTI_SUCCESS) g.n_dropped += dropped;
  pthread_mutex_unlock(&g.lock);
  free(buffer);
}

// ---- names ---------------------------------------------------------------------------

typedef char *(*kp_demangle_fn)(const char *, char *, size_t *, int *);
static kp_demangle_fn kp_demangler;

// libstdc++'s demangler if this process has it (PyTorch does), else loaded on its own;
// without it names stay mangled.
static void kp_find_demangler(void) {
  kp_demangler = (kp_demangle_fn)dlsym(RTLD_DEFAULT, "__cxa_demangle");
  if (!kp_demangler) {
    void *h = dlopen("libstdc++.so.6", RTLD_NOW | RTLD_LOCAL);
    if (h) kp_demangler = (kp_demangle_fn)dlsym(h, "__cxa_demangle");
  }
}

// The demangled name (malloc'd), or a copy of the name itself.
static char *kp_demangle(const char *name) {
  if (kp_demangler && strncmp(name, "_Z", 2) == 0) {
    int status = -1;
    char *d = kp_demangler(name, NULL, NULL, &status);
    if (d && status == 0) return d;
    free(d);
  }
  return strdup(name);
}

// One pass of the short form: "void " dropped (every kernel returns void), every
// parenthesised list emptied except "(anonymous namespace)", the final "()" (the kernel's
// own parameter list) dropped, template arguments nested deeper than max_depth replaced by
// "...". Writes at most cap − 1 characters.
static void kp_shorten_pass(const char *s, int max_depth, char *out, size_t cap) {
  size_t n = 0;
  int angle = 0, paren = 0;
  if (strncmp(s, "void ", 5) == 0) s += 5;
  for (; *s && n + 4 < cap; s++) {
    char c = *s;
    if (paren == 0 && c == '(' && strncmp(s, "(anonymous namespace)", 21) == 0) {
      size_t k = 21 < cap - 1 - n ? 21 : cap - 1 - n;
      if (angle <= max_depth) {
        memcpy(out + n, s, k);
        n += k;
      }
      s += 20;
      continue;
    }
    if (c == '(') {
      if (paren++ == 0 && angle <= max_depth) out[n++] = '(';
      continue;
    }
    if (c == ')' && paren > 0) {
      if (--paren == 0 && angle <= max_depth) out[n++] = ')';
      continue;
    }
    if (paren > 0) continue;
    if (c == '<') {
      if (++angle <= max_depth + 1) out[n++] = '<';
      if (angle == max_depth + 1) {
        memcpy(out + n, "...", 3);
        n += 3;
      }
      continue;
    }
    if (c == '>' && angle > 0) {
      if (angle-- <= max_depth + 1) out[n++] = '>';
      continue;
    }
    if (angle <= max_depth) out[n++] = c;
  }
  out[n] = 0;
  if (n >= 2 && strcmp(out + n - 2, "()") == 0) out[n - 2] = 0;
}

// The short name shown in summaries: as deep as fits KP_SHORT_NAME, then cut.
static void kp_shorten(const char *demangled, char *out, size_t cap) {
  char *tmp = malloc(strlen(demangled) + 8);
  if (!tmp) {
    snprintf(out, cap, "%.*s", (int)(cap - 1), demangled);
    return;
  }
  for (int depth = 64; depth >= 0; depth--) {
    kp_shorten_pass(demangled, depth, tmp, strlen(demangled) + 8);
    if (strlen(tmp) <= KP_SHORT_NAME || depth == 0) break;
  }
  if (strlen(tmp) > KP_SHORT_NAME) memcpy(tmp + KP_SHORT_NAME - 3, "...", 4);
  snprintf(out, cap, "%s", tmp);
  free(tmp);
}

// TSV fields must hold no tab or newline.
static void kp_put_field(FILE *f, const char *s) {
  for (; *s; s++) fputc(*s == '\t' || *s == '\n' ? ' ' : *s, f);
}

// ---- report --------------------------------------------------------------------------

static int kp_by_total_desc(const void *a, const void *b) {
  const kp_entry *x = *(kp_entry *const *)a, *y = *(kp_entry *const *)b;
  if (x->total_ns != y->total_ns) return x->total_ns < y->total_ns ? 1 : -1;
  return strcmp(x->key, y->key);
}

static int kp_by_start(const void *a, const void *b) {
  const kp_interval *x = a, *y = b;
  return x->start < y->start ? -1 : x->start > y->start;
}

static FILE *kp_open_out(int *close_it) {
  const char *path = getenv("KERNEL_PROFILE_OUT");
  *close_it = 0;
  if (!path || !*path) return stderr;
  char buf[4096];
  size_t n = 0;
  for (const char *p = path; *p && n + 24 < sizeof buf; p++) {
    if (p[0] == '%' && p[1] == 'p') {
      n += (size_t)snprintf(buf + n, sizeof buf - n, "%d", (int)getpid());
      p++;
    } else {
      buf[n++] = *p;
    }
  }
  buf[n] = 0;
  FILE *f = fopen(buf, "w");
  if (!f) {
    kp_log("cannot write KERNEL_PROFILE_OUT=%s (%s); the table goes to stderr", buf, strerror(errno));
    return stderr;
  }
  *close_it = 1;
  return f;
}

// Caller holds g.lock.
static void kp_write_report(void) {
  uint64_t kernel_ns = 0, memcpy_ns = 0, memset_ns = 0, all_ns, busy = 0, span = 0;
  kp_entry **rows = malloc((g.len + 1) * sizeof *rows);
  if (!rows) return;
  size_t nrows = 0, nkernels = 0;
  for (size_t i = 0; i < g.cap; i++) {
    kp_entry *e = &g.table[i];
    if (!e->key || e->calls == 0) continue;  // seen only before the profiler range
    rows[nrows++] = e;
    if (e->kind == KP_KERNEL) {
      kernel_ns += e->total_ns;
      nkernels++;
    } else if (e->kind == KP_MEMCPY) {
      memcpy_ns += e->total_ns;
    } else {
      memset_ns += e->total_ns;
    }
  }
  all_ns = kernel_ns + memcpy_ns + memset_ns;
  qsort(rows, nrows, sizeof *rows, kp_by_total_desc);
  if (g.iv_len > 0) {
    qsort(g.iv, g.iv_len, sizeof *g.iv, kp_by_start);
    uint64_t first = g.iv[0].start, last = g.iv[0].end, cs = g.iv[0].start, ce = g.iv[0].end;
    for (size_t i = 1; i < g.iv_len; i++) {
      if (g.iv[i].end > last) last = g.iv[i].end;
      if (g.iv[i].start > ce) {
        busy += ce - cs;
        cs = g.iv[i].start;
        ce = g.iv[i].end;
      } else if (g.iv[i].end > ce) {
        ce = g.iv[i].end;
      }
    }
    busy += ce - cs;
    span = last - first;
  }

  int close_it;
  FILE *f = kp_open_out(&close_it);
  uint32_t runtime_version = 0;
  cuptiGetVersion(&runtime_version);
  const char *label = getenv("KERNEL_PROFILE_LABEL");
  fprintf(f, "# kernel-profile: label=");
  kp_put_field(f, label && *label ? label : "-");
  fprintf(f, " pid=%d cupti_api_compiled=%u cupti_api_runtime=%u demangler=%s\n", (int)getpid(),
          (unsigned)CUPTI_API_VERSION, runtime_version, kp_demangler ? "yes" : "no");
  fprintf(f,
          "# records: kernels=%llu memcpy=%llu memset=%llu distinct_kernels=%zu dropped=%llu "
          "without_timestamps=%llu unreadable_buffers=%llu\n",
          (unsigned long long)g.n_kernel, (unsigned long long)g.n_memcpy, (unsigned long long)g.n_memset,
          nkernels, (unsigned long long)g.n_dropped, (unsigned long long)g.n_untimed,
          (unsigned long long)g.n_bad_buffers);
  if (g.range_state) {
    fprintf(f, "# scope=range range_ns=%llu outside_range=%llu (records inside the profiler range only)\n",
            (unsigned long long)(g.range_state == 2 ? g.range_end - g.range_start : 0),
            (unsigned long long)g.n_outside_range);
  } else {
    fprintf(f, "# scope=process (no profiler range: the whole process)\n");
  }
  fprintf(f, "# kernel_ns=%llu memcpy_ns=%llu memset_ns=%llu (sums of durations in scope)\n",
          (unsigned long long)kernel_ns, (unsigned long long)memcpy_ns, (unsigned long long)memset_ns);
  fprintf(f,
          "# gpu_busy_ns=%llu (union of all intervals) span_ns=%llu (first start to last end) "
          "idle_ns=%llu (span - busy)\n",
          (unsigned long long)busy, (unsigned long long)span, (unsigned long long)(span - busy));
  fprintf(f, "# share = total_ns / (kernel_ns + memcpy_ns + memset_ns)\n");
  fprintf(f, "kind\tcalls\ttotal_ns\tmean_ns\tmin_ns\tmax_ns\tshare\tbytes\tgrid\tblock\tname\tfull_name\n");
  char shortname[KP_SHORT_NAME + 8];
  for (size_t i = 0; i < nrows; i++) {
    kp_entry *e = rows[i];
    const char *kind = e->kind == KP_KERNEL ? "kernel" : e->kind == KP_MEMCPY ? "memcpy" : "memset";
    fprintf(f, "%s\t%llu\t%llu\t%llu\t%llu\t%llu\t%.6f\t%llu\t", kind, (unsigned long long)e->calls,
            (unsigned long long)e->total_ns, (unsigned long long)(e->total_ns / e->calls),
            (unsigned long long)e->min_ns, (unsigned long long)e->max_ns,
            all_ns ? (double)e->total_ns / (double)all_ns : 0.0, (unsigned long long)e->bytes);
    if (e->kind == KP_KERNEL) {
      const char *star = e->shape_varies ? "*" : "";
      fprintf(f, "%dx%dx%d%s\t%dx%dx%d%s\t", e->grid[0], e->grid[1], e->grid[2], star, e->block[0],
              e->block[1], e->block[2], star);
      char *full = kp_demangle(e->key);
      const char *shown = full ? full : e->key;
      kp_shorten(shown, shortname, sizeof shortname);
      kp_put_field(f, shortname);
      fputc('\t', f);
      kp_put_field(f, shown);
      free(full);
    } else {
      fprintf(f, "-\t-\t%s\t%s", e->key, e->key);
    }
    fputc('\n', f);
  }
  if (close_it) {
    fclose(f);
  } else {
    fflush(f);
  }
  free(rows);
}

// ---- lifecycle -----------------------------------------------------------------------

static void kp_flush(void) {
  // Re-entrancy guard: the flush calls kp_buffer_completed on this thread, and a context
  // destroyed while flushing must not flush again.
  if (__atomic_exchange_n(&g.flushing, 1, __ATOMIC_ACQ_REL)) return;
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  __atomic_store_n(&g.flushing, 0, __ATOMIC_RELEASE);
}

// A context's records must be collected while it still exists: Rust programs (candle's
// CudaContext) release the primary context when main returns, before atexit handlers run.
static void CUPTIAPI kp_callback(void *user, CUpti_CallbackDomain domain, CUpti_CallbackId cbid,
                                 const void *data) {
  (void)user;
  if (domain == CUPTI_CB_DOMAIN_RESOURCE && cbid == CUPTI_CBID_RESOURCE_CONTEXT_DESTROY_STARTING) kp_flush();
  // The profiler range: the program marks its steady state with cuProfilerStart/Stop (or the
  // runtime's cudaProfilerStart/Stop, which may also call the driver's: the first call wins).
  // Opened when the start call returns, closed when the stop call is entered; the program
  // synchronizes the device before both, so no kernel straddles them.
  int start = (domain == CUPTI_CB_DOMAIN_DRIVER_API && cbid == CUPTI_DRIVER_TRACE_CBID_cuProfilerStart) ||
              (domain == CUPTI_CB_DOMAIN_RUNTIME_API && cbid == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000);
  int stop = (domain == CUPTI_CB_DOMAIN_DRIVER_API && cbid == CUPTI_DRIVER_TRACE_CBID_cuProfilerStop) ||
             (domain == CUPTI_CB_DOMAIN_RUNTIME_API && cbid == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000);
  if (!start && !stop) return;
  const CUpti_CallbackData *cb = (const CUpti_CallbackData *)data;
  if ((start && cb->callbackSite != CUPTI_API_EXIT) || (stop && cb->callbackSite != CUPTI_API_ENTER)) return;
  uint64_t now = 0;
  if (cuptiGetTimestamp(&now) != CUPTI_SUCCESS) return;
  pthread_mutex_lock(&g.lock);
  if (start) {
    kp_range_begin(now);
  } else {
    kp_range_end(now);
  }
  pthread_mutex_unlock(&g.lock);
}

static void kp_at_exit(void) {
  // A forked child inherits this handler but none of the parent's GPU work.
  if (getpid() != g.pid) return;
  kp_flush();
  pthread_mutex_lock(&g.lock);
  if (!g.reported) {
    g.reported = 1;
    if (g.n_kernel + g.n_memcpy + g.n_memset > 0 || !getenv("KERNEL_PROFILE_OUT")) {
      kp_write_report();
    } else {
      // A CUDA process that ran nothing (a helper started by the profiled one inherits the
      // environment) must not overwrite the real table.
      kp_log("no GPU activity recorded in this process; %s left as it is", getenv("KERNEL_PROFILE_OUT"));
    }
  }
  pthread_mutex_unlock(&g.lock);
}

// Called by the CUDA driver during cuInit when CUDA_INJECTION64_PATH names this library.
// Returns 1 on success, 0 when CUPTI could not be set up (the process then runs unprofiled).
__attribute__((visibility("default"))) int InitializeInjection(void) {
  if (__atomic_exchange_n(&g.initialized, 1, __ATOMIC_ACQ_REL)) return 1;
  g.pid = getpid();
  kp_find_demangler();
  CUptiResult r = cuptiActivityRegisterCallbacks(kp_buffer_requested, kp_buffer_completed);
  if (r != CUPTI_SUCCESS) {
    kp_log("cuptiActivityRegisterCallbacks failed: %s; not profiling", kp_cupti_error(r));
    return 0;
  }
  // Larger device-side buffers than CUPTI's default: fewer mid-run flushes and no dropped
  // records at tens of thousands of kernels per second. Failure only costs efficiency.
  size_t value = 32u << 20, value_size = sizeof value;
  cuptiActivitySetAttribute(CUPTI_ACTIVITY_ATTR_DEVICE_BUFFER_SIZE, &value_size, &value);
  static const CUpti_ActivityKind kinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                             CUPTI_ACTIVITY_KIND_MEMSET};
  static const char *const kind_names[] = {"CONCURRENT_KERNEL", "MEMCPY", "MEMSET"};
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
    r = cuptiActivityEnable(kinds[i]);
    if (r != CUPTI_SUCCESS) {
      kp_log("cuptiActivityEnable(%s) failed: %s; not profiling", kind_names[i], kp_cupti_error(r));
      return 0;
    }
  }
  // Optional: another CUPTI client may already hold the only subscriber slot (CUPTI before
  // 13.3); records are then collected at exit only.
  r = cuptiSubscribe(&g.subscriber, (CUpti_CallbackFunc)kp_callback, NULL);
  if (r == CUPTI_SUCCESS) {
    r = cuptiEnableCallback(1, g.subscriber, CUPTI_CB_DOMAIN_RESOURCE, CUPTI_CBID_RESOURCE_CONTEXT_DESTROY_STARTING);
  }
  if (r != CUPTI_SUCCESS) {
    kp_log("no flush at context destruction (%s); records are collected at exit", kp_cupti_error(r));
  } else {
    static const struct {
      CUpti_CallbackDomain domain;
      CUpti_CallbackId cbid;
    } marks[] = {{CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStart},
                 {CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStop},
                 {CUPTI_CB_DOMAIN_RUNTIME_API, CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000},
                 {CUPTI_CB_DOMAIN_RUNTIME_API, CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000}};
    for (size_t i = 0; i < sizeof marks / sizeof marks[0]; i++) {
      CUptiResult m = cuptiEnableCallback(1, g.subscriber, marks[i].domain, marks[i].cbid);
      if (m != CUPTI_SUCCESS) {
        kp_log("profiler-range callback %zu not enabled (%s): the table may cover the whole process", i,
               kp_cupti_error(m));
      }
    }
  }
  atexit(kp_at_exit);
  const char *out = getenv("KERNEL_PROFILE_OUT");
  kp_log("tracing kernels, copies and sets; table at exit to %s", out && *out ? out : "stderr");
  return 1;
}
