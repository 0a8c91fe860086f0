"""The ``tacflow`` command: ``tacflow ab`` (stock attention against
tacflowd's policies on your prompts; :mod:`tacflow.ab`)."""

from __future__ import annotations

import argparse
import sys


def _ab(args: argparse.Namespace) -> int:
    from . import ab, prompts

    policies = ab.policies_or_default(args.policy)
    if args.prompts:
        plist = prompts.load(args.prompts)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        plist = prompts.built_in(tok, args.max_prompt_tokens, args.count)
    if args.limit:
        plist = plist[: args.limit]
    results = ab.run(
        args.model, plist, policies, new_tokens=args.new_tokens, through=args.through,
        address=args.address, progress=not args.quiet, dtype=args.dtype,
    )
    meta = {
        "model": args.model,
        "stock": "attn_implementation=sdpa",
        "through": "the daemon's whole model" if args.through == "daemon" else "tacflow.hf attention offload",
        "new_tokens": args.new_tokens,
        "policies": [ab.policy_label(p) for p in policies],
        "prompts": args.prompts or "built-in (licence texts with passkeys)",
    }
    where = ab.write(results, args.out, meta)
    sys.stdout.write(ab.markdown(results, meta))
    print(f"\nwrote {where['markdown']}, {where['json']}" + (f", {where['png']}" if where["png"] else ""))
    if where["png_missing"]:
        print(where["png_missing"], file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tacflow", description="tacflow tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ab", help="A/B stock attention against tacflowd's policies on your prompts")
    p.add_argument("--model", required=True, help="a Hugging Face model folder (config.json, weights, tokenizer)")
    p.add_argument("--prompts", help="JSON Lines of {\"prompt\": ..., \"answer\"?: ...}; built-in texts when absent")
    p.add_argument("--policy", action="append", default=[],
                   help="full, tactic:P, fixed:TOKENS or oracle:P; repeat for several "
                        "(default: full, tactic:0.9, fixed:2048)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="length of the built-in prompts")
    p.add_argument("--count", type=int, default=4, help="how many built-in prompts (at most 4)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    p.add_argument("--address", help="a running tacflowd (default: start one with --attention-only)")
    p.add_argument("--through", choices=("hf", "daemon"), default="hf",
                   help="hf: the model in transformers, its attention in tacflowd; daemon: a tacflowd "
                        "at --address that loaded the whole model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default="tacflow-ab", help="folder for ab.md, ab.json, ab.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.cmd == "ab":
        if args.through == "daemon" and not args.address:
            ap.error("--through daemon needs --address of a tacflowd serving the model")
        return _ab(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
