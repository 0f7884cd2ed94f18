"""`minillm serve` through the official openai client: completions and chat (plain and streamed)
equal llm.generate / llm.chat on the same tiny checkpoint, concurrent requests equal their
one-by-one results, every bad request gets OpenAI's error shape and status, a client that leaves
mid-stream frees its request, and the CLI serves, then stops cleanly on SIGTERM."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from conftest import _llama

openai = pytest.importorskip("openai", reason="the server tests need the test extra (openai)")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import minillm  # noqa: E402
from minillm.engine import EngineSettings  # noqa: E402
from minillm.server import Server, create_app  # noqa: E402

NAME, BLOCK, MAX_PENDING = "tiny", 4, 16
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def fibonacci(n):"}]
PROMPTS = ["def fibonacci(n):", "class Stack:", "import os, sys\nfor i in range(10):", "The quick brown fox"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny Llama with a ChatML template and <|im_end|> as end of turn (SmolLM2's shape)."""
    from templates import CHATML
    from test_chat import VOCAB, build_chat_tokenizer
    from transformers import AutoModelForCausalLM
    d = tmp_path_factory.mktemp("serve") / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_llama(vocab_size=VOCAB)).save_pretrained(d)
    build_chat_tokenizer(d, bos_post_processor=False)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return d


@pytest.fixture(scope="module")
def llm(ckpt):
    """The reference: the same checkpoint, loaded apart from the server's."""
    return minillm.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def srv(ckpt):
    """The server in this process, on 127.0.0.1 and a free port, in a thread."""
    server = Server(minillm.load(ckpt, device="cpu"), NAME, EngineSettings(block_size=BLOCK, max_running=8),
                    max_pending=MAX_PENDING)
    us = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=us.run, daemon=True)
    t.start()
    for _ in range(600):
        if us.started:
            break
        time.sleep(0.05)
    port = us.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, server=server, engine=server.bridge.engine,
                          client=openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60))
    us.should_exit = True
    t.join(timeout=30)


def metrics(srv) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}


def idle(srv, timeout=60) -> dict[str, float]:
    """/metrics once nothing runs or waits (polled: the engine finishes on its own thread)."""
    end = time.monotonic() + timeout
    while True:
        m = metrics(srv)
        if m["minillm_requests_running"] == m["minillm_requests_waiting"] == 0 and not srv.server.bridge.pending:
            return m
        assert time.monotonic() < end, m
        time.sleep(0.05)


def test_completions_equal_generate(srv, llm):
    c = srv.client
    for p in PROMPTS[:2]:
        want = llm.generate(p, max_new_tokens=12, temperature=0)
        r = c.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0)
        assert r.choices[0].text == want.text and r.object == "text_completion" and r.model == NAME
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(llm.encode(p)), len(want.token_ids))
    wants = llm.generate(PROMPTS, max_new_tokens=8, temperature=0)
    r = c.completions.create(model=NAME, prompt=PROMPTS, max_tokens=8, temperature=0)     # a list of prompts
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == [w.text for w in wants]
    ids = llm.encode(PROMPTS[2])
    r = c.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)         # token ids
    assert r.choices[0].text == wants[2].text
    r = c.completions.create(model=NAME, prompt=[ids, llm.encode(PROMPTS[3])], max_tokens=8, temperature=0)
    assert [ch.text for ch in r.choices] == [wants[2].text, wants[3].text]
    # streamed: the pieces add up to the same text, the last chunk carries the usage
    chunks = list(c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    want = llm.generate(PROMPTS[0], max_new_tokens=12, temperature=0)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_equals_llm_chat(srv, llm):
    c = srv.client
    want = llm.chat(MESSAGES, max_new_tokens=16, temperature=0)
    finish = {"eos": "stop", "stop": "stop", "length": "length"}[want.finish_reason]
    r = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish and r.object == "chat.completion"
    prompt = llm.apply_chat_template(MESSAGES, tokenize=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(want.token_ids))
    r = c.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=16, temperature=0)
    assert r.choices[0].message.content == want.text
    chunks = list(c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == finish and chunks[-1].object == "chat.completion.chunk"
    # text parts are joined as the template joins them
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "def fibonacci(n):"}]}]
    r = c.chat.completions.create(model=NAME, messages=parts, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want.text


def test_sampling_settings_and_stop_reach_the_engine(srv, llm):
    c, p = srv.client, PROMPTS[1]
    kw = dict(temperature=0.9, top_p=0.9, seed=7)
    want = llm.generate(p, max_new_tokens=12, top_k=20, min_p=0.01, repetition_penalty=1.3, **kw)
    r = c.completions.create(model=NAME, prompt=p, max_tokens=12, **kw,
                             extra_body=dict(top_k=20, min_p=0.01, repetition_penalty=1.3))
    assert r.choices[0].text == want.text
    other = c.completions.create(model=NAME, prompt=p, max_tokens=12, **{**kw, "seed": 8},
                                 extra_body=dict(top_k=20, min_p=0.01, repetition_penalty=1.3))
    assert other.choices[0].text == llm.generate(p, max_new_tokens=12, top_k=20, min_p=0.01, repetition_penalty=1.3,
                                                 **{**kw, "seed": 8}).text
    # a stop string cut from the greedy text: the text ends before it, finish_reason "stop"
    greedy = llm.generate(p, max_new_tokens=24, temperature=0).text
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    assert stop.strip()
    want = llm.generate(p, max_new_tokens=24, temperature=0, stop=stop)
    assert want.finish_reason == "stop"
    for stream in (False, True):
        r = c.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0, stop=[stop], stream=stream)
        chunks = list(r) if stream else [r]
        assert "".join(ch.choices[0].text for ch in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_share_the_prompts_blocks(srv, llm):
    prompt = torch.randint(3, 300, (23,), generator=torch.Generator().manual_seed(5)).tolist()  # new to the cache
    before = metrics(srv)["minillm_prefix_cache_hit_tokens_total"]
    r = srv.client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, n=3)
    want = llm.generate(prompt, max_new_tokens=6, temperature=0).text
    assert [ch.index for ch in r.choices] == [0, 1, 2] and all(ch.text == want for ch in r.choices)
    assert r.usage.prompt_tokens == 23 and r.usage.completion_tokens == 18
    hits = idle(srv)["minillm_prefix_cache_hit_tokens_total"] - before
    assert hits == 2 * ((23 - 1) // BLOCK) * BLOCK     # the two siblings found every full block
    # sampled with a seed: choices differ from one another (seed, seed + 1, ...) and repeat exactly
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=1.0, seed=3, n=2)
    a, b = srv.client.completions.create(**kw), srv.client.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert a.choices[0].text == llm.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=3).text
    assert a.choices[1].text == llm.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=4).text


def test_logprobs(srv, llm):
    """The model's own log-probabilities (llm.logits), tokens named by their bytes as OpenAI does."""
    p = "Naïve café — 日本語"      # multi-byte characters split across byte-level tokens
    r = srv.client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0, logprobs=3)
    want = llm.generate(p, max_new_tokens=8, temperature=0)
    lp, ids = r.choices[0].logprobs, llm.encode(p)
    ref = llm.logits(ids + want.token_ids)[0, len(ids) - 1:-1].log_softmax(-1)   # (8, V)
    assert lp.token_logprobs == pytest.approx(ref.max(-1).values.tolist(), abs=1e-4)   # greedy: the top one
    for top, row in zip(lp.top_logprobs, ref):
        assert list(top.values()) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)   # 3 distinct names
    as_bytes = lambda t: bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()  # noqa
    if not set(want.token_ids) & set(llm.tokenizer.special_tokens().values()):
        assert b"".join(map(as_bytes, lp.tokens)).decode(errors="replace") == want.text
    r = srv.client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5) for e in content)
    text = b"".join(bytes(e.bytes) for e in content).decode(errors="replace")
    assert text.startswith(r.choices[0].message.content)     # (an end-of-turn token's bytes may follow)


def test_concurrent_requests_equal_one_by_one(srv, llm):
    g = torch.Generator().manual_seed(1)
    jobs = [(torch.randint(3, 300, (int(n),), generator=g).tolist(), int(k))
            for n, k in zip(torch.randint(1, 120, (12,), generator=g), torch.randint(1, 20, (12,), generator=g))]
    want = [llm.generate(p, max_new_tokens=k, temperature=0).text for p, k in jobs]

    def one(job):
        (p, k), stream = job, len(job[0]) % 2 == 0
        r = srv.client.completions.create(model=NAME, prompt=p, max_tokens=k, temperature=0, stream=stream)
        return "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs, timeout=120))
    assert got == want
    m = idle(srv)
    assert m["minillm_kv_blocks_used"] == 0 and m["minillm_kv_blocks_free"] == m["minillm_kv_blocks_total"]
    assert m["minillm_time_to_first_token_seconds_count"] >= len(jobs)


ERRORS = [  # (body, status, param)
    ("{", 400, None),
    ("[1, 2]", 400, None),
    ({}, 400, "model"),
    ({"model": NAME}, 400, "prompt"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": NAME, "prompt": 5}, 400, "prompt"),
    ({"model": NAME, "prompt": []}, 400, "prompt"),
    ({"model": NAME, "prompt": [1, "a"]}, 400, "prompt"),
    ({"model": NAME, "prompt": [[1], []]}, 400, "prompt"),      # an empty prompt: the engine says so
    ({"model": NAME, "prompt": [10 ** 6]}, 400, "prompt"),
    ({"model": NAME, "prompt": [5] * 300}, 400, "prompt"),      # longer than the context (256)
    ({"model": NAME, "prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": NAME, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": NAME, "prompt": "x", "min_p": 2}, 400, "min_p"),
    ({"model": NAME, "prompt": "x", "top_k": -1}, 400, "top_k"),
    ({"model": NAME, "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": NAME, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": NAME, "prompt": "x", "n": MAX_PENDING + 1}, 400, "n"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": NAME, "prompt": "x", "stop": ""}, 400, "stop"),
    ({"model": NAME, "prompt": "x", "stop": [1]}, 400, "stop"),
    ({"model": NAME, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": NAME, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": NAME, "prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"model": NAME, "prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"model": NAME, "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": NAME, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"model": NAME, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": NAME, "prompt": "x", "mirostat": 2}, 400, "mirostat"),
    ({"model": NAME, "prompt": "x", "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage"),
]
CHAT_ERRORS = [
    ({"model": NAME}, 400, "messages"),
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": "hi"}, 400, "messages"),
    ({"model": NAME, "messages": [{"content": "hi"}]}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages"),
    ({"model": NAME, "messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"model": NAME, "messages": MESSAGES, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": NAME, "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": NAME, "messages": MESSAGES, "logprobs": 1}, 400, "logprobs"),
    ({"model": NAME, "messages": MESSAGES, "max_completion_tokens": 10 ** 4}, 400, "max_tokens"),
    ({"model": "nope", "messages": MESSAGES}, 404, "model"),
]


def check_error(r, status, param="any"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "any":
        assert err["param"] == param, err


@pytest.mark.parametrize("path,body,status,param", [("/v1/completions", *e) for e in ERRORS] +
                         [("/v1/chat/completions", *e) for e in CHAT_ERRORS])
def test_bad_requests(srv, path, body, status, param):
    r = httpx.post(srv.url + path, content=body if isinstance(body, str) else json.dumps(body), timeout=30)
    check_error(r, status, param)


def test_routes_keys_and_health(srv, monkeypatch):
    check_error(httpx.get(srv.url + "/v1/nothing"), 404)
    check_error(httpx.get(srv.url + "/v1/completions"), 405)
    check_error(httpx.get(srv.url + "/v1/models/other"), 404, "model")
    assert [m.id for m in srv.client.models.list()] == [NAME]
    assert srv.client.models.retrieve(NAME).id == NAME
    monkeypatch.setattr(srv.server, "api_key", "sekret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        check_error(httpx.get(srv.url + "/v1/models", headers=headers), 401)
        check_error(httpx.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": "x"}, headers=headers), 401)
        check_error(httpx.post(srv.url + "/v1/chat/completions", content="{", headers=headers), 401)   # before 400
    with pytest.raises(openai.AuthenticationError):
        srv.client.completions.create(model=NAME, prompt="x", max_tokens=2)
    keyed = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
    assert keyed.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}     # /health and /metrics stay open
    assert httpx.get(srv.url + "/metrics").status_code == 200


def test_overload_is_503_not_an_unbounded_queue(srv, llm):
    body = dict(model=NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    pool = ThreadPoolExecutor(1)
    srv.engine.lock.acquire()     # the engine cannot step: requests stay in flight
    try:
        held = pool.submit(httpx.post, srv.url + "/v1/completions", json={**body, "n": MAX_PENDING}, timeout=60)
        end = time.monotonic() + 30
        while len(srv.server.bridge.pending) < MAX_PENDING:
            assert time.monotonic() < end and not held.done()
            time.sleep(0.02)
        check_error(httpx.post(srv.url + "/v1/completions", json=body), 503)
    finally:
        srv.engine.lock.release()
    r = held.result(timeout=60)
    pool.shutdown()
    want = llm.generate(PROMPTS[0], max_new_tokens=4, temperature=0).text
    assert r.status_code == 200 and [c["text"] for c in r.json()["choices"]] == [want] * MAX_PENDING
    assert metrics(srv)["minillm_requests_rejected_total"] >= 1
    assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 200


def test_disconnect_mid_stream_frees_the_request(srv, monkeypatch):
    step = srv.engine.step

    def slow_step():          # slow enough that the client leaves long before 200 tokens
        time.sleep(0.02)
        return step()
    monkeypatch.setattr(srv.engine, "step", slow_step)
    before = metrics(srv)
    body = dict(model=NAME, prompt="import os", max_tokens=200, temperature=0, stream=True)
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]      # two chunks and the blank lines after them
        assert got[0].startswith("data: {") and got[2].startswith("data: {")
    m = idle(srv)
    assert m["minillm_requests_aborted_total"] == before["minillm_requests_aborted_total"] + 1
    assert m["minillm_generation_tokens_total"] - before["minillm_generation_tokens_total"] < 200
    assert m["minillm_kv_blocks_used"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_and_sigterm(ckpt, llm):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minillm.cli", "serve", "-m", str(ckpt), "--port", str(port),
                             "--api-key", "k", "--kv-blocks", "64", "--block-size", "8", "--max-running", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, end = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = client.completions.create(model=str(ckpt), prompt=PROMPTS[3], max_tokens=8, temperature=0)
        assert r.choices[0].text == llm.generate(PROMPTS[3], max_new_tokens=8, temperature=0).text
        assert "minillm_kv_blocks_total 64" in httpx.get(url + "/metrics").text
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        # uvicorn shuts down gracefully, then re-raises the signal so the parent sees it
        assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in err, err
        assert "Traceback" not in err and "Error" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_errors(ckpt):
    from conftest import run_cli
    r = run_cli("serve", "-m", str(ckpt), "--kv-memory", "1GiB", "--kv-blocks", "4")
    assert r.returncode == 2 and r.stderr.startswith("minillm: error:") and "--kv-blocks" in r.stderr
    assert "Traceback" not in r.stderr
    # without the server's packages: a one-line install hint
    code = "import sys; sys.modules['uvicorn'] = None; from minillm.cli import main; sys.argv[0] = 'minillm'; main()"
    r = subprocess.run([sys.executable, "-c", code, "serve"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pip install" in r.stderr and '.[serve]' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
