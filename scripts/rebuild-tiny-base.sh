#!/usr/bin/env bash
# Rebuilds the embedded `tiny` base (datasets/tiny-base/) from the code already on a machine
# after a build: the Rust crates of the cargo registry source cache and the Python standard
# library. One command:
#
#   scripts/rebuild-tiny-base.sh                 # build, pretrain into target/tiny-base-run, copy
#   scripts/rebuild-tiny-base.sh --resume        # continue an interrupted run (same corpus)
#
# Environment: OUT (run directory, default target/tiny-base-run), REGISTRY (default the first
# ~/.cargo/registry/src/*/), PYTHON_STDLIB (default /usr/lib/python3.11), TOKENS (default
# 800000), RAYON_NUM_THREADS (default 2). Extra arguments go to `finetune pretrain`.
#
# Deterministic: the same corpus (the same crate versions and Python files), seed, flags and
# thread count give the same datasets/tiny-base/model.safetensors. Left out of the corpus (see
# datasets/tiny-base/README.md): crates without a permissive licence (checked from Cargo.toml),
# `log-*` (rust-lang/log is the evaluation repository), C-library and platform binding crates
# (`*-sys-*`, `libc`, `winapi*`, `windows_*`, `winsafe`, `cudarc`: bindings generated from
# headers without an @generated marker, most of the registry's bytes), third-party Python
# packages. This repository's own sources are not under either root.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-target/tiny-base-run}
REGISTRY=${REGISTRY:-$(ls -d "$HOME"/.cargo/registry/src/*/ | head -1)}
PYTHON_STDLIB=${PYTHON_STDLIB:-/usr/lib/python3.11}
TOKENS=${TOKENS:-800000}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}

[ -d "$REGISTRY" ] || { echo "rebuild-tiny-base: no cargo registry source cache at $REGISTRY" >&2; exit 1; }
[ -d "$PYTHON_STDLIB" ] || { echo "rebuild-tiny-base: no Python standard library at $PYTHON_STDLIB" >&2; exit 1; }

cargo build --release
target/release/finetune pretrain \
  --corpus "$REGISTRY"/*/ "$PYTHON_STDLIB" \
  --exclude 'log-*' --exclude '*-sys-*' --exclude 'libc-*' --exclude 'winapi*' \
  --exclude 'windows_*' --exclude 'winsafe-*' --exclude 'cudarc-*' \
  --exclude 'dist-packages/**' --exclude 'site-packages/**' \
  --preset tiny --vocab 8192 --seq-len 1024 --micro-batch 4 --lr 2e-3 --warmup 20 --seed 0 \
  --tokens "$TOKENS" --corpus-bytes 40000000 --tokenizer-bytes 24000000 \
  --eval-every 100 --eval-sequences 16 --save-every 50 \
  --out "$OUT" "$@"

DEST=datasets/tiny-base
mkdir -p "$DEST"
for f in config.json model.safetensors model.fp8.safetensors tokenizer.json; do
  cp "$OUT/model/$f" "$DEST/$f"
done
cp "$OUT/corpus.json" "$OUT/pretrain.json" "$DEST/"
echo "rebuild-tiny-base: $DEST updated from $OUT"
