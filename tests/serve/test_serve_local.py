"""The ``local`` backend: the tiny model with two versions' LoRA adapters (random, untrained) on
it, dynamic batching grouped by adapter, and the gateway on it over loopback HTTP."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import threading

import pytest

from cl_release.decide import abtest
from cl_release.files import sha256_file
from cl_release.project import Project
from cl_release.registry import Registry
from cl_release.serve import make_server
from cl_release.serve.backends import Generation
from cl_release.serve.backends.local import LocalBackend

from helpers import random_adapter
from helpers import fake_entry, fake_repo
from test_serve import TOKEN, call

pytest.importorskip("peft")
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
QUESTIONS = ["What is the IDLH of ammonia?", "Store chlorine at what temperature?", "Which gloves for benzene?",
             "What is the capital of Arvenia?", "hi", "What protects against phosgene? Answer briefly, please.",
             "Toluene exposure limit?", "What is the IDLH of arsine?"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("adapters")
    return {v: random_adapter(tiny_model_dir, out / v, seed=seed) for v, seed in (("1.1.0", 1), ("1.2.0", 2))}


@pytest.fixture
def repo(tmp_path, tiny_model_dir, adapters):
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0),
                                fake_entry("1.2.0", "1.1.0", T0)], champion="1.1.0",
                     yaml_extra="serve:\n  registry_recheck_s: 0\n  device: cpu\n  default_max_tokens: 6\n  torch_threads: 1\n")
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    with Registry(root).transaction() as data:
        for m in data["models"]:
            m["base_model"] = {"name": "models/tiny", "revision": None}
            if m["version"] in adapters:
                dst = root / "outputs" / f"v{m['version']}" / "adapter"
                shutil.copytree(adapters[m["version"]], dst)
                m["adapter"]["sha256"] = sha256_file(dst / "adapter_model.safetensors")
    return root


def entries(root):
    data = Registry(root).load()
    return {v: Registry.find(data, v) for v in ("1.1.0", "1.2.0")}


def run_all(backend: LocalBackend, gens: list[Generation]) -> list[dict]:
    async def go():
        await backend.start()
        try:
            return await asyncio.gather(*(backend.complete(g) for g in gens))
        finally:
            await backend.close()

    return asyncio.run(go())


def test_batched_answers_are_the_answers_one_at_a_time_and_each_version_has_its_own(repo):
    ents = entries(repo)
    gens = [Generation(request_id=f"r{i}", version=v, messages=[{"role": "user", "content": q}], max_tokens=6)
            for i, q in enumerate(QUESTIONS[:5]) for v in ("1.1.0", "1.2.0")]
    batched = LocalBackend(repo, served=lambda: ents, device="cpu", max_batch=8, batch_wait_ms=50, threads=1)
    single = LocalBackend(repo, served=lambda: ents, device="cpu", max_batch=1, batch_wait_ms=0, threads=1)
    a, b = run_all(batched, gens), run_all(single, gens)
    texts = [x["choices"][0]["message"]["content"] for x in a]
    assert texts == [x["choices"][0]["message"]["content"] for x in b]
    assert [x["usage"] for x in a] == [x["usage"] for x in b]
    assert max(batched.batches) > 1 and sum(batched.batches) == len(gens) and set(single.batches) == {1}
    per_version = {v: [t for t, g in zip(texts, gens) if g.version == v] for v in ("1.1.0", "1.2.0")}
    assert per_version["1.1.0"] != per_version["1.2.0"]  # the adapter of each version is applied
    assert all(x["choices"][0]["finish_reason"] in ("stop", "length") for x in a)
    assert all(x["usage"]["completion_tokens"] <= 6 and x["usage"]["prompt_tokens"] > 0 for x in a)


def test_stop_strings_max_tokens_and_unsupported_fields(repo):
    ents = entries(repo)
    backend = LocalBackend(repo, served=lambda: ents, device="cpu", threads=1)
    g = Generation(request_id="r", version="1.1.0", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=12)
    full = run_all(backend, [g])[0]["choices"][0]["message"]["content"]
    assert len(full) > 4
    stop = full[2:4]
    g2 = Generation(request_id="r2", version="1.1.0", messages=g.messages, max_tokens=12, stop=[stop])
    cut = run_all(LocalBackend(repo, served=lambda: ents, device="cpu"), [g2])[0]
    assert cut["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert backend.check({"tools": [{"type": "function"}]}) == "tools"
    assert backend.check({"presence_penalty": 0, "user": "u"}) is None


@pytest.fixture
def local_gateway(repo):
    srv = make_server(Project.load(repo), host="127.0.0.1", port=0, token=TOKEN, backend="local", warm=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.root = repo
    yield srv
    srv.shutdown()
    srv.server_close()


def test_the_gateway_on_the_local_backend(local_gateway):
    srv = local_gateway
    body = {"model": "champion", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 5,
            "temperature": 0}
    status, out, r = call(srv, "POST", "/v1/chat/completions", body)
    assert status == 200 and r.getheader("X-CL-Release-Version") == "1.1.0" and out["usage"]["completion_tokens"] <= 5
    import http.client

    c = http.client.HTTPConnection(*srv.server_address, timeout=30)
    c.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
              headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    r2 = c.getresponse()
    events = [e[6:] for e in r2.read().decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join((json.loads(e)["choices"] or [{}])[0].get("delta", {}).get("content") or "" for e in events[:-1])
    assert text == out["choices"][0]["message"]["content"]  # greedy: the same answer streamed
    status, out, _ = call(srv, "POST", "/v1/chat/completions", {**body, "tools": [{"type": "function"}]})
    assert status == 400 and out["error"]["message"] == "the local backend does not support 'tools'"
    store = srv.app.store
    rid = r2.getheader("X-Request-Id")
    row = store.get(rid)
    assert row["output"] == text and row["model_version"] == "1.1.0" and row["metadata"]["backend"] == "local"
    # a version that starts serving is loaded on its first request
    abtest.start(srv.root, "1.2.0", traffic=0.5, now=T0)
    status, out, r = call(srv, "POST", "/v1/chat/completions", {**body, "model": "challenger"})
    assert status == 200 and r.getheader("X-CL-Release-Version") == "1.2.0"


def test_the_loop_on_the_local_backend_200_keys(local_gateway):
    """The issue's loop on the embedded model: 200 keys at 10% challenger, sticky, all captured
    with their versions, feedback linked, ab compare counts them."""
    srv = local_gateway
    abtest.start(srv.root, "1.2.0", traffic=0.1, now=T0)
    name = Project.load(srv.root).name
    served, ids = {}, {}
    results: dict[int, tuple] = {}

    def client(k: int) -> None:
        for i in range(k, 200, 8):
            results[i] = call(srv, "POST", "/v1/chat/completions",
                              {"model": name, "user": f"user-{i}", "max_tokens": 3,
                               "messages": [{"role": "user", "content": QUESTIONS[i % 8]}]})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (status, out, r) in results.items():
        assert status == 200
        served[i], ids[i] = r.getheader("X-CL-Release-Version"), out["id"]
    share = sum(v == "1.2.0" for v in served.values()) / 200
    assert 0.05 <= share <= 0.20
    router = abtest.Router(srv.root)
    assert all(router.choose(f"user-{i}") == v for i, v in served.items())
    store = srv.app.store
    assert all(store.get(ids[i])["model_version"] == served[i] for i in served)
    for i in range(0, 200, 5):
        assert call(srv, "POST", "/feedback", {"request_id": ids[i], "thumbs": "up"})[0] == 201
    c = abtest.compare(Project.load(srv.root), now=T0 + dt.timedelta(days=400))
    assert c.metrics["1.1.0"]["records"] + c.metrics["1.2.0"]["records"] == 200
    assert c.metrics["1.1.0"]["opinions"] + c.metrics["1.2.0"]["opinions"] == 40
