"""Faults are part of the contract: bad input gets OpenAI's error body with the right status (never a 500),
a client that leaves frees its KV blocks at once, a full queue is a 429, SIGTERM drains."""
from __future__ import annotations

import json
import signal
import threading
import time

import openai
import psutil
import pytest

from live_server import API_KEY, NAME, Server, httpx

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


def _is_error(r, status: int, param: str | None = "?") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in r.text
    if param != "?":
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize("payload, status, param", [
    ('{"prompt": "hi", "max_tokens": 4', 400, None),                       # malformed JSON
    ('[1, 2, 3]', 422, None),                                              # not an object
    ('{"prompt": "hi", "max_tokens": "4"}', 422, "max_tokens"),            # wrong types
    ('{"prompt": "hi", "temperature": "hot"}', 422, "temperature"),
    ('{"prompt": 17}', 422, "prompt"),
    ('{"max_tokens": 4}', 422, "prompt"),                                  # missing
    ('{"prompt": "hi", "n": 0}', 422, "n"),                                # out of range
    ('{"prompt": "hi", "n": 1000}', 422, "n"),
    ('{"prompt": "hi", "logprobs": 21}', 422, "logprobs"),
    ('{"prompt": "hi", "top_p": 0}', 422, "top_p"),
    ('{"prompt": "hi", "max_tokens": 0}', 422, "max_tokens"),
    ('{"prompt": "hi", "max_tokens": 600}', 400, "max_tokens"),            # beyond the 512 context
    ('{"prompt": [1, 2, 49152]}', 400, "prompt"),                          # token id outside the vocabulary
    ('{"prompt": "hi", "presence_penalty": 1.5}', 400, "presence_penalty"),  # known, not implemented
    ('{"prompt": "hi", "model": "gpt-4o"}', 404, "model"),                 # unknown model
])
def test_completions_bad_input(http, payload, status, param):
    _is_error(http.post("/v1/completions", content=payload, headers={"Content-Type": "application/json"}),
              status, param)


@pytest.mark.parametrize("payload, status, param", [
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99}, 422, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
])
def test_chat_bad_input(http, payload, status, param):
    _is_error(http.post("/v1/chat/completions", json=payload), status, param)


def test_prompt_longer_than_context(http, client):
    e = _is_error(http.post("/v1/completions", json={"prompt": "hello " * 600}), 400, "prompt")
    assert e["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello " * 600}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)


def test_body_over_the_limit_is_413(server, http):
    big = json.dumps({"prompt": "a" * 200_000})
    _is_error(http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413)

    def chunks():                     # no Content-Length: the limit is counted as the body arrives
        for i in range(0, len(big), 10_000):
            yield big[i:i + 10_000].encode()
    _is_error(http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}), 413)


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        e = _is_error(httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers=headers), 401)
        assert e["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200      # probes need no key


def test_unknown_route_and_method(http):
    _is_error(http.get("/v1/embeddings"), 404)
    _is_error(http.get("/v1/completions"), 405)


def test_binds_loopback_by_default(server):
    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening


def _settled(server, before: dict) -> dict:
    m = server.wait_idle()
    assert m["lowbit_kv_blocks_free"] == m["lowbit_kv_blocks_total"], m       # nothing leaked
    assert m["lowbit_kv_invariant_checks"] > before["lowbit_kv_invariant_checks"]  # a check ran
    assert m["lowbit_kv_invariant_failures"] == 0, server.log()
    return m


def test_disconnect_mid_stream_frees_blocks(server, http):
    before = server.wait_idle()
    with http.stream("POST", "/v1/completions", json={"prompt": "Tell me a story.", "stream": True, **LONG}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got == 3:
                break
        assert server.metrics()["lowbit_kv_blocks_used"] > 0                   # it holds blocks now
    m = _settled(server, before)                                                # the client is gone
    made = m["lowbit_generation_tokens_total"] - before["lowbit_generation_tokens_total"]
    assert 3 <= made < 200, made                                                # aborted, not run to 400


def test_disconnect_while_waiting_for_a_non_streamed_reply(server):
    before = server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "Tell me a story.", **LONG},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=1.5)
    m = _settled(server, before)
    made = m["lowbit_generation_tokens_total"] - before["lowbit_generation_tokens_total"]
    assert made < 200, made


def test_server_alive_after_the_faults(client):
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 or r.choices[0].finish_reason == "stop"


def test_queue_full_429_and_sigterm_drains():
    """One seat, one waiting place: a third request gets 429. SIGTERM: the two running finish in full,
    new requests and /health get 503, the process exits 0."""
    s = Server("--max-model-len", "256", "--max-num-seqs", "1", "--max-waiting", "1", "--drain-timeout", "60")
    results = {}
    body = {"prompt": "Count: 1, 2, 3,", "stream": True, "max_tokens": 120, "ignore_eos": True, "temperature": 0}

    def run(name, started):
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            results[name] = [r.status_code, 0, False]
            started.set()
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    results[name][2] = True
                elif line.startswith("data: "):
                    results[name][1] += len(json.loads(line[6:])["choices"][0]["text"]) > 0
    try:
        threads = []
        for name, state in (("a", (1, 0)), ("b", (1, 1))):      # a takes the seat, then b the waiting place
            started = threading.Event()
            threads.append(threading.Thread(target=run, args=(name, started)))
            threads[-1].start()
            assert started.wait(60) and results[name][0] == 200, results
            deadline = time.monotonic() + 30
            while (m := s.metrics())["lowbit_num_requests_running"] != state[0] or \
                    m["lowbit_num_requests_waiting"] != state[1]:
                assert time.monotonic() < deadline, m
                time.sleep(0.02)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert _is_error(r, 429)["type"] == "rate_limit_error"
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _is_error(httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30), 503)
        for t in threads:
            t.join(120)
        assert s.proc.wait(timeout=60) == 0, s.log()
        assert results["a"][0] == results["b"][0] == 200
        assert results["a"][2] and results["b"][2], results          # both streams ran to [DONE]
        assert results["a"][1] >= 100 and results["b"][1] >= 100, results
    finally:
        s.stop()


def test_engine_process_death_is_reported_not_hung():
    """If the engine process dies, the stream in flight ends with an error event, /health says 503 and new
    requests get 503: no client waits forever."""
    s = Server("--max-model-len", "256", "--max-num-seqs", "2")
    try:
        engine = psutil.Process(s.proc.pid).children()
        engine = [p for p in engine if "spawn_main" in " ".join(p.cmdline())]
        assert len(engine) == 1
        body = {"prompt": "Count: 1, 2, 3,", "stream": True, "max_tokens": 200, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            engine[0].kill()
            rest = [line for line in lines if line.startswith("data: ")]
        assert "error" in json.loads(rest[-1][6:]), rest[-3:]
        assert httpx.get(s.url + "/health", timeout=10).status_code == 503
        _is_error(httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}, timeout=10), 503)
    finally:
        s.stop()
