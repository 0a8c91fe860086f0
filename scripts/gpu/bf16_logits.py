"""bf16 activations against transformers: the daemon's logits in
``--gpu-activations bf16`` mode must be no further from transformers in f32
than transformers' own bf16 run is, teacher-forced over windows of a text.

Both sides see the same W windows of token ids (default 4 x 600, at offsets
spread over the text). transformers runs one causal forward per window in
f32 (the reference) and again with the model cast to bf16. The daemon runs
the W windows as W sequences stepped together, the way a server drives it: a
64-token prefill chunk each, then one teacher-forced token per sequence per
step (decode steps of W rows, the steps that ``--cuda-graphs`` replays), the
logits of every row written into a shared-memory region. Compared: every fed
position whose next token is known (all but the last of each window).

Pass (exit status 0) when, against transformers f32,

* mean |Δ| and max |Δ| of the daemon are at most 1.5 x transformers bf16's,
* the daemon's top-1 agreement (its argmax equal to f32's) is at most 0.5
  points below transformers bf16's,

and the daemon exited cleanly. Also reported: ‖Δ‖/‖ref‖, the count of
positions, how many of f32's top-2 margins are below 1e-2 (near ties,
counted, not excluded), and each side's next-token hit rate.
DIR/bf16_logits.json and DIR/bf16_logits.md hold the results,
DIR/bf16_logits.tacflowd.log the daemon's log. The markdown table is printed last.

ON THE GPU MACHINE, with the binary at /tmp/tacflowd, SmolLM2's GGUF
reassembled at /tmp/smollm2.gguf and pyzmq and gguf installed from the
carried wheels (what scripts/gpu/e2e.sh and check.sh do first):

    PYTHONPATH=/tmp/site python3 scripts/gpu/bf16_logits.py --bin /tmp/tacflowd \\
        --gguf /tmp/smollm2.gguf --tokens .device-carry/text.tokens --out "$OUT" \\
        --daemon-arg=--cuda-graphs --daemon-arg=--fuse=add-rmsnorm,rope-kv-append,silu-gemm-input

Each ``--daemon-arg`` is split like a shell line; write it with ``=`` so
that argparse does not take a value starting with ``--`` for an option of
its own. (``--cuda-graphs`` with bf16 activations needs a daemon that
accepts the pair; one that refuses it fails to start, and its log is shown.)

On the CPU (``--gpu-activations bf16`` rounds the GEMM inputs to bf16 there,
the twin of the GPU's mode; ``--cpu-round-bf16`` rounds the weights to bf16
as the GPU holds them; the CPU's KV cache stays f32, the GPU's is bf16):

    python3 scripts/gpu/bf16_logits.py --bin target/release/tacflowd --gguf SmolLM2.gguf \\
        --tokens gpl3.tokens --out /tmp/bf16 --device cpu --backend cpu --daemon-arg=--cpu-round-bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "client-py"))

from tacflow import Client, StepEntry  # noqa: E402

#: Bounds of the acceptance item: daemon / transformers-bf16 ratios of the
#: mean and max |Δ|, and how far the daemon's top-1 agreement may trail.
RATIO_MAX = 1.5
AGREE_SLACK_POINTS = 0.5
MIN_POSITIONS = 2048
#: f32 top-2 margins below this are near ties, where either argmax is as good.
NEAR_TIE = 1e-2
SEQ_BASE = 300


@dataclass
class Diff:
    """Running sums of one candidate's logits against the f32 reference,
    fed window by window so that no all-positions difference is ever held."""

    positions: int = 0
    abs_sum: float = 0.0
    abs_max: float = 0.0
    sq_sum: float = 0.0
    ref_sq_sum: float = 0.0
    agree: int = 0
    next_hits: int = 0

    def add(self, got: np.ndarray, ref: np.ndarray, ref_top: np.ndarray, next_tokens: np.ndarray) -> None:
        d = got - ref
        a = np.abs(d)
        top = got.argmax(-1)
        self.positions += len(got)
        self.abs_sum += float(a.sum(dtype=np.float64))
        self.abs_max = max(self.abs_max, float(a.max()))
        self.sq_sum += float(np.square(d, dtype=np.float64).sum())
        self.ref_sq_sum += float(np.square(ref, dtype=np.float64).sum())
        self.agree += int((top == ref_top).sum())
        self.next_hits += int((top == next_tokens).sum())

    def summary(self, vocab: int) -> dict[str, float]:
        n = max(self.positions, 1)
        return {
            "positions": self.positions,
            "mean_abs": self.abs_sum / (n * vocab),
            "max_abs": self.abs_max,
            "rel_norm": math.sqrt(self.sq_sum / self.ref_sq_sum) if self.ref_sq_sum else float("nan"),
            "top1_agree_pct": 100.0 * self.agree / n,
            "next_token_pct": 100.0 * self.next_hits / n,
        }


@dataclass
class Comparison:
    """One candidate's sums over all positions and over the prefill and the
    decode rows apart (where a difference comes from, not a bound)."""

    all: Diff = field(default_factory=Diff)
    prefill: Diff = field(default_factory=Diff)
    decode: Diff = field(default_factory=Diff)

    def add(self, got: np.ndarray, ref: np.ndarray, next_tokens: np.ndarray, prefill: int) -> None:
        top = ref.argmax(-1)
        self.all.add(got, ref, top, next_tokens)
        self.prefill.add(got[:prefill], ref[:prefill], top[:prefill], next_tokens[:prefill])
        self.decode.add(got[prefill:], ref[prefill:], top[prefill:], next_tokens[prefill:])

    def summary(self, vocab: int) -> dict[str, dict[str, float]]:
        return {k: getattr(self, k).summary(vocab) for k in ("all", "prefill", "decode")}


def window_offsets(n_tokens: int, windows: int, length: int) -> list[int]:
    """``windows`` starts spread evenly from the text's start to its end."""
    if n_tokens < length:
        raise SystemExit(f"the text has {n_tokens} tokens, fewer than one window of {length}")
    if windows == 1:
        return [0]
    span = n_tokens - length
    return [round(k * span / (windows - 1)) for k in range(windows)]


# ------------------------------------------------------------------ daemon


def start_daemon(
    bin_path: str, gguf: str, backend: str, extra: list[str], work: pathlib.Path
) -> tuple[subprocess.Popen, str, list[str]]:
    sock = work / "d.sock"
    cmd = [bin_path, "serve", "--backend", backend, "--model", gguf, "--socket", str(sock)]
    cmd += ["--gpu-activations", "bf16", *extra]
    log = open(work / "tacflowd.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"tacflowd did not start ({shlex.join(cmd)}):\n" + (work / "tacflowd.log").read_text())
        time.sleep(0.1)
    return proc, f"ipc://{sock}", cmd


def daemon_logits(c: Client, windows: list[list[int]], prefill: int) -> tuple[np.ndarray, dict[str, float]]:
    """The daemon's logits of every fed position, ``(W, L, vocab)`` f32:
    the W windows as sequences stepped together, a ``prefill``-token chunk
    each, then one teacher-forced token per sequence per step."""
    vocab = c.info.model.vocab_size
    n, length = len(windows), len(windows[0])
    need_blocks = n * -(-length // c.info.kv.block_size)
    if c.info.kv.free_blocks < need_blocks:
        raise SystemExit(f"the daemon has {c.info.kv.free_blocks} free KV blocks, the windows need {need_blocks}")
    region = c.create_region(4 * n * length * vocab)
    for i in range(n):
        c.open_sequence(SEQ_BASE + i)
    timing = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
    fed = 0
    while fed < length:
        take = prefill if fed == 0 else 1
        entries = [
            StepEntry(
                SEQ_BASE + i,
                w[fed : fed + take],
                # A server samples after the prompt and at every decode step;
                # the sampled token is never used (teacher forcing).
                sample=True,
                logits=region.ref(4 * (i * length + fed) * vocab, "f32", (take, vocab)),
            )
            for i, w in enumerate(windows)
        ]
        t0 = time.perf_counter()
        out = c.step(entries)
        timing["prefill_s" if fed == 0 else "decode_s"] += time.perf_counter() - t0
        fed += take
        for i, r in enumerate(out.results):
            if r.num_tokens != fed:
                raise AssertionError(f"sequence {i}: the daemon caches {r.num_tokens} tokens, fed {fed}")
        if take == 1:
            timing["decode_steps"] += 1
    got = np.array(region.array("f32", (n, length, vocab)))
    for i in range(n):
        c.close_sequence(SEQ_BASE + i)
    region.close()
    if not np.isfinite(got).all():
        raise AssertionError("the daemon's logits hold non-finite values")
    return got, timing


# ------------------------------------------------------------ transformers


def load_reference(gguf: str, device: str, attn: str):
    """SmolLM2's GGUF in transformers as a dense f32 model.

    Newer transformers can keep GGUF weights packed and run them through
    downloaded kernels (and an attention of their own); the reference must be
    the plain dense model, so dequantizing is asked for where the option
    exists, and checked either way."""
    from transformers import AutoModelForCausalLM

    p = pathlib.Path(gguf)
    kw: dict = {"gguf_file": p.name, "attn_implementation": attn}
    try:
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        dense = {}
    try:
        m = AutoModelForCausalLM.from_pretrained(str(p.parent), dtype=torch.float32, **kw, **dense)
    except (TypeError, ValueError) as e:
        if not dense:
            raise
        print(f"transformers refused GgufConfig(dequantize=True) ({e}); loading without it")
        m = AutoModelForCausalLM.from_pretrained(str(p.parent), dtype=torch.float32, **kw)
    m = m.to(device).eval()
    for name, mod in m.named_modules():
        if "Linear" in type(mod).__name__ and type(mod) is not torch.nn.Linear:
            raise SystemExit(f"transformers kept {name} as {type(mod).__name__}, not a dense nn.Linear")
    for name, prm in m.named_parameters():
        if prm.dtype != torch.float32:
            raise SystemExit(f"transformers loaded {name} as {prm.dtype}, not float32")
    return m


def to_bf16(model) -> None:
    """``model.to(torch.bfloat16)``, except the RoPE frequency buffers, which
    go back to f32: ``.to()`` casts every floating buffer, while
    transformers loading a model in bf16 keeps them in f32, and its rotary
    embedding computes in f32 from them. So this is transformers' own bf16
    run, not one with coarser RoPE angles."""
    keep = {n: b.detach().clone() for n, b in model.named_buffers() if "inv_freq" in n}
    model.to(torch.bfloat16)
    for n, b in keep.items():
        owner, _, attr = n.rpartition(".")
        setattr(model.get_submodule(owner), attr, b)
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.bfloat16]
    if bad:
        raise SystemExit(f"parameters not in bf16 after the cast: {bad[:5]}")


def reference_logits(model, window: list[int], device: str) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([window], device=device)).logits[0]
    return out.float().cpu().numpy()


# ------------------------------------------------------------------ report


def fmt_pct(x: float) -> str:
    return f"{x:.2f} %"


def table(res: dict) -> str:
    tf, dm, chk = res["transformers_bf16"]["all"], res["tacflowd_bf16"]["all"], res["checks"]

    def ok(c: dict) -> str:
        return "ok" if c["pass"] else "FAIL"

    rows = [
        f"| vs transformers f32, {tf['positions']:,} positions | mean \\|Δ\\| | max \\|Δ\\| | ‖Δ‖/‖ref‖ | top-1 agree |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| transformers bf16 | {tf['mean_abs']:.4e} | {tf['max_abs']:.4f} | {tf['rel_norm']:.3e} | {fmt_pct(tf['top1_agree_pct'])} |",
        f"| tacflowd bf16 | {dm['mean_abs']:.4e} | {dm['max_abs']:.4f} | {dm['rel_norm']:.3e} | {fmt_pct(dm['top1_agree_pct'])} |",
        f"| tacflowd / transformers bf16 "
        f"| {chk['mean_ratio']['value']:.3f} (≤ {RATIO_MAX}: {ok(chk['mean_ratio'])}) "
        f"| {chk['max_ratio']['value']:.3f} (≤ {RATIO_MAX}: {ok(chk['max_ratio'])}) "
        f"| {dm['rel_norm'] / tf['rel_norm']:.3f} "
        f"| {chk['top1_agree']['value']:+.2f} pts (≥ −{AGREE_SLACK_POINTS}: {ok(chk['top1_agree'])}) |",
    ]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the tacflowd binary")
    ap.add_argument("--gguf", required=True, help="SmolLM2's .gguf file")
    ap.add_argument("--tokens", required=True, help="a file of whitespace-separated token ids")
    ap.add_argument("--out", required=True, help="folder for bf16_logits.json, .md and the daemon's log")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where transformers runs")
    ap.add_argument("--backend", default="cuda", choices=["cuda", "cpu"], help="the daemon's backend")
    ap.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        help="extra daemon flags, split like a shell line; repeatable; write --daemon-arg=--flag",
    )
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-len", type=int, default=600)
    ap.add_argument("--prefill", type=int, default=64, help="the first chunk of each window, prefilled in one step")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention")
    ap.add_argument(
        "--allow-few",
        action="store_true",
        help="run with fewer than 2,048 compared positions (a quick check of the script itself)",
    )
    args = ap.parse_args()

    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = [a for s in args.daemon_arg for a in shlex.split(s)]
    text = [int(x) for x in pathlib.Path(args.tokens).read_text().split()]
    length = args.window_len
    if not 0 < args.prefill < length:
        raise SystemExit(f"--prefill {args.prefill} must be in 1..{length - 1}, leaving decode steps")
    offsets = window_offsets(len(text), args.windows, length)
    windows = [text[o : o + length] for o in offsets]
    compared = args.windows * (length - 1)
    if compared < MIN_POSITIONS and not args.allow_few:
        raise SystemExit(f"{compared} compared positions, the acceptance item asks for at least {MIN_POSITIONS}")
    if args.device == "cuda":
        # The reference is f32: no TF32 in its matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    print(
        f"{args.windows} windows x {length} tokens at offsets {offsets} of {len(text):,}; "
        f"{compared:,} compared positions; prefill {args.prefill}, then {length - args.prefill} decode steps "
        f"of {args.windows} rows"
    )

    # The daemon first, stopped before transformers loads: on one GPU it
    # takes most of the free memory for its KV cache.
    work = pathlib.Path(tempfile.mkdtemp(prefix="tacflow-bf16-"))
    proc, address, cmd = start_daemon(args.bin, args.gguf, args.backend, extra, work)
    try:
        c = Client(address, timeout_s=600)
        info = c.info
        print(f"daemon: {shlex.join(cmd[1:])}")
        print(f"daemon: {info.daemon}, model {info.model.name}, backend {info.backend.kind} ({info.backend.device})")
        if any(t >= info.model.vocab_size or t < 0 for w in windows for t in w):
            raise SystemExit(f"token ids outside the model's vocabulary of {info.model.vocab_size}")
        t0 = time.time()
        got, timing = daemon_logits(c, windows, args.prefill)
        daemon_s = time.time() - t0
        print(
            f"daemon: prefill {timing['prefill_s']:.2f} s, {timing['decode_steps']} decode steps "
            f"{timing['decode_s']:.2f} s ({1e3 * timing['decode_s'] / max(timing['decode_steps'], 1):.1f} ms each)"
        )
        c.close()
    finally:
        proc.terminate()
        daemon_rc = proc.wait(60)
        (out_dir / "bf16_logits.tacflowd.log").write_bytes((work / "tacflowd.log").read_bytes())
    vocab = got.shape[-1]
    backend_desc = f"{info.backend.kind} ({info.backend.device})"

    import transformers

    t0 = time.time()
    model = load_reference(args.gguf, args.device, args.attn)
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"transformers {transformers.__version__}, torch {torch.__version__} on {dev_name}, {args.attn} attention")
    if model.config.vocab_size != vocab:
        raise SystemExit(f"transformers' vocabulary is {model.config.vocab_size}, the daemon's {vocab}")
    refs = []
    for w in windows:
        refs.append(reference_logits(model, w, args.device))
    f32_s = time.time() - t0
    t0 = time.time()
    to_bf16(model)
    tf_cmp, dm_cmp = Comparison(), Comparison()
    near_ties = 0
    f32_hits = 0
    for i, w in enumerate(windows):
        lo = reference_logits(model, w, args.device)
        ref = refs[i][:-1]
        nxt = np.asarray(w[1:])
        tf_cmp.add(lo[:-1], ref, nxt, args.prefill)
        dm_cmp.add(got[i, :-1], ref, nxt, args.prefill)
        top2 = np.partition(ref, -2, axis=-1)[:, -2:]
        near_ties += int((top2[:, 1] - top2[:, 0] < NEAR_TIE).sum())
        f32_hits += int((ref.argmax(-1) == nxt).sum())
        refs[i] = None  # each window's reference is done with
    bf16_s = time.time() - t0
    del model

    tf_sum, dm_sum = tf_cmp.summary(vocab), dm_cmp.summary(vocab)
    tf_all, dm_all = tf_sum["all"], dm_sum["all"]
    assert dm_all["positions"] == compared == tf_all["positions"]
    mean_ratio = dm_all["mean_abs"] / tf_all["mean_abs"]
    max_ratio = dm_all["max_abs"] / tf_all["max_abs"]
    agree_diff = dm_all["top1_agree_pct"] - tf_all["top1_agree_pct"]
    checks = {
        "mean_ratio": {"value": mean_ratio, "bound": f"<= {RATIO_MAX}", "pass": mean_ratio <= RATIO_MAX},
        "max_ratio": {"value": max_ratio, "bound": f"<= {RATIO_MAX}", "pass": max_ratio <= RATIO_MAX},
        "top1_agree": {
            "value": agree_diff,
            "bound": f">= -{AGREE_SLACK_POINTS} points",
            "pass": agree_diff >= -AGREE_SLACK_POINTS,
        },
        "daemon_exit": {"value": daemon_rc, "bound": "== 0", "pass": daemon_rc == 0},
    }
    ok = all(c["pass"] for c in checks.values())
    res = {
        "pass": ok,
        "checks": checks,
        "positions": compared,
        "near_ties_f32": {"threshold": NEAR_TIE, "count": near_ties},
        "f32_next_token_pct": 100.0 * f32_hits / compared,
        "transformers_bf16": tf_sum,
        "tacflowd_bf16": dm_sum,
        "setup": {
            "gguf": os.path.basename(args.gguf),
            "tokens": os.path.basename(args.tokens),
            "text_tokens": len(text),
            "windows": args.windows,
            "window_len": length,
            "offsets": offsets,
            "prefill": args.prefill,
            "daemon_cmd": cmd[1:],
            "daemon": info.daemon,
            "daemon_backend": backend_desc,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "device": dev_name,
            "attn": args.attn,
            "host": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        },
        "seconds": {"daemon": daemon_s, **timing, "transformers_f32": f32_s, "transformers_bf16": bf16_s},
    }
    (out_dir / "bf16_logits.json").write_text(json.dumps(res, indent=2) + "\n")
    tab = table(res)
    split = (
        f"prefill rows: tacflowd ‖Δ‖/‖ref‖ {dm_sum['prefill']['rel_norm']:.3e}, agree "
        f"{fmt_pct(dm_sum['prefill']['top1_agree_pct'])} (transformers bf16 {tf_sum['prefill']['rel_norm']:.3e}, "
        f"{fmt_pct(tf_sum['prefill']['top1_agree_pct'])}); decode rows: tacflowd {dm_sum['decode']['rel_norm']:.3e}, "
        f"{fmt_pct(dm_sum['decode']['top1_agree_pct'])} (transformers bf16 {tf_sum['decode']['rel_norm']:.3e}, "
        f"{fmt_pct(tf_sum['decode']['top1_agree_pct'])})"
    )
    notes = [
        f"near ties (f32 top-2 margin < {NEAR_TIE}): {near_ties} of {compared:,} positions, counted, not excluded",
        f"next-token hit rate: f32 {fmt_pct(res['f32_next_token_pct'])}, transformers bf16 "
        f"{fmt_pct(tf_all['next_token_pct'])}, tacflowd {fmt_pct(dm_all['next_token_pct'])}",
        split,
        f"daemon exit status {daemon_rc}; {'PASS' if ok else 'FAIL'}",
    ]
    md = "\n".join(
        [
            f"# bf16 logits: tacflowd on {backend_desc} against transformers {transformers.__version__} ({dev_name})",
            "",
            f"daemon: `{shlex.join(cmd[1:])}`",
            f"windows: {args.windows} x {length} tokens of {os.path.basename(args.tokens)} at {offsets}, "
            f"prefill {args.prefill} then one token per step",
            "",
            *[f"- {n}" for n in notes],
            "",
            tab,
            "",
        ]
    )
    (out_dir / "bf16_logits.md").write_text(md)
    print()
    print("\n".join(notes))
    print()
    print(tab)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
