// selftest.c: checks kernel_profile.c's bookkeeping without a GPU (scripts/device-run.sh build
// runs it after compiling the library). It includes the library's source, feeds its record
// path synthetic kernel/memcpy/memset activities (what kp_consume passes on from CUPTI's
// buffers), writes the TSV through the real report code and compares it with references
// computed here independently: per-name sums by a linear scan, the busy time (union of
// intervals) by marking every nanosecond on a bitmap, the sort order, shares summing to 1,
// the short-name rules on fixed demangled names, and the profiler range (rows cleared when it
// opens, records outside it left out whenever they arrive). What it cannot check is CUPTI itself
// (InitializeInjection, record delivery, struct versions): that needs a GPU.
#include "kernel_profile.c"

#include <assert.h>
#include <math.h>

static int failures;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      fprintf(stderr, "selftest FAILED %s:%d: ", __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                        \
      fputc('\n', stderr);                                 \
      failures++;                                          \
    }                                                      \
  } while (0)

static void check_short(const char *in, const char *want) {
  char out[KP_SHORT_NAME + 8];
  kp_shorten(in, out, sizeof out);
  CHECK(strcmp(out, want) == 0, "shorten(%s)\n  got  %s\n  want %s", in, out, want);
}

// A deterministic generator so that a failure reproduces.
static uint64_t rng = 88172645463325252ull;
static uint64_t next_rand(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

#define NAMES 5
#define EVENTS 4000
#define T0 1000000u
#define HORIZON 3000000u

int main(void) {
  kp_find_demangler();
  // --- short names: fixed inputs, expectations written by hand ---------------------------
  check_short("affine_bf16", "affine_bf16");
  check_short("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
              "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)",
              "at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
              "std::array<char*, 3ul> >");
  check_short("void (anonymous namespace)::softmax_warp<float>(float*, float const*, int)",
              "(anonymous namespace)::softmax_warp<float>");
  // 2 levels of template arguments make it too long: the third level is elided first.
  {
    char in[1024], want[1024];
    const char *pad = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    snprintf(in, sizeof in, "void ns::k<ns::F<%s<%s> >, 7>(int)", pad, pad);
    snprintf(want, sizeof want, "ns::k<ns::F<%s<...> >, 7>", pad);
    check_short(in, want);
  }
  // A name that stays too long at depth 0 is cut to the limit with "...".
  {
    char in[400];
    memset(in, 'x', 300);
    in[300] = 0;
    char out[KP_SHORT_NAME + 8];
    kp_shorten(in, out, sizeof out);
    CHECK(strlen(out) == KP_SHORT_NAME && strcmp(out + KP_SHORT_NAME - 3, "...") == 0, "cut: %zu chars", strlen(out));
  }

  // --- aggregation and report --------------------------------------------------------------
  const char *names[NAMES] = {"_ZN4core6matmulEv", "copy_bf16", "memcpy HtoD", "memcpy DtoD", "memset"};
  const enum kp_kind kinds[NAMES] = {KP_KERNEL, KP_KERNEL, KP_MEMCPY, KP_MEMCPY, KP_MEMSET};
  uint64_t calls[NAMES] = {0}, total[NAMES] = {0}, mn[NAMES], mx[NAMES] = {0}, bytes[NAMES] = {0};
  static unsigned char covered[HORIZON];
  uint64_t first = UINT64_MAX, last = 0, untimed = 0;
  for (int i = 0; i < NAMES; i++) mn[i] = UINT64_MAX;
  g.pid = getpid();
  pthread_mutex_lock(&g.lock);
  for (int ev = 0; ev < EVENTS; ev++) {
    int n = (int)(next_rand() % NAMES);
    uint64_t start = T0 + next_rand() % (HORIZON - 2000), d = next_rand() % 1500, b = next_rand() % 4096;
    int32_t grid[3] = {(int32_t)(1 + (n == 0 && ev % 7 == 0)), 1, 1}, block[3] = {128, 1, 1};
    if (ev % 97 == 0) {  // a record without timestamps is counted, not summed
      kp_record(kinds[n], names[n], 0, 0, b, kinds[n] == KP_KERNEL ? grid : NULL, block);
      untimed++;
      continue;
    }
    kp_record(kinds[n], names[n], start, start + d, kinds[n] == KP_KERNEL ? 0 : b,
              kinds[n] == KP_KERNEL ? grid : NULL, block);
    if (kinds[n] == KP_KERNEL) g.n_kernel++; else if (kinds[n] == KP_MEMCPY) g.n_memcpy++; else g.n_memset++;
    calls[n]++;
    total[n] += d;
    bytes[n] += kinds[n] == KP_KERNEL ? 0 : b;
    if (d < mn[n]) mn[n] = d;
    if (d > mx[n]) mx[n] = d;
    if (start < first) first = start;
    if (start + d > last) last = start + d;
    for (uint64_t t = start; t < start + d; t++) covered[t - T0] = 1;
  }
  uint64_t busy = 0, all = 0;
  for (uint64_t t = 0; t < HORIZON; t++) busy += covered[t];
  for (int i = 0; i < NAMES; i++) all += total[i];

  char path[] = "/tmp/kernel-profile-selftest-XXXXXX";
  int fd = mkstemp(path);
  assert(fd >= 0);
  close(fd);
  setenv("KERNEL_PROFILE_OUT", path, 1);
  setenv("KERNEL_PROFILE_LABEL", "selftest", 1);
  kp_write_report();
  pthread_mutex_unlock(&g.lock);

  FILE *f = fopen(path, "r");
  assert(f);
  char line[8192];
  int seen[NAMES] = {0}, rows = 0, header_ok = 0;
  uint64_t prev_total = UINT64_MAX, got_busy = 0, got_span = 0, got_untimed = 0;
  double share_sum = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long long a, b2, c2;
    if (sscanf(line, "# gpu_busy_ns=%llu (union of all intervals) span_ns=%llu (first start to last end) idle_ns=%llu",
               &a, &b2, &c2) == 3) {
      got_busy = a;
      got_span = b2;
      CHECK(c2 == b2 - a, "idle %llu != span - busy", c2);
    }
    char *u = strstr(line, "without_timestamps=");
    if (u) got_untimed = strtoull(u + 19, NULL, 10);
    if (line[0] == '#') continue;
    if (strncmp(line, "kind\t", 5) == 0) {
      header_ok = 1;
      continue;
    }
    char kind[16], grid[32], block[32], name[512], full[2048];
    unsigned long long c, t, mean, lo, hi, by;
    double share;
    int nf = sscanf(line, "%15[^\t]\t%llu\t%llu\t%llu\t%llu\t%llu\t%lf\t%llu\t%31[^\t]\t%31[^\t]\t%511[^\t]\t%2047[^\n]",
                    kind, &c, &t, &mean, &lo, &hi, &share, &by, grid, block, name, full);
    CHECK(nf == 12, "unparsable row (%d fields): %s", nf, line);
    if (nf != 12) continue;
    rows++;
    CHECK(t <= prev_total, "rows not sorted by total: %llu after %llu", t, (unsigned long long)prev_total);
    prev_total = t;
    share_sum += share;
    int k = -1;
    for (int i = 0; i < NAMES; i++) {
      // kernels are keyed by their (mangled) name; the demangled form is in full_name
      const char *want = i == 0 ? (kp_demangler ? "core::matmul()" : names[0]) : names[i];
      if (strcmp(full, want) == 0) k = i;
    }
    CHECK(k >= 0, "unexpected row %s", full);
    if (k < 0) continue;
    seen[k]++;
    CHECK(c == calls[k] && t == total[k] && lo == mn[k] && hi == mx[k] && by == bytes[k] && mean == total[k] / calls[k],
          "row %s: calls %llu/%llu total %llu/%llu min %llu/%llu max %llu/%llu bytes %llu/%llu", names[k], c,
          (unsigned long long)calls[k], t, (unsigned long long)total[k], lo, (unsigned long long)mn[k], hi,
          (unsigned long long)mx[k], by, (unsigned long long)bytes[k]);
    CHECK(fabs(share - (double)total[k] / (double)all) < 1e-6, "share of %s", names[k]);
    if (k == 0) CHECK(strcmp(grid, "1x1x1*") == 0 && strcmp(block, "128x1x1*") == 0, "shape of matmul: %s %s", grid, block);
    if (k == 1) CHECK(strcmp(grid, "1x1x1") == 0 && strcmp(block, "128x1x1") == 0, "shape of copy: %s %s", grid, block);
    if (k == 0 && kp_demangler) CHECK(strcmp(name, "core::matmul") == 0, "short name of matmul: %s", name);
  }
  fclose(f);
  unlink(path);
  CHECK(header_ok, "no column header");
  CHECK(rows == NAMES, "%d rows, want %d", rows, NAMES);
  for (int i = 0; i < NAMES; i++) CHECK(seen[i] == 1, "row %s seen %d times", names[i], seen[i]);
  CHECK(fabs(share_sum - 1.0) < 1e-4, "shares sum to %f", share_sum);
  CHECK(got_busy == busy, "gpu_busy_ns %llu, bitmap says %llu", (unsigned long long)got_busy, (unsigned long long)busy);
  CHECK(got_span == last - first, "span_ns %llu, want %llu", (unsigned long long)got_span,
        (unsigned long long)(last - first));
  CHECK(got_untimed == untimed, "without_timestamps %llu, want %llu", (unsigned long long)got_untimed,
        (unsigned long long)untimed);
  // --- the profiler range ------------------------------------------------------------------
  // Opened at R0 and closed at R1: rows recorded before are forgotten, and only records that
  // start in [R0, R1] count, whether they arrive before or after the close (CUPTI delivers
  // buffers late). References: sums over the in-range records, computed here.
  {
    const uint64_t R0 = 5000000, R1 = 6000000;
    uint64_t rc[NAMES] = {0}, rt[NAMES] = {0}, outside = 0, ev_in = 0;
    pthread_mutex_lock(&g.lock);
    g.n_outside_range = 0;
    kp_range_begin(R0);
    kp_range_begin(R0 + 10);  // a second start is ignored
    for (int ev = 0; ev < 3000; ev++) {
      int n = (int)(next_rand() % NAMES);
      if (n == 3) continue;  // one name never runs inside the range: its row must vanish
      if (ev == 2000) kp_range_end(R1);
      // While the range is open no record can start after R1 (it has not happened yet); after
      // the close, late buffers bring records from before R0, inside, and after R1.
      uint64_t span = ev < 2000 ? (R1 - R0) + 500000 : 2000000;
      uint64_t start = R0 - 500000 + next_rand() % span, d = 1 + next_rand() % 1000;
      int32_t grid[3] = {1, 1, 1}, block[3] = {64, 1, 1};
      kp_record(kinds[n], names[n], start, start + d, 0, kinds[n] == KP_KERNEL ? grid : NULL, block);
      if (start >= R0 && start <= R1) {
        rc[n]++;
        rt[n] += d;
        ev_in++;
      } else {
        outside++;
      }
    }
    kp_range_end(R1 + 12345);  // a second stop is ignored
    setenv("KERNEL_PROFILE_OUT", path, 1);
    kp_write_report();
    pthread_mutex_unlock(&g.lock);
    f = fopen(path, "r");
    assert(f);
    int scope_ok = 0, range_rows = 0;
    while (fgets(line, sizeof line, f)) {
      unsigned long long rng_ns, out_n;
      if (sscanf(line, "# scope=range range_ns=%llu outside_range=%llu", &rng_ns, &out_n) == 2) {
        scope_ok = 1;
        CHECK(rng_ns == R1 - R0, "range_ns %llu, want %llu", rng_ns, (unsigned long long)(R1 - R0));
        CHECK(out_n == outside, "outside_range %llu, want %llu", out_n, (unsigned long long)outside);
      }
      if (line[0] == '#' || strncmp(line, "kind\t", 5) == 0) continue;
      char kind[16], full[2048];
      unsigned long long c, t;
      if (sscanf(line, "%15[^\t]\t%llu\t%llu\t%*[^\n]", kind, &c, &t) != 3) continue;
      char *last_tab = strrchr(line, '\t');
      snprintf(full, sizeof full, "%s", last_tab ? last_tab + 1 : "");
      full[strcspn(full, "\n")] = 0;
      range_rows++;
      int k = -1;
      for (int i = 0; i < NAMES; i++) {
        const char *want = i == 0 ? (kp_demangler ? "core::matmul()" : names[0]) : names[i];
        if (strcmp(full, want) == 0) k = i;
      }
      CHECK(k >= 0 && k != 3, "unexpected row in range: %s", full);
      if (k < 0) continue;
      CHECK(c == rc[k] && t == rt[k], "range row %s: calls %llu/%llu total %llu/%llu", names[k], c,
            (unsigned long long)rc[k], t, (unsigned long long)rt[k]);
    }
    fclose(f);
    unlink(path);
    CHECK(scope_ok, "no scope=range header line");
    CHECK(range_rows == NAMES - 1, "%d rows in range, want %d", range_rows, NAMES - 1);
    CHECK(ev_in > 0 && outside > 0, "the range test needs records on both sides");
  }

  if (failures) {
    fprintf(stderr, "kernel-profile selftest: %d failure(s)\n", failures);
    return 1;
  }
  printf("kernel-profile selftest: ok (%d rows, %d events, busy %llu ns of span %llu ns, demangler %s)\n", rows, EVENTS,
         (unsigned long long)busy, (unsigned long long)(last - first), kp_demangler ? "yes" : "no");
  return 0;
}
