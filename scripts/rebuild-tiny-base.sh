#!/usr/bin/env bash
# Rebuilds the embedded `tiny` base (datasets/tiny-base/) from the code already on a machine
# after a build: the Rust crates of the cargo registry source cache and the Python standard
# library. Everything the result depends on is recorded in datasets/tiny-base/rebuild-inputs.txt:
# the commit whose code trained it, the thread count, the `finetune pretrain` flags and every
# corpus root by name.
#
#   scripts/rebuild-tiny-base.sh             # reproduce: build the recorded commit's finetune (a
#                                            # git worktree under target/), pretrain on exactly the
#                                            # recorded roots with the recorded threads and flags,
#                                            # compare sha256 with the committed files (exit 1 if
#                                            # any differs; nothing in datasets/ is written)
#   scripts/rebuild-tiny-base.sh --retrain   # a new base: this checkout's code (clean tree), the
#                                            # roots now on the machine; copies the result into
#                                            # datasets/tiny-base/ and records HEAD and the roots in
#                                            # rebuild-inputs.txt (commit both together)
#   … --resume                               # either mode: continue an interrupted run
#
# Environment: OUT (run directory, default target/tiny-base-run), REGISTRY (default the first
# ~/.cargo/registry/src/*/), PYTHON_LIB (default /usr/lib). RAYON_NUM_THREADS is not read:
# the CPU kernels split their sums by thread, so the recorded count is used.
#
# Why a commit and not today's code: the trainer's CPU numerics change with the code (fused
# kernels, matmul kernel choice), so only the code that trained the committed weights gives them
# back bit for bit. Why named roots: the corpus is cut from a seeded order of every file under the
# roots, so one more crate in the registry (a new dependency) changes which files are kept.
# The CPU matters too: candle's matmuls pick AVX-512 or AVX2 kernels at run time.
#
# Left out of the corpus (flags in rebuild-inputs.txt, see datasets/tiny-base/README.md): crates
# without a permissive licence (checked from Cargo.toml), `log-*` (rust-lang/log is the evaluation
# repository), C-library and platform binding crates, third-party Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

mode=reproduce resume=()
for a in "$@"; do
  case $a in
    --retrain) mode=retrain ;;
    --resume) resume=(--resume) ;;
    *) echo "rebuild-tiny-base: unknown argument $a (--retrain, --resume)" >&2; exit 2 ;;
  esac
done

DEST=datasets/tiny-base
INPUTS=$DEST/rebuild-inputs.txt
OUT=${OUT:-target/tiny-base-run}
REGISTRY=${REGISTRY:-$(ls -d "$HOME"/.cargo/registry/src/*/ 2>/dev/null | head -1)}
REGISTRY=${REGISTRY%/}/
PYTHON_LIB=${PYTHON_LIB:-/usr/lib}
FILES=(config.json model.safetensors model.fp8.safetensors tokenizer.json)

[ -f "$INPUTS" ] || { echo "rebuild-tiny-base: $INPUTS is missing" >&2; exit 1; }
[ -d "$REGISTRY" ] || { echo "rebuild-tiny-base: no cargo registry source cache at $REGISTRY (set REGISTRY)" >&2; exit 1; }
commit=$(sed -n 's/^commit //p' "$INPUTS")
threads=$(sed -n 's/^threads //p' "$INPUTS")
read -r -a flags <<<"$(sed -n 's/^flags //p' "$INPUTS")"
python=$(sed -n 's/^python //p' "$INPUTS")
[ -n "$commit" ] && [ -n "$threads" ] && [ ${#flags[@]} -gt 0 ] && [ -n "$python" ] \
  || { echo "rebuild-tiny-base: $INPUTS needs commit, threads, flags and python lines" >&2; exit 1; }
[ -d "$PYTHON_LIB/$python" ] || { echo "rebuild-tiny-base: no Python standard library at $PYTHON_LIB/$python (set PYTHON_LIB)" >&2; exit 1; }
export RAYON_NUM_THREADS=$threads

roots=()
if [ $mode = reproduce ]; then
  missing=()
  while read -r name; do
    if [ -d "$REGISTRY$name" ]; then roots+=("$REGISTRY$name/"); else missing+=("$name"); fi
  done < <(sed -n 's/^crate //p' "$INPUTS")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "rebuild-tiny-base: ${#missing[@]} corpus crate(s) of $INPUTS are not in $REGISTRY: ${missing[*]}" >&2
    echo "  (fetch them, e.g. with \`cargo fetch\` in a project that depends on them, or use --retrain)" >&2
    exit 1
  fi
  # The recorded commit's finetune, built in its own worktree and target directory.
  git cat-file -e "$commit^{commit}" 2>/dev/null \
    || { echo "rebuild-tiny-base: commit $commit (from $INPUTS) is not in this repository (a shallow clone? git fetch --unshallow)" >&2; exit 1; }
  SRC=$ROOT/target/tiny-base-src
  if [ "$(git -C "$SRC" rev-parse HEAD 2>/dev/null)" != "$commit" ]; then
    rm -rf "$SRC"; git worktree prune
    git worktree add --detach "$SRC" "$commit"
  fi
  (cd "$SRC" && CARGO_TARGET_DIR=$ROOT/target/tiny-base-build cargo build --release --locked)
  BIN=$ROOT/target/tiny-base-build/release/finetune
else
  git diff --quiet HEAD -- crates Cargo.toml Cargo.lock \
    || { echo "rebuild-tiny-base: --retrain records HEAD as the code that trained the base: commit or stash the changes under crates/, Cargo.toml, Cargo.lock first" >&2; exit 1; }
  commit=$(git rev-parse HEAD)
  for d in "$REGISTRY"*/; do roots+=("$d"); done
  cargo build --release --locked
  BIN=$ROOT/target/release/finetune
fi

echo "rebuild-tiny-base: $mode with finetune at ${commit:0:12}, ${#roots[@]} crates + $python, RAYON_NUM_THREADS=$threads, into $OUT" >&2
"$BIN" pretrain --corpus "${roots[@]}" "$PYTHON_LIB/$python" "${flags[@]}" --out "$OUT" "${resume[@]}"

if [ $mode = reproduce ]; then
  differ=0
  for f in "${FILES[@]}"; do
    a=$(sha256sum <"$OUT/model/$f" | cut -d' ' -f1) b=$(sha256sum <"$DEST/$f" | cut -d' ' -f1)
    if [ "$a" = "$b" ]; then echo "identical  $f  $a"; else echo "DIFFERENT  $f  rebuilt $a, committed $b"; differ=1; fi
  done
  # corpus.json names the roots by absolute path (the registry's location on this machine).
  norm() { sed -E 's#"/[^"]*/registry/src/[^/"]*/+#"REGISTRY/#' "$1"; }
  if cmp -s <(norm "$OUT/corpus.json") <(norm "$DEST/corpus.json"); then
    echo "identical  corpus.json (registry paths aside)"
  else
    echo "DIFFERENT  corpus.json: diff $OUT/corpus.json $DEST/corpus.json"; differ=1
  fi
  [ $differ = 0 ] && echo "rebuild-tiny-base: the committed base is reproduced" || { echo "rebuild-tiny-base: NOT reproduced" >&2; exit 1; }
else
  mkdir -p "$DEST"
  for f in "${FILES[@]}"; do cp "$OUT/model/$f" "$DEST/$f"; done
  cp "$OUT/corpus.json" "$OUT/pretrain.json" "$DEST/"
  # Record what trained it: this commit, the roots by name, the same threads and flags.
  { sed -e "s/^commit .*/commit $commit/" -e '/^crate /d' -e '/^python /d' "$INPUTS"
    for d in "${roots[@]}"; do d=${d%/}; echo "crate ${d##*/}"; done
    echo "python $python"; } >"$INPUTS.tmp"
  mv "$INPUTS.tmp" "$INPUTS"
  echo "rebuild-tiny-base: $DEST updated from $OUT (code $commit); commit it with $INPUTS"
fi
