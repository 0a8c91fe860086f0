"""Inputs of the accuracy harness: long real texts nobody here wrote, and the
passkey prompts built from them.

The texts are the licence files every Debian system ships under
``/usr/share/common-licenses`` (GPL-3, LGPL-2.1, LGPL-2, GFDL-1.3, MPL-1.1):
4k–8k tokens each for SmolLM2's tokenizer, the same on every machine.
"""

from __future__ import annotations

import pathlib
import random
from dataclasses import dataclass

LICENCES = pathlib.Path("/usr/share/common-licenses")
TEXT_NAMES = ["GPL-3", "LGPL-2.1", "LGPL-2", "GFDL-1.3", "MPL-1.1"]


@dataclass
class Text:
    name: str
    tokens: list[int]


def load_texts(tokenizer, min_tokens: int = 4000, max_tokens: int = 8000) -> list[Text]:
    """The licence texts, tokenized, cut to at most ``max_tokens``."""
    out = []
    for name in TEXT_NAMES:
        path = LICENCES / name
        if not path.exists():
            raise SystemExit(f"error: {path} is missing (Debian's base-files ships it)")
        ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
        if len(ids) < min_tokens:
            continue
        out.append(Text(name, ids[:max_tokens]))
    if not out:
        raise SystemExit("error: no licence text is long enough")
    return out


PASSKEY_INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the pass key.\n\n"
)
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    depth: float
    key: str
    tokens: list[int]


def passkey_trials(
    tokenizer, corpus: list[Text], context: int, depths: list[float], trials: int, seed: int
) -> list[PasskeyTrial]:
    """``trials`` prompts per depth of about ``context`` tokens: a random
    5-digit key planted at ``depth`` of a filler cut from a random window of
    the licence corpus (different numbers and filler in every trial)."""
    rng = random.Random(seed)
    pool = [t for text in corpus for t in text.tokens]
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, question = enc(PASSKEY_INTRO), enc(PASSKEY_QUESTION)
    out = []
    for depth in depths:
        for _ in range(trials):
            key = str(rng.randint(10000, 99999))
            needle = enc(PASSKEY_NEEDLE.format(key=key))
            n_fill = context - len(intro) - len(needle) - len(question)
            start = rng.randrange(0, len(pool) - n_fill)
            filler = pool[start : start + n_fill]
            cut = int(depth * n_fill)
            tokens = intro + filler[:cut] + needle + filler[cut:] + question
            out.append(PasskeyTrial(depth, key, tokens))
    return out
