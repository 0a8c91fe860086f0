"""The built-in prompt set of ``tacflow ab``, and prompt files.

Built in: long real texts (licences, ``texts/``), each cut to a token
budget, with a passkey sentence hidden at a chosen depth and a question
about it at the end, so that an A/B shows both what attention changes in
the next-token distributions and whether a sparse policy still finds a
needle far back in the context.

A prompt file is JSON Lines, one object a line: ``{"prompt": str}`` with
optional ``"id"`` and ``"answer"`` (a string the continuation should
contain).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any

TEXTS = pathlib.Path(__file__).resolve().parent / "texts"
BUILT_IN = ("gpl-3", "apache-2.0", "mpl-2.0", "lgpl-2.1")
#: Where in the text each built-in prompt hides its passkey (a fraction).
DEPTHS = (0.1, 0.35, 0.6, 0.85)
#: Seeded passkeys, so that runs are comparable.
PASSKEYS = (58213, 90427, 31876, 74650)


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    #: What a correct continuation contains (a passkey), if known.
    answer: str | None = None


def _cut(text: str, tokenizer: Any, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:max_tokens]) if len(ids) > max_tokens else text


def built_in(tokenizer: Any, max_tokens: int = 2048, count: int = len(BUILT_IN)) -> list[Prompt]:
    """``count`` prompts of about ``max_tokens`` tokens each."""
    out = []
    for i, name in enumerate(BUILT_IN[:count]):
        key = PASSKEYS[i]
        needle = f"\n\nThe passkey is {key}. Remember it: the passkey is {key}.\n\n"
        question = "\n\nQuestion: what is the passkey mentioned in the text above?\nAnswer: The passkey is"
        budget = max(32, max_tokens - len(tokenizer(needle + question)["input_ids"]) - 2)
        body = _cut((TEXTS / f"{name}.txt").read_text(), tokenizer, budget)
        at = int(len(body) * DEPTHS[i % len(DEPTHS)])
        at = body.rfind("\n", 0, at) + 1 or at
        out.append(Prompt(f"{name}-passkey", body[:at] + needle + body[at:] + question, str(key)))
    return out


def load(path: str | pathlib.Path) -> list[Prompt]:
    """Prompts of a JSON Lines file."""
    out = []
    for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj["prompt"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected {{\"prompt\": ...}}: {e}") from None
        out.append(Prompt(str(obj.get("id", n)), text, obj.get("answer")))
    return out
