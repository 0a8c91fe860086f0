"""Full attention and Tactic side by side on a real model and a long real
prompt: SmolLM2-135M-Instruct reads a licence text, then answers a question
about it twice — once with full attention, once with Tactic (P = 0.9) — from
one shared prefill (``fork_sequence`` with an attention policy). It prints
both answers, the fraction of the context each read per decode step, the
attention mass Tactic kept, and the time per token of each.

    python examples/demo_tactic.py --address ipc:///path/tacflowd.sock --hf-dir DIR
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import textwrap
import time

from tacflow import Client, Full, StepEntry, Tactic

LICENCE = pathlib.Path("/usr/share/common-licenses/GPL-3")
QUESTION = "\n\nIn one sentence, what does the license above require when you distribute the software?"


def chat_prompt(tok, text: str, max_tokens: int) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    body = tok.decode(ids) + QUESTION
    msgs = [{"role": "user", "content": body}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def generate(c: Client, base: int, child: int, policy, first: int, n: int, eos: set[int], diagnostics: bool):
    c.fork_sequence(base, child, attention=policy, diagnostics=diagnostics)
    toks, read, mass, ms = [], [], [], []
    tok = first
    for _ in range(n):
        t0 = time.perf_counter()
        r = c.step([StepEntry(child, [tok])]).results[0]
        ms.append((time.perf_counter() - t0) * 1e3)
        tok = r.token
        if r.attention:
            read.append(r.attention.tokens_read_fraction)
            mass.append(r.attention.true_mass)
        if tok in eos:
            break
        toks.append(tok)
    c.close_sequence(child)
    return toks, read, mass, ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", required=True)
    ap.add_argument("--hf-dir", required=True, help="SmolLM2 folder with the tokenizer")
    ap.add_argument("--context", type=int, default=4000, help="licence tokens in the prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.hf_dir)
    c = Client(args.address, timeout_s=3600)
    prompt = chat_prompt(tok, LICENCE.read_text(), args.context)
    eos = set(c.info.model.eos_token_ids) | {tok.eos_token_id}
    print(f"model {c.info.model.name} on {c.info.backend.kind} ({c.info.backend.device})")
    print(f"prompt: {len(prompt)} tokens of {LICENCE} and a question")
    c.open_sequence(1, attention=Full(), diagnostics=True)
    t0 = time.time()
    for i in range(0, len(prompt) - 1, 1024):
        c.step([StepEntry(1, prompt[i : min(i + 1024, len(prompt) - 1)], sample=False)])
    print(f"prefill (full attention, shared by both): {time.time() - t0:.1f} s")
    runs = {}
    child = 2
    for label, policy in [("full attention", Full()), ("Tactic P=0.9", Tactic(0.9))]:
        # Timed without diagnostics (measuring the true mass reads every key),
        # then again with them for the fraction read and the mass kept.
        toks, _, _, ms = generate(c, 1, child, policy, prompt[-1], args.max_new_tokens, eos, False)
        _, read, mass, _ = generate(c, 1, child + 1, policy, prompt[-1], args.max_new_tokens, eos, True)
        runs[label] = (toks, read, mass, ms)
        child += 2
    print()
    for label, (toks, read, mass, ms) in runs.items():
        print(f"--- {label}")
        print(textwrap.fill(tok.decode(toks).strip(), width=100, initial_indent="  ", subsequent_indent="  "))
    print("\n| attention | tokens | tokens read / context | true attention mass | ms per token (p50) | first token ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, (toks, read, mass, ms) in runs.items():
        # Tactic's first decode step also clusters the cache: shown apart.
        steady = ms[1:] or ms
        print(
            f"| {label} | {len(toks)} | {statistics.mean(read):.3f} | {statistics.mean(mass):.3f} |"
            f" {statistics.median(steady):.1f} | {ms[0]:.0f} |"
        )
    c.close()


if __name__ == "__main__":
    main()
