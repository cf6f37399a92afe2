"""vLLM as the upstream: the ``vllm serve`` line, and A/B moves that load and unload adapters on a
fake vLLM (``serve.upstream_admin``), so a promotion changes what serves with no restart."""

from __future__ import annotations

import datetime as dt
import json
import shlex

import pytest
from click.testing import CliRunner

from cl_release.decide import abtest
from cl_release.cli import main
from cl_release.errors import UpstreamError
from cl_release.project import Project
from cl_release.registry import Registry
from cl_release.serve.vllm import AdapterAdmin, format_command, vllm_command

from fakevllm import FakeVLLM
from helpers import fake_entry, fake_repo, registry_at_head
from test_serve_openai import HI, start_gateway, stop_gateway

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)


def entries_with_adapters(root, versions, *, r: int = 16):
    for v in versions:
        adir = root / "outputs" / f"v{v}" / "adapter"
        adir.mkdir(parents=True, exist_ok=True)
        (adir / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 32}))


def test_vllm_command_serves_the_champion_and_challenger(tmp_path):
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0),
                                fake_entry("1.2.0", "1.1.0", T0)], champion="1.1.0")
    entries_with_adapters(root, ["1.1.0", "1.2.0"], r=24)
    abtest.start(root, "1.2.0", traffic=0.1, now=T0)
    argv = vllm_command(Project.load(root), port=8001)
    here = str(root.resolve())
    assert argv == ["vllm", "serve", "org/base", "--enable-lora", "--lora-modules",
                    f"v1.1.0={here}/outputs/v1.1.0/adapter", f"v1.2.0={here}/outputs/v1.2.0/adapter",
                    "--max-loras", "2", "--max-lora-rank", "32", "--port", "8001"]
    line = format_command(argv, runtime_updates=True)
    assert line.startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve") and shlex.split(line)[1:] == argv
    with open(root / "cl-release.yaml", "a") as f:
        f.write("serve:\n  upstream_admin: true\n  upstream_url: http://127.0.0.1:9/v1\n"
                "  upstream_repo_path: /srv/repo\n")
    out = CliRunner().invoke(main, ["-C", str(root), "serve", "vllm-command"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == ("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve org/base --enable-lora --lora-modules "
                                  "v1.1.0=/srv/repo/outputs/v1.1.0/adapter v1.2.0=/srv/repo/outputs/v1.2.0/adapter "
                                  "--max-loras 2 --max-lora-rank 32")
    out = CliRunner().invoke(main, ["-C", str(root), "serve", "vllm-command", "--json", "--repo-path", "/x"])
    assert json.loads(out.output)["argv"][5] == "v1.1.0=/x/outputs/v1.1.0/adapter"


def test_versions_on_different_bases_need_two_servers(tmp_path):
    other = fake_entry("2.0.0", "1.1.0", T0, strategy="merge_and_retrain")
    other["train_base"] = {"path": "outputs/v1.1.0/merged"}
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0), other],
                     champion="1.1.0")
    entries_with_adapters(root, ["1.1.0", "2.0.0"])
    abtest.start(root, "2.0.0", traffic=0.1, now=T0)
    with pytest.raises(Exception, match="different base models: 1.1.0 on org/base; 2.0.0 on outputs/v1.1.0/merged"):
        vllm_command(Project.load(root))


def test_ab_moves_load_and_unload_adapters_and_a_promotion_changes_what_serves(tmp_path):
    fake = FakeVLLM("org/base", {"v1.1.0": "/first"})
    gw = start_gateway(tmp_path, fake, serve_extra="  upstream_admin: true\n  upstream_repo_path: /srv/repo\n")
    root = gw.root
    try:
        entries_with_adapters(root, ["1.1.0", "1.2.0"])
        assert gw.chat({"model": "champion", "messages": HI})[1]["choices"][0]["message"]["content"].startswith("v1.1.0")
        abtest.start(root, "1.2.0", traffic=0.1, now=T0)  # loaded before the registry says it serves
        assert fake.loras == {"v1.1.0": "/first", "v1.2.0": "/srv/repo/outputs/v1.2.0/adapter"}
        status, out, r = gw.chat({"model": "challenger", "messages": HI})
        assert status == 200 and r.getheader("X-CL-Release-Version") == "1.2.0"
        abtest.promote(Project.load(root), force=True, reason="test", now=T0)
        assert set(fake.loras) == {"v1.2.0"}  # the old champion was unloaded after the commit
        status, out, r = gw.chat({"model": "champion", "messages": HI})
        assert r.getheader("X-CL-Release-Version") == "1.2.0" and out["choices"][0]["message"]["content"].startswith("v1.2.0")
        assert fake.requests[-1]["model"] == "v1.2.0"
        abtest.rollback_champion(root, now=T0)
        assert set(fake.loras) == {"v1.1.0"}
        assert gw.chat({"model": "champion", "messages": HI})[2].getheader("X-CL-Release-Version") == "1.1.0"
        abtest.start(root, "1.2.0", traffic=0.2, now=T0)
        abtest.stop(root, reason="enough", now=T0)
        assert set(fake.loras) == {"v1.1.0"}
        assert [c for c, _ in fake.admin_calls] == ["load", "unload", "load", "unload", "load", "unload"]
    finally:
        stop_gateway(gw)


def test_a_refused_load_changes_nothing_and_a_failed_unload_says_how_to_retry(tmp_path):
    fake = FakeVLLM("org/base", {"v1.1.0": "/first"})
    gw = start_gateway(tmp_path, fake, serve_extra="  upstream_admin: true\n")
    root = gw.root
    try:
        fake.loras["v1.2.0"] = "/already"  # a name vLLM holds already is not loaded again
        entries_with_adapters(root, ["1.1.0", "1.2.0"])
        abtest.start(root, "1.2.0", traffic=0.1, now=T0)
        assert [c for c, _ in fake.admin_calls] == []
        abtest.stop(root, now=T0)
        assert set(fake.loras) == {"v1.1.0"}
        before = registry_at_head(root)
        gw.upstream.__exit__()  # vLLM down: the move fails before the registry changes
        with pytest.raises(UpstreamError, match="unreachable"):
            abtest.start(root, "1.2.0", traffic=0.1, now=T0)
        assert registry_at_head(root) == before and abtest.state(Registry(root).load()) is None
        out = CliRunner().invoke(main, ["-C", str(root), "ab", "start", "1.2.0"])
        assert out.exit_code == 1 and "unreachable" in out.output and "Traceback" not in out.output
    finally:
        gw.srv.shutdown()
        gw.srv.server_close()


def test_sync_adapters_makes_the_upstream_hold_exactly_the_served_versions(tmp_path):
    fake = FakeVLLM("org/base", {"v1.0.0": "/old", "v9.9.9": "/stray"})
    gw = start_gateway(tmp_path, fake, serve_extra="  upstream_admin: true\n  upstream_repo_path: /srv\n")
    try:
        entries_with_adapters(gw.root, ["1.1.0"])
        out = CliRunner().invoke(main, ["-C", str(gw.root), "serve", "sync-adapters", "--json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.output) == {"loaded": ["1.1.0"], "unloaded": ["1.0.0", "9.9.9"]}
        assert fake.loras == {"v1.1.0": "/srv/outputs/v1.1.0/adapter"}
        admin = AdapterAdmin(gw.root, gw.upstream.url)
        assert admin.loaded() == {"1.1.0"}
        entries_with_adapters(gw.root, ["1.2.0"])
        abtest.start(gw.root, "1.2.0", traffic=0.1, now=T0)
        fake.admin_fail = True
        with pytest.raises(UpstreamError, match="the registry move is committed, but the model server did not "
                                                "unload v1.2.0: 500 adapter slots busy") as e:
            abtest.stop(gw.root, now=T0)
        assert "cl-release serve sync-adapters" in str(e.value)
        assert abtest.state(Registry(gw.root).load()) is None  # the stop is done
        fake.admin_fail = False
        assert admin.sync(Registry(gw.root).load()) == {"loaded": [], "unloaded": ["1.2.0"]}
    finally:
        stop_gateway(gw)
