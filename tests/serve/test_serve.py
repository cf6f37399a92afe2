"""The HTTP collector over real loopback HTTP: auth, limits, validation, routing and load."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from cl_release.decide import abtest
from cl_release.errors import UserError
from cl_release.data.formats import max_example_chars
from cl_release.store.sqlite import FeedbackStore
from cl_release.project import Project
from cl_release.serve import load_spec, make_server

from helpers import fake_entry, fake_repo

from helpers import REPO

TOKEN = "s3cret-token"
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def server(tmp_path):
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0)],
                     champion="1.0.0",
                     yaml_extra="serve:\n  max_body_bytes: 4096\nlimits:\n  max_example_chars: 1000\n")
    srv = make_server(Project.load(root), host="127.0.0.1", port=0, token=TOKEN)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.root = root
    yield srv
    srv.shutdown()
    srv.server_close()


def call(srv, method: str, path: str, body=None, *, token: str | None = TOKEN, headers=None, raw: bytes | None = None,
         conn: http.client.HTTPConnection | None = None):
    c = conn or http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    h = {"Content-Type": "application/json"}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    payload = r.read()
    if conn is None:
        c.close()
    return r.status, (json.loads(payload) if payload else None), r


def test_log_feedback_route_stats_health(server):
    status, out, _ = call(server, "POST", "/log", {"input": "What is the IDLH of ammonia?", "output": "300 ppm",
                                                   "request_id": "r1", "model_version": "1.0.0", "latency_ms": 12.5})
    assert (status, out) == (201, {"request_id": "r1", "model_version": "1.0.0"})
    status, out, _ = call(server, "POST", "/feedback", {"request_id": "r1", "rating": 5, "thumbs": True})
    assert status == 201 and out["request_id"] == "r1"
    status, out, _ = call(server, "GET", "/route?key=user-42")
    assert status == 200 and out == {"key": "user-42", "version": "1.0.0", "arm": "champion"}
    status, out, _ = call(server, "POST", "/log", {"input": [{"role": "user", "content": "hi"}], "output": "hello",
                                                   "route_key": "user-42"})
    assert status == 201 and out["model_version"] == "1.0.0"
    status, out, _ = call(server, "GET", "/stats")
    assert status == 200 and out["records"] == 2 and out["feedback"] == 1
    assert call(server, "GET", "/health", token=None)[:2] == (200, {"status": "ok"})
    status, spec, _ = call(server, "GET", "/openapi.json", token=None)
    assert status == 200 and spec == load_spec() and set(spec["paths"]) >= {"/log", "/feedback", "/route", "/stats", "/health"}
    store = FeedbackStore(Project.load(server.root).feedback_path)
    row = store.get("r1")
    assert row["rating"] == 5 and row["thumbs"] == 1 and row["latency_ms"] == 12.5


def test_conflicting_request_id_and_out_of_range_numbers(server):
    body = {"input": "q", "output": "a", "request_id": "dup"}
    assert call(server, "POST", "/log", body)[0] == 201
    assert call(server, "POST", "/log", {**body, "latency_ms": 3})[0] == 201  # an identical retry
    status, out, _ = call(server, "POST", "/log", {**body, "output": "another answer"})
    assert status == 409 and "'dup' is already logged with another output" in out["error"]["message"]
    for field, value in (("tokens", 1e29), ("tokens", -1), ("quality_score", 5), ("latency_ms", -2)):
        status, out, _ = call(server, "POST", "/log", {"input": "q", "output": "a", field: value})
        assert status == 422 and field in out["error"]["message"], (field, out)
    limit = max_example_chars(Project.load(server.root).data)
    status, out, _ = call(server, "POST", "/log", {"input": "q", "output": "z" * (limit + 1)})
    assert limit == 1000 and status == 422 and "field 'output': example of 1,002 characters" in out["error"]["message"]
    status, out, _ = call(server, "POST", "/log", {"input": "q", "model_version": "9.9.9", "output": "a"})
    assert status == 422 and "'9.9.9' is not a version in the registry" in out["error"]["message"]
    store = FeedbackStore(Project.load(server.root).feedback_path)
    assert store.count() == 1 and store.get("dup")["output"] == "a"
    for thumbs, stored in (("up", 1), ("down", -1)):
        status, out, _ = call(server, "POST", "/feedback", {"request_id": "dup", "thumbs": thumbs})
        assert status == 201 and store.get("dup")["thumbs"] == stored
    assert call(server, "POST", "/feedback", {"request_id": "dup", "thumbs": "sideways"})[0] == 422


def test_route_follows_the_ab_test(server):
    abtest.start(server.root, "1.1.0", traffic=0.5, now=T0)
    arms = {call(server, "GET", f"/route?key=k{i}")[1]["arm"] for i in range(60)}
    assert arms == {"champion", "challenger"}
    first = call(server, "GET", "/route?key=k7")[1]
    assert all(call(server, "GET", "/route?key=k7")[1] == first for _ in range(5))


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_missing_or_wrong_token_is_refused(server, token):
    for method, path, body in (("POST", "/log", {"input": "q", "output": "a"}), ("GET", "/route?key=u", None),
                               ("GET", "/stats", None), ("POST", "/feedback", {"request_id": "x", "rating": 1})):
        status, out, r = call(server, method, path, body, token=token)
        assert status == 401 and "bearer token" in out["error"]["message"]
        assert r.getheader("WWW-Authenticate", "").startswith("Bearer")
    assert FeedbackStore(Project.load(server.root).feedback_path).count() == 0
    status, _, _ = call(server, "GET", "/stats", headers={"Authorization": f"Basic {TOKEN}"}, token=None)
    assert status == 401


def test_oversized_malformed_and_invalid_bodies(server):
    big = {"input": "x" * 5000, "output": "y"}
    status, out, r = call(server, "POST", "/log", big)
    assert status == 413 and "4096" in out["error"]["message"] and r.getheader("Connection") == "close"
    cases = [
        (b"{not json", {}, 400, "invalid JSON"),
        (b"[1, 2]", {}, 422, "JSON object"),
        (json.dumps({"input": "q"}).encode(), {}, 422, "missing field 'output'"),
        (json.dumps({"input": "q", "output": "a", "colour": "red"}).encode(), {}, 422, "unknown field 'colour'"),
        (json.dumps({"input": 5, "output": "a"}).encode(), {}, 422, "input"),
        (json.dumps({"input": "q", "output": "a", "latency_ms": "fast"}).encode(), {}, 422, "latency_ms"),
        (json.dumps({"input": "q", "output": "a"}).encode(), {"Content-Type": "text/plain"}, 415, "application/json"),
    ]
    for raw, headers, code, text in cases:
        status, out, _ = call(server, "POST", "/log", raw=raw, headers=headers)
        assert status == code and text in out["error"]["message"], (raw, out)
    status, out, _ = call(server, "POST", "/feedback", {"request_id": "nope", "rating": 3})
    assert status == 404 and "nope" in out["error"]["message"]
    call(server, "POST", "/log", {"input": "q", "output": "a", "request_id": "r"})
    for body, text in (({"request_id": "r", "rating": 9}, "rating"), ({"request_id": "r"}, "at least one"),
                       ({"rating": 3}, "request_id"), ({"request_id": "r", "severity": "meh"}, "severity")):
        status, out, _ = call(server, "POST", "/feedback", body)
        assert status == 422 and text in out["error"]["message"], (body, out)
    assert call(server, "GET", "/route")[0] == 400
    assert call(server, "GET", "/stats?since=yesterday")[0] == 422
    assert call(server, "GET", "/nowhere")[0] == 404
    status, _, r = call(server, "DELETE", "/log")
    assert status == 405 and r.getheader("Allow") == "POST"
    assert FeedbackStore(Project.load(server.root).feedback_path).count() == 1


def test_missing_content_length_is_refused(server):
    with socket.create_connection(server.server_address[:2], timeout=5) as s:
        s.sendall(b"POST /log HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Type: application/json\r\n\r\n")
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 411")
    with socket.create_connection(server.server_address[:2], timeout=5) as s:
        s.sendall(b"POST /log HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: lots\r\n\r\n{}")
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 400") and "Content-Length" in reply


def test_refuses_to_start_without_a_token(tmp_path, monkeypatch):
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0)])
    monkeypatch.delenv("CL_RELEASE_TOKEN", raising=False)
    with pytest.raises(UserError, match="CL_RELEASE_TOKEN"):
        make_server(Project.load(root), port=0)
    monkeypatch.setenv("CL_RELEASE_TOKEN", "from-env")
    srv = make_server(Project.load(root), host="127.0.0.1", port=0)
    try:
        assert srv.app.token == b"from-env"
    finally:
        srv.server_close()


def test_load_8_clients_no_lost_records(server):
    """8 concurrent keep-alive clients x 500 POST /log (many group commits): every record stored exactly once."""
    clients, per_client = 8, 500
    errors: list[str] = []

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        try:
            for i in range(per_client):
                status, _, _ = call(server, "POST", "/log",
                                    {"input": f"q{c}-{i}", "output": "a", "request_id": f"c{c}-{i}",
                                     "model_version": "1.0.0"}, conn=conn)
                if status != 201:
                    errors.append(f"{c}-{i}: {status}")
        finally:
            conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    assert not errors
    store = FeedbackStore(Project.load(server.root).feedback_path)
    assert store.count() == clients * per_client
    print(f"\n{clients * per_client} requests in {seconds:.1f} s: {clients * per_client / seconds:.0f} req/s")


# ---------------------------------------------------------------- the log: one line per disconnect, no secrets


def test_clients_that_disconnect_mid_body_cost_one_log_line_each(server, capsys):
    for _ in range(5):
        s = socket.create_connection(server.server_address[:2])
        s.sendall(b"POST /log HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"input\": ")
        time.sleep(0.05)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with a reset
        s.close()
    assert call(server, "GET", "/health", token=None)[0] == 200  # still serving
    deadline = time.time() + 5
    err = ""
    while time.time() < deadline and err.count("\n") < 5:
        time.sleep(0.05)
        err += capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 5, err
    assert all(line == "cl-release serve: client 127.0.0.1 disconnected during POST /log" for line in lines), err
    assert FeedbackStore(Project.load(server.root).feedback_path).count() == 0


def test_verbose_log_redacts_tokens_in_the_query_string(tmp_path, capsys):
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0)], champion="1.0.0")
    srv = make_server(Project.load(root), host="127.0.0.1", port=0, token=TOKEN, verbose=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        call(srv, "GET", f"/stats?since=2026-01-01&token={TOKEN}&access_token=abc123&api_key=k9")
        call(srv, "GET", f"/{TOKEN}")
        call(srv, "GET", "/health?auth=xyz789", token=None)
    finally:
        srv.shutdown()
        srv.server_close()
    err = capsys.readouterr().err
    assert "GET /stats?since=2026-01-01&token=[REDACTED]&access_token=[REDACTED]&api_key=[REDACTED] HTTP/1.1\" 400" in err
    assert "GET /[REDACTED] HTTP/1.1\" 404" in err and "auth=[REDACTED]" in err
    for secret in (TOKEN, "abc123", "k9 ", "xyz789"):
        assert secret not in err


# ---------------------------------------------------------------- the generated OpenAPI, and one rule per endpoint


def test_openapi_is_generated_from_the_models():
    from click.testing import CliRunner

    from cl_release.cli import main

    spec = load_spec()
    assert not (REPO / "cl_release" / "openapi.json").exists()
    assert set(spec["paths"]) == {"/log", "/feedback", "/route", "/stats", "/health", "/openapi.json",
                                  "/v1/chat/completions", "/v1/models"}
    schemas = spec["components"]["schemas"]
    log = schemas["LogRequest"]
    assert log["additionalProperties"] is False and set(log["required"]) == {"input", "output"}
    assert log["properties"]["quality_score"]["anyOf"][0] == {"type": "number", "maximum": 1.0, "minimum": 0.0}
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert chat["responses"]["502"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    assert spec["security"] == [{"bearer": []}] and spec["paths"]["/health"]["get"]["security"] == []
    assert "HTTPValidationError" not in schemas  # errors are described as this server sends them
    out = CliRunner().invoke(main, ["serve", "openapi"])
    assert out.exit_code == 0 and json.loads(out.output) == spec


def test_the_guards_fast_path_answers_as_fastapi_does(server):
    """POST endpoints run on the guard's path (Gateway.fast_paths); with it off, FastAPI's
    request machinery runs the same functions. Same status, same body, request by request."""
    cases = [
        ("/log", {"input": "q", "output": "a", "request_id": "same"}),
        ("/log", {"input": "q", "output": "a", "request_id": "same"}),
        ("/log", {"input": "q", "output": "b", "request_id": "same"}),
        ("/log", {"input": [{"role": "user", "content": "hi"}], "output": "a", "route_key": "u1", "request_id": "k"}),
        ("/log", {"input": "q", "output": "a", "colour": "red"}),
        ("/log", {"input": 5, "output": "a"}),
        ("/log", {"input": "q"}),
        ("/log", [1, 2]),
        ("/log", {"input": "q", "output": "a", "tokens": -1}),
        ("/log", {"input": "q", "output": "a", "model_version": "9.9.9"}),
        ("/log", {"input": [], "output": "a"}),
        ("/feedback", {"request_id": "same", "rating": 5, "thumbs": "up"}),
        ("/feedback", {"request_id": "nope", "rating": 5}),
        ("/feedback", {"request_id": "same"}),
        ("/feedback", {"request_id": "same", "severity": "meh"}),
        ("/feedback", {"request_id": "same", "thumbs": "sideways"}),
        ("/v1/chat/completions", {"model": "champion", "messages": []}),
        ("/v1/chat/completions", {"model": "champion", "messages": [{"role": "robot", "content": "x"}]}),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    ]
    gw = server.app
    answers = {}
    for fast in (True, False):
        gw.fast_paths = fast
        for i, (path, body) in enumerate(cases):
            status, out, _ = call(server, "POST", path, body)
            if path == "/feedback" and status == 201:
                out = {**out, "id": "n"}
            answers.setdefault(i, []).append((status, out))
    for i, (a, b) in answers.items():
        assert a == b, (cases[i], a, b)
    status, out, _ = call(server, "POST", "/log", raw=b"{oops")
    gw.fast_paths = True
    status2, out2, _ = call(server, "POST", "/log", raw=b"{oops")
    assert status == status2 == 400 and out["error"]["message"].startswith("invalid JSON")
    assert out2["error"]["message"].startswith("invalid JSON")


# ---------------------------------------------------------------- durability: group commit, workers, kill -9


def test_concurrent_writes_are_group_committed(server):
    clients, per_client = 8, 100
    gw = server.app

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        for i in range(per_client):
            assert call(server, "POST", "/log", {"input": f"q{c}-{i}", "output": "a"}, conn=conn)[0] == 201
        conn.close()

    before = gw.writer.batches
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gw.writer.writes >= clients * per_client
    assert gw.writer.batches - before < clients * per_client  # several requests shared a commit
    assert FeedbackStore(Project.load(server.root).feedback_path).count() == clients * per_client


def _serve_process(root: Path, *args: str):
    import os
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "from cl_release.cli import run; run()", "-C", str(root), "serve",
                             "--port", "0", "--backend", "none", *args],
                            env={**os.environ, "CL_RELEASE_TOKEN": TOKEN}, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = proc.stderr.readline()
    m = re.search(r"http://([\d.]+):(\d+)", line)
    assert m, line + proc.stderr.read()
    return proc, (m[1], int(m[2]))


class _Address:
    def __init__(self, address):
        self.server_address = address


def _hammer(address, prefix: str, clients: int, per_client: int, acked: list, stop: threading.Event | None = None):
    def client(c: int) -> None:
        try:
            conn = http.client.HTTPConnection(*address, timeout=30)
            for i in range(per_client):
                if stop is not None and stop.is_set():
                    return
                rid = f"{prefix}{c}-{i}"
                status, _, _ = call(_Address(address), "POST", "/log",
                                    {"input": f"q {rid}", "output": "a", "request_id": rid}, conn=conn)
                if status == 201:
                    acked.append(rid)
        except (OSError, http.client.HTTPException):
            return  # the server was killed

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    return threads


def test_workers_share_the_store_safely(tmp_path):
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0)], champion="1.0.0")
    proc, address = _serve_process(root, "--workers", "2")
    try:
        acked: list[str] = []
        for t in _hammer(address, "w", 8, 150, acked):
            t.join()
        assert len(acked) == 1200
        status, stats, _ = call(_Address(address), "GET", "/stats")
        assert status == 200 and stats["records"] == 1200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    store = FeedbackStore(Project.load(root).feedback_path)
    assert store.count() == 1200 and store.integrity_check() == "ok"


def test_kill_9_during_load_loses_no_acknowledged_record(tmp_path):
    import os
    import signal

    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0)], champion="1.0.0")
    proc, address = _serve_process(root)
    acked: list[str] = []
    stop = threading.Event()
    threads = _hammer(address, "k", 8, 100000, acked, stop)
    deadline = time.time() + 30
    while len(acked) < 800 and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-load: requests in flight, a batch maybe half-written
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    got = list(acked)
    assert len(got) >= 800
    store = FeedbackStore(Project.load(root).feedback_path)
    missing = store.missing(got)
    assert missing == [], f"{len(missing)} acknowledged records lost, e.g. {missing[:3]}"
    assert store.integrity_check() == "ok"
    proc, address = _serve_process(root)  # and it serves again on the same store
    try:
        assert call(_Address(address), "POST", "/log", {"input": "after", "output": "a", "request_id": "after"})[0] == 201
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert store.count() >= len(got) + 1
