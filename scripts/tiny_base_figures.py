#!/usr/bin/env python3
"""Held-out loss of a base model on source files it never saw, through `finetune score`.

Usage: tiny_base_figures.py FINETUNE MODEL_DIR NAME=ROOT [NAME=ROOT ...]

Each *.rs / *.py file under ROOT (sorted, .git and target/ skipped) becomes the document
`### <path>\\n<content>` + <|endoftext|>, as `finetune pretrain` writes them, cut into windows
of 1024 tokens; `finetune score` gives every token's log-probability under MODEL_DIR (the
window's first token is not predicted). Prints one JSON line per root: files, tokens, mean
loss in nats per token. Needs the `tokenizers` Python package (~/.venv-ref has it); the
numbers come from the finetune binary.
"""
import json, os, subprocess, sys, tempfile
from tokenizers import Tokenizer

finetune, model = sys.argv[1], sys.argv[2]
tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
eos = tok.token_to_id("<|endoftext|>")
for spec in sys.argv[3:]:
    name, root = spec.split("=", 1)
    windows, files = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", "target") and not d.startswith("."))
        for f in sorted(filenames):
            if not f.endswith((".rs", ".py")):
                continue
            path = os.path.join(dirpath, f)
            try:
                text = open(path, encoding="utf-8").read()
            except UnicodeDecodeError:
                continue
            rel = os.path.relpath(path, root)
            ids = tok.encode("### " + rel + "\n" + text, add_special_tokens=False).ids + [eos]
            files += 1
            windows += [ids[i:i + 1024] for i in range(0, len(ids), 1024) if len(ids[i:i + 1024]) >= 2]
    with tempfile.TemporaryDirectory() as d:
        inp, out = os.path.join(d, "in.jsonl"), os.path.join(d, "out.jsonl")
        with open(inp, "w") as fh:
            for w in windows:
                fh.write(json.dumps({"ids": w}) + "\n")
        subprocess.run([finetune, "score", "--model", model, "--input", inp, "--out", out], check=True)
        total, n = 0.0, 0
        for line in open(out):
            r = json.loads(line)
            total += r["total"]
            n += len(r["ids"]) - 1
    print(json.dumps({"corpus": name, "model": model, "files": files, "windows": len(windows),
                      "tokens": n, "loss": -total / n}))
