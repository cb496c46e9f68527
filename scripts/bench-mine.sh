#!/usr/bin/env bash
# bench-mine.sh REPO [RUNS]: `finetune mine` against `git log -p --first-parent
# --diff-merges=first-parent` on the same repository, in the same run (not a test).
#
#   cargo build --release && scripts/bench-mine.sh /path/to/repo 3
#
# Prints the machine, both commands, their median wall time, first-parent commits per second,
# peak memory (max RSS), and the ratio finetune/git. Both read every first-parent commit; git
# diffs every one of them (merges against their first parent), finetune skips branch merges
# that are not pull requests before diffing (it prints how many), so on a merge-heavy history
# the comparison favours finetune: prefer a repository whose first-parent history is mostly
# commits or PR merges (e.g. curl) for the headline figure.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
REPO=$1
RUNS=${2:-3}
cd "$(dirname "$0")/.."
BIN=${FINETUNE_BIN:-target/release/finetune}
[ -x "$BIN" ] || { echo "build first: cargo build --release ($BIN missing)" >&2; exit 2; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

commits=$(git -C "$REPO" rev-list --first-parent --count HEAD)
merges=$(git -C "$REPO" rev-list --first-parent --merges --count HEAD)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -sr)"
echo "repo: $REPO ($commits first-parent commits, $merges of them merges)"
echo "git: $(git --version); finetune: $("$BIN" --version)"

# once NAME CMD...: appends "wall_s max_rss_kb cpu_s" of one run to $OUT/NAME
once() {
  local name=$1; shift
  /usr/bin/time -f "%e %M %U %S" -o "$OUT/t" "$@" >/dev/null 2>"$OUT/err" || { cat "$OUT/err" >&2; exit 1; }
  awk '{ print $1, $2, $3 + $4 }' "$OUT/t" >> "$OUT/$name"
}
GIT_CMD=(git -C "$REPO" log -p --first-parent --diff-merges=first-parent HEAD)
MINE_CMD=("$BIN" mine --repo "$REPO" --out "$OUT/data" -q)
echo "baseline: ${GIT_CMD[*]} > /dev/null"
echo "ours:     ${MINE_CMD[*]}"
# Interleaved, so that a slow phase of a shared machine hits both sides alike.
for _ in $(seq "$RUNS"); do
  once git "${GIT_CMD[@]}"
  once mine "${MINE_CMD[@]}"
done

python3 - "$OUT" "$commits" <<'PY'
import json, statistics, sys
out, commits = sys.argv[1], int(sys.argv[2])
def runs(name):
    rows = [l.split() for l in open(f"{out}/{name}") if l.strip()]
    return [float(r[0]) for r in rows], [int(r[1]) for r in rows], [float(r[2]) for r in rows]
gw, gm, gc = runs("git"); mw, mm, mc = runs("mine")
g, m = statistics.median(gw), statistics.median(mw)
walls = lambda w: " ".join(f"{x:.2f}" for x in w)
print(f"git log -p : median {g:6.2f} s wall ({walls(gw)}), {commits / g:7.0f} commits/s, "
      f"CPU {statistics.median(gc):6.2f} s, peak {max(gm) / 1024:5.0f} MiB")
print(f"finetune   : median {m:6.2f} s wall ({walls(mw)}), {commits / m:7.0f} commits/s, "
      f"CPU {statistics.median(mc):6.2f} s, peak {max(mm) / 1024:5.0f} MiB")
print(f"ratio      : finetune mine is {g / m:.2f}x git's commits/s (wall clock, {len(gw)} interleaved runs each)")
man = json.load(open(f"{out}/data/manifest.json"))
c = man["counts"]
print(f"mined      : {man['train']} train + {man['heldout']} held-out pairs; changes left out: "
      + ", ".join(f"{k} {v}" for k, v in sorted(c["changes_skipped"].items())))
PY
