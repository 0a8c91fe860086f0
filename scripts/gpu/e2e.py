"""GPU end to end: the Python client drives tacflowd on the CUDA
backend, and its logits must match transformers running on the GPU within
2e-2 (‖out−ref‖/‖ref‖), over chunked prefills and 32 greedy decode steps
of a batch of sequences stepped together.

Run ON THE GPU MACHINE by scripts/gpu/e2e.sh (it installs the carried pyzmq
and gguf wheels and puts client-py and tests/ on the path):

    python3 scripts/gpu/e2e.py --bin /tmp/tacflowd --model tiny
    python3 scripts/gpu/e2e.py --bin /tmp/tacflowd --model /tmp/smollm2.gguf --tokens .device-carry/text.tokens
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "client-py"))
sys.path.insert(0, str(ROOT / "tests"))

from teacher import collect, rel_err  # noqa: E402

from tacflow import Client  # noqa: E402

TOLERANCE = 2e-2
DECODE_STEPS = 32


def start_daemon(bin_path: str, model: str, work: pathlib.Path) -> tuple[subprocess.Popen, str]:
    sock = work / "d.sock"
    log = open(work / "tacflowd.log", "wb")
    proc = subprocess.Popen(
        [bin_path, "serve", "--backend", "cuda", "--model", model, "--socket", str(sock), "--kv-blocks", "4096"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("tacflowd did not start:\n" + (work / "tacflowd.log").read_text())
        time.sleep(0.1)
    return proc, f"ipc://{sock}"


def reference_model(bin_path: str, model: str, work: pathlib.Path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if model.endswith(".gguf"):
        p = pathlib.Path(model)
        m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, torch_dtype=torch.float32)
    else:
        out = work / "hf"
        subprocess.run([bin_path, "export-model", "--model", model, "--out", str(out)], check=True)
        m = LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32, attn_implementation="sdpa")
    return m.cuda().eval()


def prompts_for(model: str, vocab: int, tokens_path: str | None) -> list[list[int]]:
    if tokens_path:
        text = [int(x) for x in pathlib.Path(tokens_path).read_text().split()]
        starts, lengths = [0, 700, 1400, 2000], [100, 257, 511, 300]
        return [text[s : s + n] for s, n in zip(starts, lengths)]
    rng = np.random.default_rng(1234)
    return [rng.integers(3, vocab, size=n).tolist() for n in (1, 5, 17, 33, 50, 200)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens")
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="tacflow-e2e-"))
    proc, address = start_daemon(args.bin, args.model, work)
    try:
        c = Client(address, timeout_s=600)
        print(f"daemon: {c.info.daemon}, model {c.info.model.name}, backend {c.info.backend.kind} ({c.info.backend.device})")
        prompts = prompts_for(args.model, c.info.model.vocab_size, args.tokens)
        t0 = time.time()
        seqs, rows = collect(c, prompts, DECODE_STEPS, chunk=64)
        print(f"daemon: {len(prompts)} sequences, chunked prefill + {DECODE_STEPS} decode steps in {time.time() - t0:.1f} s")
        c.close()
    finally:
        proc.terminate()
        rc = proc.wait(60)
    model = reference_model(args.bin, args.model, work)
    print(f"reference: transformers {__import__('transformers').__version__} on {torch.cuda.get_device_name()}, f32")
    print("\n| sequence | prompt | positions | rel err prefill | rel err decode | top-1 agree |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for i, (seq, got) in enumerate(zip(seqs, rows)):
        with torch.no_grad():
            want = model(torch.tensor([seq[:-1]], device="cuda")).logits[0].double().cpu().numpy()
        n = len(prompts[i])
        e_pre, e_dec = rel_err(got[:n], want[:n]), rel_err(got[n:], want[n:])
        agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
        worst = max(worst, e_pre, e_dec)
        print(f"| {i} | {n} | {len(got)} | {e_pre:.2e} | {e_dec:.2e} | {agree:.3f} |")
    ok = worst <= TOLERANCE and rc == 0
    print(f"\nworst norm-wise relative error {worst:.2e} (tolerance {TOLERANCE}); daemon exit {rc}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
