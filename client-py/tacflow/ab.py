"""``tacflow ab``: stock attention against tacflowd's policies, on your prompts.

Side A is the model in stock transformers (its own attention, no daemon).
Side B runs the same model's attention through ``tacflowd`` under each
policy: through the transformers integration (``tacflow.hf``: the model
stays in transformers, each layer's attention goes to the daemon), or, with
``--through daemon``, through a daemon that loaded the whole model.

Per prompt, side A generates ``--new-tokens`` greedy tokens. Side B is
prefilled once (prefill is full attention under every policy), forked once
per policy, and teacher-forced along A's tokens as decode steps, which gives
per position the KL divergence KL(A‖B) of the next-token distributions,
whether B's top-1 token is A's, and the first position where B's greedy
answer would leave A's (B's answer equals A's exactly when there is none);
a policy that diverges also generates its own answer, so that a passkey
answer can be checked. Tokens read are the daemon's diagnostics (the
fraction of the context a decode query read, over layers and heads); ms
per token is B's decode time per token.

Writes ``ab.md`` (a Markdown table per prompt and the aggregate), ``ab.json``
(everything) and ``ab.png`` (mean KL against tokens read, one point per
policy and prompt, with matplotlib when it is installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from .prompts import Prompt
from .protocol import AttentionPolicy, FixedBudget, Full, OracleTopP, Tactic


# ---------------------------------------------------------------- policies


def parse_policy(text: str) -> AttentionPolicy:
    """``full``, ``tactic:P``, ``fixed:TOKENS`` (Quest-style budget) or
    ``oracle:P``."""
    name, _, arg = text.partition(":")
    try:
        if name == "full" and not arg:
            return Full()
        if name == "tactic":
            return Tactic(float(arg))
        if name in ("fixed", "fixed_budget"):
            return FixedBudget(int(arg))
        if name in ("oracle", "oracle_top_p"):
            return OracleTopP(float(arg))
    except ValueError:
        pass
    raise ValueError(f"policy {text!r}: expected full, tactic:P, fixed:TOKENS or oracle:P")


def policy_label(p: AttentionPolicy) -> str:
    if isinstance(p, Tactic):
        return f"tactic:{p.p:g}"
    if isinstance(p, FixedBudget):
        return f"fixed:{p.tokens}"
    if isinstance(p, OracleTopP):
        return f"oracle:{p.p:g}"
    return "full"


# ---------------------------------------------------------------- comparisons


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare(a_logits: np.ndarray, b_logits: np.ndarray, a_tokens: list[int]) -> dict[str, Any]:
    """KL(A‖B) per position, top-1 agreement, and the first position where
    B's arg-max is not A's token (``None``: B's greedy answer is A's)."""
    la, lb = log_softmax(a_logits), log_softmax(b_logits)
    kl = (np.exp(la) * (la - lb)).sum(axis=-1)
    b_top = lb.argmax(axis=-1)
    agree = b_top == np.asarray(a_tokens)
    first = None if bool(agree.all()) else int(np.argmin(agree))
    return {
        "kl": [float(x) for x in kl],
        "kl_mean": float(kl.mean()),
        "top1": float(agree.mean()),
        "first_divergence": first,
    }


# ---------------------------------------------------------------- results


@dataclass
class PolicyResult:
    policy: str
    kl_mean: float
    kl: list[float]
    top1: float
    first_divergence: int | None
    answer_agrees: bool
    tokens_read: float
    ms_per_token: float
    offload_ms_per_token: float | None = None
    answer: str | None = None
    answer_correct: bool | None = None


@dataclass
class PromptResult:
    id: str
    prompt_tokens: int
    stock_answer: str
    stock_correct: bool | None
    stock_ms_per_token: float
    policies: list[PolicyResult] = field(default_factory=list)


def _correct(text: str, answer: str | None) -> bool | None:
    return None if answer is None else answer in text


# ---------------------------------------------------------------- progress


class Progress:
    """tqdm when it is installed, else a line per update on stderr."""

    def __init__(self, total: int, desc: str, quiet: bool = False):
        self.bar = None
        self.desc, self.total, self.n, self.quiet = desc, total, 0, quiet
        if quiet:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False, file=sys.stderr)
        except ImportError:
            pass

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note)
        elif not self.quiet and (self.n == self.total or self.n % 8 == 0):
            print(f"{self.desc}: {self.n}/{self.total} {note}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- side A


class _Clock:
    """A generate() streamer that notes when each token arrives (the first
    call is the prompt), so that decode time is told apart from prefill."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def stock_run(model: Any, ids: list[int], new_tokens: int) -> tuple[list[int], np.ndarray, float]:
    """Greedy generation in stock transformers: the tokens, their logits
    ``[n, vocab]`` (the distribution each token was drawn from) and the
    seconds per decode step (prefill excluded)."""
    import torch

    inp = torch.tensor([ids])
    clock = _Clock()
    with torch.no_grad():
        out = model.generate(
            inp,
            attention_mask=torch.ones_like(inp),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=_pad_id(model),
            streamer=clock,
        )
    toks = out.sequences[0, len(ids) :].tolist()
    logits = torch.stack(out.logits, dim=1)[0].float().numpy()
    t = clock.times
    spt = (t[-1] - t[1]) / (len(t) - 2) if len(t) > 2 else float("nan")
    return toks, logits, spt


def _pad_id(model: Any) -> int:
    gc = getattr(model, "generation_config", None)
    for cand in (getattr(gc, "pad_token_id", None), getattr(gc, "eos_token_id", None)):
        if isinstance(cand, list) and cand:
            return int(cand[0])
        if isinstance(cand, int):
            return cand
    return 0


# ---------------------------------------------------------------- side B, transformers


def hf_prefill(model: Any, ids: list[int]) -> tuple[Any, np.ndarray]:
    """Prefills ``ids`` through the daemon (full attention); returns the
    cache and the last position's logits."""
    import torch

    from . import hf

    cache = hf.TacflowCache(model.config, policy=Full(), diagnostics=True)
    with torch.no_grad():
        out = model(torch.tensor([ids]), **{hf._cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1].float().numpy()


def hf_decode(model: Any, cache: Any, first_logits: np.ndarray, feed: list[int], bar: Progress | None = None,
              greedy: bool = False) -> tuple[np.ndarray, list[int], float]:
    """Decode steps from a prefilled cache: feeds ``feed`` (teacher forcing)
    or, with ``greedy``, its own arg-max for ``len(feed)`` steps. Returns
    the logits of every step (the first from the prefill), the tokens fed,
    and the seconds per decode step."""
    import torch

    from . import hf

    rows = [first_logits]
    fed: list[int] = []
    kw = {hf._cache_kwarg(model): cache, "use_cache": True}
    t0 = time.perf_counter()
    for i in range(len(feed) - 1):
        tok = int(np.argmax(rows[-1])) if greedy else feed[i]
        fed.append(tok)
        with torch.no_grad():
            out = model(torch.tensor([[tok]]), **kw)
        rows.append(out.logits[0, -1].float().numpy())
        if bar is not None:
            bar.update(1)
    fed.append(int(np.argmax(rows[-1])) if greedy else feed[-1])
    steps = max(1, len(feed) - 1)
    return np.stack(rows), fed, (time.perf_counter() - t0) / steps


def hf_side(model: Any, ids: list[int], a_tokens: list[int], policies: list[AttentionPolicy],
            progress: bool = True) -> list[tuple[AttentionPolicy, np.ndarray, float, float, float | None, list[int] | None]]:
    """Every policy through the transformers integration, from one prefill:
    per policy its logits along A's tokens, tokens read, seconds per token,
    offload seconds per token, and its own greedy answer when it diverges."""
    base, first = hf_prefill(model, ids)
    out = []
    try:
        for p in policies:
            bar = Progress(len(a_tokens) - 1, f"  B {policy_label(p)}", quiet=not progress)
            fork = base.fork(policy=p, diagnostics=True)
            try:
                logits, _, spt = hf_decode(model, fork, first, a_tokens, bar)
                read = fork.tokens_read()
                off = fork.offload_s / max(1, len(a_tokens) - 1)
            finally:
                fork.close()
                bar.close()
            own = None
            if np.argmax(logits, axis=-1).tolist() != a_tokens:
                g = base.fork(policy=p, diagnostics=False)
                try:
                    _, own, _ = hf_decode(model, g, first, a_tokens, greedy=True)
                finally:
                    g.close()
            out.append((p, logits, 1.0 if read is None else read, spt, off, own))
    finally:
        base.close()
    return out


# ---------------------------------------------------------------- side B, the daemon's model


def daemon_side(client: Any, ids: list[int], a_tokens: list[int], policies: list[AttentionPolicy],
                progress: bool = True) -> list[tuple[AttentionPolicy, np.ndarray, float, float, None, list[int] | None]]:
    """Every policy through a daemon that loaded the whole model: one
    prefill (full attention), a fork per policy, teacher-forced decode
    steps with their logits written into a region."""
    from .protocol import SamplingParams, StepEntry

    vocab = client.info.model.vocab_size
    n = len(a_tokens)
    region = client.create_region(4 * vocab * (n + 1))
    base = 1_000_000 + int(time.time_ns() % 1_000_000) * 16
    out = []
    try:
        client.open_sequence(base, attention=Full(), sampling=SamplingParams(seed=0))
        # The prompt's last row is the only one whose logits are needed.
        if len(ids) > 1:
            client.step([StepEntry(base, ids[:-1], sample=False)])
        client.step([StepEntry(base, ids[-1:], sample=False, logits=region.ref(0, "f32", (1, vocab)))])
        last = region.array("f32", (vocab,), 0).copy()
        for k, p in enumerate(policies, 1):
            bar = Progress(n - 1, f"  B {policy_label(p)}", quiet=not progress)
            sid = base + k
            client.fork_sequence(base, sid, attention=p, diagnostics=True)
            rows, reads = [last], []
            t0 = time.perf_counter()
            for i in range(n - 1):
                ref = region.ref(0, "f32", (1, vocab))
                res = client.step([StepEntry(sid, [a_tokens[i]], sample=False, logits=ref)]).results[0]
                rows.append(region.array("f32", (vocab,), 0).copy())
                if res.attention is not None:
                    reads.append(res.attention.tokens_read_fraction)
                bar.update(1)
            spt = (time.perf_counter() - t0) / max(1, n - 1)
            bar.close()
            client.close_sequence(sid)
            logits = np.stack(rows)
            own = None
            if np.argmax(logits, axis=-1).tolist() != a_tokens:
                own = _daemon_greedy(client, base, base + len(policies) + k, p, last, n, region, vocab)
            out.append((p, logits, float(np.mean(reads)) if reads else 1.0, spt, None, own))
    finally:
        with contextlib.suppress(Exception):
            client.close_sequence(base)
        region.close()
    return out


def _daemon_greedy(client, base, sid, p, last, n, region, vocab) -> list[int]:
    from .protocol import StepEntry

    client.fork_sequence(base, sid, attention=p)
    toks = [int(np.argmax(last))]
    try:
        for _ in range(n - 1):
            ref = region.ref(0, "f32", (1, vocab))
            client.step([StepEntry(sid, [toks[-1]], sample=False, logits=ref)])
            toks.append(int(np.argmax(region.array("f32", (vocab,), 0))))
    finally:
        client.close_sequence(sid)
    return toks


# ---------------------------------------------------------------- the daemon


def find_tacflowd() -> str:
    """``$TACFLOWD``, ``tacflowd`` on the PATH, or a repository checkout's
    ``target/release/tacflowd``."""
    env = os.environ.get("TACFLOWD")
    if env:
        return env
    found = shutil.which("tacflowd")
    if found:
        return found
    here = pathlib.Path(__file__).resolve()
    for up in here.parents:
        cand = up / "target" / "release" / "tacflowd"
        if cand.exists():
            return str(cand)
    raise FileNotFoundError("tacflowd not found: set $TACFLOWD, put it on the PATH, or pass --address")


@contextlib.contextmanager
def attention_daemon(pool_mb: int = 4096) -> Iterator[str]:
    """A ``tacflowd --attention-only`` of our own on a private socket."""
    work = tempfile.mkdtemp(prefix="tacflow-ab-")
    sock = os.path.join(work, "tacflowd.sock")
    log = open(os.path.join(work, "tacflowd.log"), "wb")
    proc = subprocess.Popen(
        [find_tacflowd(), "serve", "--socket", sock, "--backend", "cpu", "--attention-only",
         "--attention-pool-mb", str(pool_mb)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError("tacflowd did not start:\n" + pathlib.Path(log.name).read_text(errors="replace"))
            time.sleep(0.02)
        yield f"ipc://{sock}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- the run


def run(
    model_dir: str,
    prompts: list[Prompt],
    policies: list[AttentionPolicy],
    new_tokens: int = 32,
    through: str = "hf",
    address: str | None = None,
    progress: bool = True,
    dtype: str = "float32",
) -> list[PromptResult]:
    """The A/B of every prompt and policy (see the module doc)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    stock = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa").eval()
    results = []
    if through == "hf":
        from . import hf

        ctx = attention_daemon() if address is None else contextlib.nullcontext(address)
        with ctx as addr:
            hf.connect(addr)
            offl = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="tacflow").eval()
            for pr in prompts:
                results.append(_one(pr, tok, stock, new_tokens, progress,
                                    lambda ids, a: hf_side(offl, ids, a, policies, progress)))
            hf.connection().close()
    elif through == "daemon":
        from .client import Client

        with Client(address, timeout_s=600.0) as c:
            for pr in prompts:
                results.append(_one(pr, tok, stock, new_tokens, progress,
                                    lambda ids, a: daemon_side(c, ids, a, policies, progress)))
    else:
        raise ValueError(f"through must be 'hf' or 'daemon', not {through!r}")
    return results


def _one(pr: Prompt, tok: Any, stock: Any, new_tokens: int, progress: bool, side_b) -> PromptResult:
    ids = tok(pr.text)["input_ids"]
    if progress:
        print(f"{pr.id}: {len(ids)} prompt tokens", file=sys.stderr)
    a_tokens, a_logits, a_spt = stock_run(stock, ids, new_tokens)
    a_text = tok.decode(a_tokens, skip_special_tokens=True)
    res = PromptResult(pr.id, len(ids), a_text, _correct(a_text, pr.answer), a_spt * 1e3)
    for p, b_logits, read, spt, off, own in side_b(ids, a_tokens):
        cmp = compare(a_logits, b_logits, a_tokens)
        own_text = a_text if own is None else tok.decode(own, skip_special_tokens=True)
        res.policies.append(PolicyResult(
            policy=policy_label(p),
            kl_mean=cmp["kl_mean"],
            kl=cmp["kl"],
            top1=cmp["top1"],
            first_divergence=cmp["first_divergence"],
            answer_agrees=cmp["first_divergence"] is None,
            tokens_read=read,
            ms_per_token=spt * 1e3,
            offload_ms_per_token=None if off is None else off * 1e3,
            answer=own_text,
            answer_correct=_correct(own_text, pr.answer),
        ))
    return res


# ---------------------------------------------------------------- reports


def aggregate(results: list[PromptResult]) -> list[dict[str, Any]]:
    """Per policy, over prompts: mean KL, top-1, tokens read, ms per token,
    answers agreeing with A's, and passkeys found."""
    by: dict[str, list[PolicyResult]] = {}
    for r in results:
        for p in r.policies:
            by.setdefault(p.policy, []).append(p)
    out = []
    for name, ps in by.items():
        correct = [p.answer_correct for p in ps if p.answer_correct is not None]
        out.append({
            "policy": name,
            "prompts": len(ps),
            "kl_mean": float(np.mean([p.kl_mean for p in ps])),
            "top1": float(np.mean([p.top1 for p in ps])),
            "tokens_read": float(np.mean([p.tokens_read for p in ps])),
            "answers_agree": sum(p.answer_agrees for p in ps),
            "answers_correct": sum(correct) if correct else None,
            "ms_per_token": float(np.mean([p.ms_per_token for p in ps])),
        })
    return out


def markdown(results: list[PromptResult], meta: dict[str, Any]) -> str:
    lines = [f"# tacflow ab: {meta['model']}", ""]
    lines.append(f"Side A: stock transformers ({meta['stock']}). Side B: tacflowd ({meta['through']}). "
                 f"{meta['new_tokens']} greedy tokens per prompt; KL(A‖B) and top-1 on A's tokens, teacher-forced.")
    lines += ["", "## Aggregate", "",
              "| policy | prompts | mean KL | top-1 | tokens read | answers = A | passkeys | ms/token |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for a in aggregate(results):
        pk = "—" if a["answers_correct"] is None else f"{a['answers_correct']}/{a['prompts']}"
        lines.append(f"| {a['policy']} | {a['prompts']} | {a['kl_mean']:.4g} | {a['top1']:.1%} | "
                     f"{a['tokens_read']:.1%} | {a['answers_agree']}/{a['prompts']} | {pk} | {a['ms_per_token']:.1f} |")
    lines += ["", "## Per prompt", "",
              "| prompt | tokens | policy | mean KL | top-1 | first divergence | tokens read | passkey | ms/token |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in results:
        sk = "—" if r.stock_correct is None else ("yes" if r.stock_correct else "no")
        lines.append(f"| {r.id} | {r.prompt_tokens} | stock (A) | 0 | 100% | — | 100% | {sk} | {r.stock_ms_per_token:.1f} |")
        for p in r.policies:
            fd = "none" if p.first_divergence is None else str(p.first_divergence)
            ok = "—" if p.answer_correct is None else ("yes" if p.answer_correct else "no")
            lines.append(f"| {r.id} | {r.prompt_tokens} | {p.policy} | {p.kl_mean:.4g} | {p.top1:.1%} | {fd} | "
                         f"{p.tokens_read:.1%} | {ok} | {p.ms_per_token:.1f} |")
    lines += ["", "## Answers", ""]
    for r in results:
        lines.append(f"- **{r.id}**, stock: {r.stock_answer.strip()!r}")
        for p in r.policies:
            if not p.answer_agrees:
                lines.append(f"  - {p.policy}: {(p.answer or '').strip()!r}")
    return "\n".join(lines) + "\n"


def plot(results: list[PromptResult], path: pathlib.Path) -> str | None:
    """KL against tokens read, one point per (policy, prompt) and each
    policy's mean; returns why no PNG was written, or ``None``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for a in aggregate(results):
        pts = [(p.tokens_read, p.kl_mean) for r in results for p in r.policies if p.policy == a["policy"]]
        xs, ys = zip(*pts)
        line = ax.scatter([100 * x for x in xs], [max(y, 1e-9) for y in ys], alpha=0.4, s=18)
        ax.scatter([100 * a["tokens_read"]], [max(a["kl_mean"], 1e-9)], marker="D", s=60,
                   color=line.get_facecolor()[0], edgecolor="black", label=a["policy"])
    ax.set_xlabel("tokens read (% of the context, per decode step)")
    ax.set_ylabel("mean KL(stock ‖ policy)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(title="policy (◆ mean)")
    ax.set_title("tacflow ab: next-token KL against tokens read")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def write(results: list[PromptResult], out_dir: str | pathlib.Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``ab.md``, ``ab.json`` and ``ab.png`` in ``out_dir``; returns where
    they are (and why the PNG is missing, if it is)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.md").write_text(markdown(results, meta))
    doc = {"meta": meta, "aggregate": aggregate(results), "prompts": [asdict(r) for r in results]}
    (out / "ab.json").write_text(json.dumps(doc, indent=2))
    why = plot(results, out / "ab.png")
    return {"markdown": str(out / "ab.md"), "json": str(out / "ab.json"),
            "png": None if why else str(out / "ab.png"), "png_missing": why}


def policies_or_default(texts: Iterable[str]) -> list[AttentionPolicy]:
    got = [parse_policy(t) for t in texts]
    return got or [Full(), Tactic(0.9), FixedBudget(2048)]
