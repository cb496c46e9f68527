#!/usr/bin/env bash
# device-run.sh: build GPU binaries here (no GPU, no system CUDA), run them on a GPU machine
# (CUDA 13 driver, no cargo).
#
#   scripts/device-run.sh build [PKG...]     # here: release `finetune` + the test executables of
#                                            # PKG... (default finetune-kernels) with --features cuda,
#                                            # into dist/cuda/ (git-ignored), checked to need the
#                                            # real CUDA sonames and to fit in 64 MiB
#   scripts/device-run.sh exec CMD [ARGS...] # there: put the CUDA 13 libraries that come with
#                                            # PyTorch (site-packages/nvidia/*/lib) on
#                                            # LD_LIBRARY_PATH, then run CMD
#
# Example, with the session's `run` tool (carry: ["dist"]):
#   bash scripts/device-run.sh exec dist/cuda/finetune doctor
#   bash scripts/device-run.sh exec dist/cuda/tests/finetune_kernels-* --nocapture
#
# Env: FINETUNE_CUDA_PREFIX (toolchain location, default ~/.cache/finetune-cuda),
#      CUDA_COMPUTE_CAP (default 90 = H100/H200), DIST (default dist/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
DIST=${DIST:-dist/cuda}
LIMIT_BYTES=$((64 * 1024 * 1024))

log() { echo "[device-run] $*" >&2; }

build() {
  local pkgs=("$@")
  [ ${#pkgs[@]} -gt 0 ] || pkgs=(finetune-kernels)
  local prefix=${FINETUNE_CUDA_PREFIX:-$HOME/.cache/finetune-cuda}
  eval "$(scripts/install-cuda-toolchain.sh "$prefix")"
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
  log "cargo build --release --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
  cargo build --release --features cuda
  rm -rf "$DIST.tmp" && mkdir -p "$DIST.tmp/tests"
  cp "$CARGO_TARGET_DIR/release/finetune" "$DIST.tmp/finetune"
  local args=()
  for p in "${pkgs[@]}"; do args+=(-p "$p"); done
  log "cargo test --release --features cuda --no-run ${args[*]}"
  # Test executables, listed by cargo's JSON messages; integration tests of the `finetune`
  # crate are left out on purpose: they find the binary by its absolute build path.
  cargo test --release --no-run --features finetune-kernels/cuda "${args[@]}" --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])' \
    | while read -r exe; do cp "$exe" "$DIST.tmp/tests/"; done
  strip --strip-debug "$DIST.tmp/finetune" "$DIST.tmp"/tests/*
  check_needed "$DIST.tmp/finetune"
  local size; size=$(du -sb "$DIST.tmp" | cut -f1)
  [ "$size" -le "$LIMIT_BYTES" ] || { log "dist is $size bytes, over the 64 MiB a GPU machine takes"; exit 1; }
  rm -rf "$DIST" && mv "$DIST.tmp" "$DIST"
  log "$DIST: $(du -sh "$DIST" | cut -f1) in $(find "$DIST" -type f | wc -l) files"
  ls -l "$DIST" "$DIST/tests" >&2
}

# The binary must name the real driver and CUDA 13 libraries by soname (never the link-time
# stub or an unversioned .so), so that it runs against a GPU machine's own libraries.
check_needed() {
  local needed; needed=$(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
  log "$1 needs: $(echo $needed)"
  for so in libcuda.so.1 libcublas.so.13 libcurand.so.10 libnvrtc.so.13; do
    grep -qx "$so" <<<"$needed" || { log "$1 does not need $so"; exit 1; }
  done
  if grep -E '^lib(cuda|cudart|cublas|cublasLt|curand|nvrtc|nccl)\.so$' <<<"$needed"; then
    log "$1 needs an unversioned CUDA library"; exit 1
  fi
  if readelf -d "$1" | grep -E 'R(UN)?PATH' | grep -q stubs; then
    log "$1 has the stub directory in its run path"; exit 1
  fi
}

exec_on_gpu() {
  local py=${PYTHON:-python3} libs
  libs=$("$py" - <<'PY' 2>/dev/null || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        if "stubs" not in d and d not in dirs:
            dirs.append(d)
print(":".join(dirs))
PY
)
  [ -n "$libs" ] || log "no site-packages/nvidia/*/lib found; relying on the system loader path"
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  exec "$@"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  exec) shift; [ $# -gt 0 ] || { echo "usage: $0 exec CMD [ARGS...]" >&2; exit 2; }; exec_on_gpu "$@" ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
