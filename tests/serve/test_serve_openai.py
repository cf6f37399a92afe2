"""The OpenAI-compatible gateway over real loopback HTTP, with the ``openai`` backend in front of a
fake vLLM (tests/fakevllm.py): names, capture, streams, bad input, upstream faults, the loop."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import re
import socket
import threading
import time

import pytest

from cl_release.decide import abtest
from cl_release.store.sqlite import FeedbackStore
from cl_release.project import Project
from cl_release.serve import make_server

from fakevllm import FakeVLLM, Served
from helpers import fake_entry, fake_repo
from test_serve import TOKEN, call

from helpers import REPO

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
HI = [{"role": "user", "content": "hello there"}]


class Gateway:
    def __init__(self, srv, root, fake: FakeVLLM, upstream: Served):
        self.srv, self.root, self.fake, self.upstream = srv, root, fake, upstream
        self.server_address = srv.server_address

    @property
    def store(self) -> FeedbackStore:
        return FeedbackStore(Project.load(self.root).feedback_path)

    def chat(self, body: dict, *, headers=None, token=TOKEN):
        return call(self, "POST", "/v1/chat/completions", body, headers=headers, token=token)


def start_gateway(tmp_path, fake: FakeVLLM, *, serve_extra: str = "", champion: str = "1.1.0"):
    upstream = Served(fake).__enter__()
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0),
                                fake_entry("1.2.0", "1.1.0", T0)], champion=champion,
                     yaml_extra=f"serve:\n  backend: openai\n  upstream_url: {upstream.url}\n"
                                f"  registry_recheck_s: 0\n  max_body_bytes: 4096\n{serve_extra}")
    srv = make_server(Project.load(root), host="127.0.0.1", port=0, token=TOKEN)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return Gateway(srv, root, fake, upstream)


def stop_gateway(gw: Gateway) -> None:
    gw.srv.shutdown()
    gw.srv.server_close()
    gw.upstream.__exit__()


@pytest.fixture
def gw(tmp_path):
    g = start_gateway(tmp_path, FakeVLLM("org/base", {"v1.1.0": "/a/1.1.0", "v1.2.0": "/a/1.2.0"}))
    yield g
    stop_gateway(g)


def sse(raw: bytes) -> list:
    events = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream(gw: Gateway, body: dict, *, headers=None):
    c = http.client.HTTPConnection(*gw.server_address, timeout=10)
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}", **(headers or {})}
    c.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}), headers=h)
    r = c.getresponse()
    raw = r.read()
    c.close()
    return r, sse(raw) if r.status == 200 else json.loads(raw)


def test_completion_is_captured_with_its_request_id(gw):
    status, out, r = gw.chat({"model": "champion", "messages": HI, "max_tokens": 8})
    assert status == 200, out
    rid = out["id"]
    assert rid.startswith("chatcmpl-") and r.getheader("X-Request-Id") == rid
    assert r.getheader("X-CL-Release-Version") == "1.1.0" and r.getheader("X-CL-Release-Arm") == "champion"
    assert out["model"] == "1.1.0" and out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "v1.1.0 says: hello there"}
    assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    sent = gw.fake.requests[-1]
    assert sent["model"] == "v1.1.0" and sent["messages"] == HI and sent["max_tokens"] == 8
    row = gw.store.get(rid)  # committed before the answer was sent
    assert row["output"] == "v1.1.0 says: hello there" and row["input"] == HI
    assert row["model_version"] == "1.1.0" and row["tokens"] == 6 and row["latency_ms"] > 0
    meta = row["metadata"]
    assert meta["prompt_tokens"] == 2 and meta["completion_tokens"] == 4 and meta["arm"] == "champion"
    assert meta["finish_reason"] == "stop" and meta["stream"] is False and meta["route_key"] is None
    status, out, _ = call(gw, "POST", "/feedback", {"request_id": rid, "rating": 5})
    assert status == 201 and gw.store.get(rid)["rating"] == 5


def test_model_names_aliases_versions_and_the_router(gw):
    status, out, _ = gw.chat({"model": "challenger", "messages": HI})
    assert status == 404 and out["error"]["code"] == "model_not_found" and "no A/B test" in out["error"]["message"]
    abtest.start(gw.root, "1.2.0", traffic=0.5, now=T0)
    for name, version in (("challenger", "1.2.0"), ("1.2.0", "1.2.0"), ("v1.2.0", "1.2.0"), ("champion", "1.1.0")):
        status, out, r = gw.chat({"model": name, "messages": HI})
        assert status == 200 and r.getheader("X-CL-Release-Version") == version, (name, out)
        assert out["choices"][0]["message"]["content"].startswith(f"v{version} says")
    status, out, _ = gw.chat({"model": "1.0.0", "messages": HI})
    assert status == 404 and "1.0.0 is not served (served: 1.1.0, 1.2.0)" in out["error"]["message"]
    assert out["error"]["param"] == "model" and out["error"]["type"] == "invalid_request_error"
    status, out, _ = gw.chat({"model": "gpt-4o", "messages": HI})
    assert status == 404 and "unknown model 'gpt-4o'" in out["error"]["message"]
    # the project name: the router decides, sticky on `user` or the X-CL-Release-Key header
    name = Project.load(gw.root).name
    seen = {}
    for i in range(40):
        _, _, r = gw.chat({"model": name, "messages": HI, "user": f"u{i}"})
        seen[f"u{i}"] = r.getheader("X-CL-Release-Version")
    assert set(seen.values()) == {"1.1.0", "1.2.0"}
    router = abtest.Router(gw.root)
    assert all(v == router.choose(k) for k, v in seen.items())
    for k in ("u3", "u4", "u5"):
        _, _, r = gw.chat({"model": name, "messages": HI}, headers={"X-CL-Release-Key": k})
        assert r.getheader("X-CL-Release-Version") == seen[k]
    status, models, _ = call(gw, "GET", "/v1/models")
    ids = {m["id"]: m["version"] for m in models["data"]}
    assert ids == {name: None, "champion": "1.1.0", "challenger": "1.2.0", "1.1.0": "1.1.0", "1.2.0": "1.2.0"}
    rows = {r["id"]: r for r in gw.store.rows()}
    keyed = [r["metadata"]["route_key"] for r in rows.values()]
    assert {"u0", "u39", "u3"} <= set(keyed)


def test_streaming_sends_the_request_id_and_logs_when_the_stream_ends(gw):
    r, events = stream(gw, {"model": "champion", "messages": HI, "max_tokens": 3})
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    rid = r.getheader("X-Request-Id")
    assert events[-1] == "[DONE]" and all(e["id"] == rid and e["model"] == "1.1.0" for e in events[:-1])
    assert all("usage" not in e for e in events[:-1])  # not asked for
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == "v1.1.0 says: hello"
    row = gw.store.get(rid)
    assert row["output"] == text and row["tokens"] == 5 and row["metadata"]["stream"] is True
    assert row["metadata"]["finish_reason"] == "length"
    assert gw.fake.requests[-1]["stream_options"] == {"include_usage": True}  # asked upstream for the capture
    r, events = stream(gw, {"model": "champion", "messages": HI, "stream_options": {"include_usage": True}})
    assert events[-2]["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_bad_requests_get_openai_shaped_4xx_and_log_nothing(gw):
    cases = [
        ({"model": "champion", "messages": []}, 400, "messages must not be empty", "messages"),
        ({"model": "champion", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "messages[0].role"),
        ({"model": "champion"}, 400, "missing field 'messages'", "messages"),
        ({"model": "champion", "messages": HI, "n": 2}, 400, "n=2 is over this server's limit of 1", "n"),
        ({"model": "champion", "messages": HI, "max_tokens": 5000}, 400, "limit of 1024 (serve.max_tokens)", "max_tokens"),
        ({"model": "champion", "messages": HI, "max_completion_tokens": 2000}, 400, "max_completion_tokens=2000", "max_completion_tokens"),
        ({"model": "champion", "messages": HI, "temperature": 3}, 400, "temperature", "temperature"),
        ({"model": "champion", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
        ({"model": "", "messages": HI}, 400, "model", "model"),
    ]
    for body, code, text, param in cases:
        status, out, _ = gw.chat(body)
        err = out["error"]
        assert status == code and text in err["message"] and err["param"] == param, (body, out)
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    status, out, r = call(gw, "POST", "/v1/chat/completions", raw=b'{"model": "champion", "messages": [')
    assert status == 400 and "invalid JSON" in out["error"]["message"]
    status, out, r = call(gw, "POST", "/v1/chat/completions",
                          {"model": "champion", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert status == 413 and "4096" in out["error"]["message"] and r.getheader("Connection") == "close"
    status, out, r = gw.chat({"model": "champion", "messages": HI}, token="wrong")
    assert status == 401 and out["error"]["type"] == "authentication_error"
    assert r.getheader("WWW-Authenticate", "").startswith("Bearer")
    status, out, _ = call(gw, "GET", "/v1/nowhere")
    assert status == 404 and out["error"]["message"] == "no such endpoint /v1/nowhere"
    assert gw.store.count() == 0 and gw.fake.requests == []


def test_upstream_failures_are_502_or_504_and_never_logged_as_answers(tmp_path):
    gw = start_gateway(tmp_path, FakeVLLM("org/base", {"v1.1.0": "/a"}), serve_extra="  upstream_timeout_s: 0.5\n")
    try:
        for mode, code, text in (("error", 502, "the model server failed: 500 CUDA out of memory"),
                                 ("cut", 502, "closed the connection"),
                                 ("refuse", 400, "maximum context length")):
            gw.fake.mode = mode
            status, out, r = gw.chat({"model": "champion", "messages": HI})
            assert status == code and text in out["error"]["message"], (mode, out)
            assert r.getheader("X-Request-Id").startswith("chatcmpl-") and r.getheader("X-CL-Release-Version") == "1.1.0"
        gw.fake.mode, gw.fake.delay = "slow", 2.0
        status, out, _ = gw.chat({"model": "champion", "messages": HI})
        assert status == 504 and out["error"]["code"] == "upstream_timeout" and "0.5 s" in out["error"]["message"]
        r, out = stream(gw, {"model": "champion", "messages": HI})
        assert r.status == 504
        gw.fake.mode = "error"
        r, out = stream(gw, {"model": "champion", "messages": HI})
        assert r.status == 502 and out["error"]["type"] == "upstream_error"
        gw.fake.loras.clear()  # the adapter is not loaded upstream: the deployment's problem
        gw.fake.mode = "ok"
        status, out, _ = gw.chat({"model": "champion", "messages": HI})
        assert status == 502 and "does not serve this version's LoRA module" in out["error"]["message"]
        assert gw.store.count() == 0
        gw.fake.loras["v1.1.0"] = "/a"
        gw.fake.mode = "cut"  # mid-stream: the client is told, the partial answer is logged as aborted
        r, events = stream(gw, {"model": "champion", "messages": HI})
        assert r.status == 200 and "error" in events[-1] and "[DONE]" not in events
        rows = list(gw.store.rows())
        assert len(rows) == 1 and rows[0]["output"] == "v1.1.0 says:"
        meta = rows[0]["metadata"]
        assert meta["aborted"] is True and "cut the stream off" in meta["error"]
        gw.upstream.__exit__()  # upstream down
        status, out, _ = gw.chat({"model": "champion", "messages": HI})
        assert status == 502 and "unreachable" in out["error"]["message"]
        assert gw.store.count() == 1
    finally:
        gw.srv.shutdown()
        gw.srv.server_close()


def test_client_dropping_a_stream_is_logged_as_aborted_without_a_traceback(tmp_path, capsys):
    fake = FakeVLLM("org/base", {"v1.1.0": "/a"})
    fake.mode, fake.delay = "slow", 1.5  # 0.3 s a word
    gw = start_gateway(tmp_path, fake)
    try:
        s = socket.create_connection(gw.server_address, timeout=10)
        body = json.dumps({"model": "champion", "messages": HI, "stream": True}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"says:" not in got:  # the first words arrived
            got += s.recv(65536)
        rid = re.search(rb"x-request-id: (chatcmpl-\w+)", got, re.IGNORECASE).group(1).decode()
        s.close()
        deadline = time.time() + 10
        while time.time() < deadline and gw.store.get(rid) is None:
            time.sleep(0.05)
        row = gw.store.get(rid)
        assert row is not None and row["output"].startswith("v1.1.0") and row["output"] != "v1.1.0 says: hello there"
        assert row["metadata"]["aborted"] is True
        assert call(gw, "GET", "/health", token=None)[0] == 200
    finally:
        stop_gateway(gw)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert re.fullmatch(rf"cl-release serve: client 127\.0\.0\.1 disconnected during POST /v1/chat/completions: "
                        rf"stream {rid} aborted after \d+ chunks \(logged as aborted\)", lines[0]), err


def test_the_official_openai_client_works_unchanged(gw):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://{gw.server_address[0]}:{gw.server_address[1]}/v1", api_key=TOKEN,
                           max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="champion", messages=HI, max_tokens=8)
    answer = raw.parse()
    assert raw.headers["x-cl-release-version"] == "1.1.0" and raw.headers["x-request-id"] == answer.id
    assert answer.choices[0].message.content == "v1.1.0 says: hello there" and answer.usage.total_tokens == 6
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="champion", messages=HI, stream=True, user="alice") if c.choices]
    assert "".join(parts) == "v1.1.0 says: hello there"
    assert [m.id for m in client.models.list()][:2] == [Project.load(gw.root).name, "champion"]
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.chat.completions.create(model="nope", messages=HI)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).chat.completions.create(
            model="champion", messages=HI)
    assert call(gw, "POST", "/feedback", {"request_id": answer.id, "thumbs": "up"})[0] == 201
    assert gw.store.get(answer.id)["thumbs"] == 1


def test_the_loop_200_keys_at_10_percent(gw):
    """200 users through the project name at 10% challenger: a 5-20% share, sticky, every answer
    in the store with its version, feedback linked, and ab compare counts them."""
    abtest.start(gw.root, "1.2.0", traffic=0.1, now=T0)
    name = Project.load(gw.root).name
    served, ids = {}, {}
    for i in range(200):
        status, out, r = gw.chat({"model": name, "messages": [{"role": "user", "content": f"q{i}"}], "user": f"user-{i}"})
        assert status == 200
        served[f"user-{i}"] = r.getheader("X-CL-Release-Version")
        ids[f"user-{i}"] = out["id"]
    share = sum(v == "1.2.0" for v in served.values()) / 200
    assert 0.05 <= share <= 0.20, share
    for i in range(0, 200, 10):  # the same key gets the same version every time
        _, _, r = gw.chat({"model": name, "messages": HI, "user": f"user-{i}"})
        assert r.getheader("X-CL-Release-Version") == served[f"user-{i}"]
    store = gw.store
    for key, rid in ids.items():
        row = store.get(rid)
        assert row is not None and row["model_version"] == served[key]
    for i in range(0, 200, 4):
        assert call(gw, "POST", "/feedback", {"request_id": ids[f"user-{i}"], "rating": 4})[0] == 201
    assert store.stats()["feedback"] == 50
    c = abtest.compare(Project.load(gw.root), now=T0 + dt.timedelta(days=400))
    counts = {v: sum(x == v for x in served.values()) for v in ("1.1.0", "1.2.0")}
    assert c.metrics["1.1.0"]["records"] >= counts["1.1.0"] and c.metrics["1.2.0"]["records"] >= counts["1.2.0"]
    assert c.metrics["1.1.0"]["opinions"] + c.metrics["1.2.0"]["opinions"] == 50


def test_the_scripts_drive_a_gateway(gw):
    """scripts/demo_traffic.py (the demo's users) and scripts/openai_client.py (the README's example)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    scripts = REPO / "scripts"
    url = f"http://{gw.server_address[0]}:{gw.server_address[1]}"
    env = {**os.environ, "CL_RELEASE_TOKEN": TOKEN}
    abtest.start(gw.root, "1.2.0", traffic=0.5, now=T0)
    out = subprocess.run([sys.executable, str(scripts / "demo_traffic.py"), "--url", url, "--requests", "30",
                          "--clients", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"30 answers from '{Project.load(gw.root).name}'") and "1.2.0:" in out.stdout
    assert gw.store.count() == 30 and gw.store.stats()["feedback"] == 10
    pytest.importorskip("openai")
    out = subprocess.run([sys.executable, str(scripts / "openai_client.py"), "--url", url, "--model", "challenger"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1.2.0 answered (chatcmpl-" in out.stdout and "feedback: {'id':" in out.stdout
