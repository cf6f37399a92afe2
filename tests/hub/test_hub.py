"""cl_release.hub: model card (hub.card), push plan, and pushes against an in-memory fake Hub."""

from __future__ import annotations

import copy
import json
import logging
import socket

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from cl_release.hub.card import model_card
from cl_release.hub import push as hub
from cl_release.errors import HubError, IntegrityError, UserError
from cl_release.files import atomic_write_json, sha256_bytes, sha256_file
from cl_release.registry import Registry

from fakehub import FakeHub

TOKEN = "hf_SECRETabc123"
REPO_ID = "acme/safety-llm"
HUB_CFG = {"repo_id": REPO_ID, "private": True, "license": "apache-2.0", "language": ["en"]}
HOSTILE_NOTE = (
    'Fixed "ammonia": IDLH answer\n'
    "---\n"
    "base_model: evil/model\n"
    "{{ config.__class__ }} {% raw %} <script>alert(1)</script> | pipe `tick`"
)
MODEL_FILES = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
}


def _entry(version, parent, strategy, bump, adapter_sha, **extra):
    return {
        "version": version,
        "parent": parent,
        "bump": bump,
        "strategy": strategy,
        "status": "released",
        "created_at": "2026-11-23T13:00:00Z",
        "base_model": {"name": "meta-llama/Meta-Llama-3.1-8B-Instruct", "revision": "0e9e39f"},
        "adapter": {"path": f"outputs/v{version}/adapter", "sha256": adapter_sha},
        "datasets": [
            {"name": "feedback", "role": "new", "path": "datasets/snapshots/a.jsonl",
             "sha256": "a" * 64, "examples": 367},
            {"name": "general", "role": "general", "path": "datasets/snapshots/b.jsonl",
             "sha256": "b" * 64, "examples": 50},
        ],
        "config": {"path": f"outputs/v{version}/axolotl.yml", "sha256": "c" * 64},
        "seed": 42,
        "launch": {"num_processes": 1, "num_machines": 1, "deepspeed": None},
        "training": {"train_loss": 0.25, "duration_seconds": 8280},
        "evaluation": {"regression": {"exact_match": 0.91, "cases": 120}},
        "toolchain": {"cl_release": "0.1.0", "axolotl": "0.19.0", "transformers": "5.16", "peft": "0.20",
                      "torch": "2.9"},
        "source_commit": "d" * 40,
        "notes": "",
        **extra,
    }


def _write_adapter(folder, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file(
        {
            "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
            "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32),
        },
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    (folder / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    # Not model files: never uploaded.
    (folder / "README.md").write_text("peft's own readme\n")
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (folder / "trainer_state.json").write_text("{}")
    (folder / "debug.log").write_text("step 1 loss 2.0\n")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"not this one")
    return sha256_file(folder / "adapter_model.safetensors")


@pytest.fixture
def release(tmp_path):
    """A release repository with 1.0.0 -> 1.1.0, both adapters on disk."""
    root = tmp_path / "repo"
    sha0 = _write_adapter(root / "outputs" / "v1.0.0" / "adapter", 0)
    sha1 = _write_adapter(root / "outputs" / "v1.1.0" / "adapter", 1)
    e0 = _entry("1.0.0", None, "initial", "major", sha0, notes="first release")
    e1 = _entry("1.1.0", "1.0.0", "continued_lora", "minor", sha1, notes=HOSTILE_NOTE)
    return root, e1, [e0, e1]


def _add_merged(root, version="1.1.0"):
    merged = root / "outputs" / f"v{version}" / "merged"
    merged.mkdir(parents=True)
    save_file({"model.embed_tokens.weight": np.ones((8, 4), dtype=np.float32)}, str(merged / "model.safetensors"))
    (merged / "config.json").write_text('{"model_type": "llama"}')
    (merged / "generation_config.json").write_text('{"do_sample": false}')
    (merged / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    return merged


def _front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, sep, body = card[4:].partition("\n---\n")
    assert sep
    return yaml.safe_load(head), body


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A running fake Hub; huggingface_hub online, pointed at it, with TOKEN in HF_TOKEN."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, at import
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-hf-login" / "token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)  # read by hub.push at call time
        yield server


# ---------------------------------------------------------------- model card


def test_card_front_matter_for_an_adapter(release):
    _, entry, lineage = release
    meta, _ = _front_matter(model_card("safety-llm", entry, lineage, hub=HUB_CFG, merged=False))
    assert meta["base_model"] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0"
    assert meta["language"] == ["en"]
    assert {"cl-release", "lora", "continued_lora"} <= set(meta["tags"])
    assert "datasets" not in meta  # local datasets are not Hub ids: no broken links


def test_card_front_matter_for_merged_weights(release):
    _, entry, lineage = release
    meta, body = _front_matter(model_card("safety-llm", entry, lineage, hub=HUB_CFG, merged=True))
    assert meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers"
    assert 'revision="v1.1.0-merged"' in body
    assert "PeftModel" not in body


def test_card_is_understood_by_huggingface_hub(release):
    from huggingface_hub import ModelCard

    _, entry, lineage = release
    card = ModelCard(model_card("safety-llm", entry, lineage, hub=HUB_CFG, merged=False))
    assert card.data.base_model == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert card.data.to_dict()["base_model_relation"] == "adapter"


def test_hostile_note_stays_in_the_body(release):
    _, entry, lineage = release
    card = model_card("safety-llm", entry, lineage, hub=HUB_CFG, merged=False)
    meta, body = _front_matter(card)
    assert meta["base_model"] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert "evil/model" not in yaml.safe_dump(meta)
    # Every line of the note is quoted: '---' cannot become a delimiter or a heading rule.
    assert "> ---" in body
    assert "> base_model: evil/model" in body
    assert '> Fixed "ammonia": IDLH answer' in body
    assert "{{ config.__class__ }}" in body  # shown literally; nothing renders templates
    assert "<script>" not in card and "&lt;script&gt;" in body
    assert card.count("\n---\n") == 1  # the front matter's closing line; the note's is quoted


def test_hostile_metadata_values_are_escaped(release):
    _, entry, lineage = release
    cfg = {**HUB_CFG, "license": 'other"\n---\nx: {y', "language": ["en", "a: b"]}
    meta, _ = _front_matter(model_card("n", entry, lineage, hub=cfg, merged=False))
    assert meta["license"] == 'other"\n---\nx: {y'
    assert meta["language"] == ["en", "a: b"]


def test_card_body_has_lineage_data_metrics_and_loading(release):
    _, entry, lineage = release
    _, body = _front_matter(model_card("safety-llm", entry, lineage, hub=HUB_CFG, merged=False))
    for text in (
        "| `1.0.0` | - | initial | released | 2026-11-23 |",
        "| `1.1.0` | `1.0.0` | continued\\_lora | released | 2026-11-23 |",
        "| feedback | new | 367 | `" + "a" * 64 + "` |",
        "| train\\_loss | 0.25 |",
        "| regression.exact\\_match | 0.91 |",
        "| axolotl | `0.19.0` |",
        "`" + "c" * 64 + "`",
        "| seed | `42` |",
        "| bump | `minor` |",
        'base = AutoModelForCausalLM.from_pretrained("meta-llama/Meta-Llama-3.1-8B-Instruct", revision="0e9e39f")',
        f'model = PeftModel.from_pretrained(base, "{REPO_ID}", revision="v1.1.0")',
    ):
        assert text in body, text


def test_card_for_an_adapter_trained_on_merged_weights(release):
    _, entry, lineage = release
    entry = {**entry, "train_base": {"path": "outputs/v1.0.0/merged", "sha256": "e" * 64, "merged_from": "1.0.0"}}
    _, body = _front_matter(model_card("safety-llm", entry, lineage, hub=HUB_CFG, merged=False))
    assert "merged weights of version `1.0.0`" in body
    assert f'base = AutoModelForCausalLM.from_pretrained("{REPO_ID}", revision="v1.0.0-merged")' in body


def test_local_base_model_is_not_claimed_as_a_hub_model(release):
    _, entry, lineage = release
    entry = {**entry, "base_model": {"name": "models/tiny-llama/", "revision": None}}
    meta, body = _front_matter(model_card("demo", entry, lineage, hub=HUB_CFG, merged=False))
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "`models/tiny-llama/`" in body


# ---------------------------------------------------------------- the plan


def test_plan_lists_model_files_only_without_any_request(release, fake_hub):
    root, entry, lineage = release
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=False, project_name="safety-llm")
    assert fake_hub.request_count == 0
    assert {f.path_in_repo for f in plan.files} == MODEL_FILES | {"README.md"}
    folder = root / "outputs" / "v1.1.0" / "adapter"
    assert plan.folder == folder
    for f in plan.files:
        if f.path_in_repo == "README.md":
            assert f.local_path is None and f.sha256 == sha256_bytes(plan.readme)
        else:
            assert f.size == (folder / f.path_in_repo).stat().st_size
            assert f.sha256 == sha256_file(folder / f.path_in_repo)
    assert (plan.repo_id, plan.tag, plan.branch, plan.private) == (REPO_ID, "v1.1.0", "main", True)
    assert (folder / "README.md").read_text() == "peft's own readme\n"  # never overwritten
    summary = plan.summary()
    assert "tag v1.1.0" in summary and "adapter_model.safetensors" in summary
    assert json.loads(json.dumps(plan.to_dict()))["tag"] == "v1.1.0"


def test_plan_accepts_the_adapter_weights_file_as_path(release):
    root, entry, lineage = release
    entry = copy.deepcopy(entry)
    entry["adapter"]["path"] = "outputs/v1.1.0/adapter/adapter_model.safetensors"
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=False)
    assert "adapter_model.safetensors" in {f.path_in_repo for f in plan.files}


def test_plan_merged_without_merged_folder(release):
    root, entry, lineage = release
    with pytest.raises(UserError, match=r"run 'cl-release merge 1\.1\.0' first"):
        hub.plan_push(root, entry, lineage, HUB_CFG, merged=True)


def test_plan_merged(release):
    root, entry, lineage = release
    _add_merged(root)
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=True)
    assert (plan.tag, plan.branch) == ("v1.1.0-merged", "merged")
    assert {f.path_in_repo for f in plan.files} == {
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"
    }


@pytest.mark.parametrize("shards", [1, 3])
def test_plan_merged_checks_the_recorded_merge_hash(release, shards):
    from cl_release.release.weights import weights_sha256

    root, entry, lineage = release
    merged = _add_merged(root)
    if shards > 1:
        (merged / "model.safetensors").unlink()
        for i in range(shards):
            save_file({"w": np.full((2, 2), i, dtype=np.float32)},
                      str(merged / f"model-0000{i + 1}-of-0000{shards}.safetensors"))
        (merged / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    entry = {**entry, "merged": {"path": "outputs/v1.1.0/merged", "sha256": weights_sha256(merged)}}
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=True)
    assert sum(f.path_in_repo.endswith(".safetensors") for f in plan.files) == shards
    assert ("model.safetensors.index.json" in {f.path_in_repo for f in plan.files}) == (shards > 1)
    entry["merged"]["sha256"] = "0" * 64
    with pytest.raises(IntegrityError, match="does not match the sha256 recorded"):
        hub.plan_push(root, entry, lineage, HUB_CFG, merged=True)


def test_plan_refuses_an_adapter_that_changed(release):
    root, entry, lineage = release
    entry = copy.deepcopy(entry)
    entry["adapter"]["sha256"] = "0" * 64
    with pytest.raises(IntegrityError, match="does not match the registry"):
        hub.plan_push(root, entry, lineage, HUB_CFG, merged=False)


def test_plan_refuses_unreleased_versions_and_missing_hub_section(release):
    root, entry, lineage = release
    with pytest.raises(UserError, match="rejected, not released"):
        hub.plan_push(root, {**entry, "status": "rejected"}, lineage, HUB_CFG, merged=False)
    with pytest.raises(UserError, match="hub.repo_id"):
        hub.plan_push(root, entry, lineage, None, merged=False)


# ---------------------------------------------------------------- pushing


def test_push_uploads_exactly_the_plan_and_tags_it(release, fake_hub):
    root, entry, lineage = release
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=False)
    messages = []
    result = hub.push(plan, progress=messages.append)

    repo = fake_hub.repos[REPO_ID]
    assert repo.private is True
    assert repo.tags == {"v1.1.0": result.commit}
    assert repo.branches["main"] == result.commit
    files = repo.files("v1.1.0")
    assert set(files) == {f.path_in_repo for f in plan.files} | {".gitattributes"}
    assert files["README.md"] == plan.readme
    for f in plan.files:
        if f.local_path is not None:
            assert files[f.path_in_repo] == f.local_path.read_bytes()
    assert result.to_registry() == {
        "repo_id": REPO_ID,
        "revision": "v1.1.0",
        "commit": result.commit,
        "url": f"{fake_hub.url}/{REPO_ID}/commit/{result.commit}",
        "pushed_at": result.pushed_at,
        "merged": False,
    }
    assert any("uploading 7 files" in m for m in messages)
    # One commit on top of the repository's initial commit.
    initial = repo.commits[result.commit]["parent"]
    assert set(repo.commits[initial]["files"]) == {".gitattributes"}
    assert len(repo.commits) == 2
    assert {r.authorization for r in fake_hub.requests} == {f"Bearer {TOKEN}"}


def test_second_push_of_a_version_fails_and_keeps_the_tag(release, fake_hub):
    root, entry, lineage = release
    first = hub.push(hub.plan_push(root, entry, lineage, HUB_CFG, merged=False))
    repo = fake_hub.repos[REPO_ID]
    commits = len(repo.commits)

    with pytest.raises(HubError) as info:
        hub.push(hub.plan_push(root, entry, lineage, HUB_CFG, merged=False))
    text = str(info.value)
    assert "tag v1.1.0 already exists" in text and "never moved" in text
    assert "release a new version" in text
    assert repo.tags == {"v1.1.0": first.commit}
    assert len(repo.commits) == commits  # nothing uploaded either


def test_versions_build_up_on_main_and_merged_goes_to_its_own_branch(release, fake_hub):
    root, entry, lineage = release
    e0 = lineage[0]
    v0 = hub.push(hub.plan_push(root, e0, lineage[:1], HUB_CFG, merged=False))
    repo = fake_hub.repos[REPO_ID]
    # A file a person added on the Hub is not cl-release's to delete.
    head = repo.branches["main"]
    extra = repo.add_commit({**repo.files("main"), "diagram.png": b"\x89PNG"}, head, "add diagram")
    repo.branches["main"] = extra

    v1 = hub.push(hub.plan_push(root, entry, lineage, HUB_CFG, merged=False))
    _add_merged(root)
    m1 = hub.push(hub.plan_push(root, entry, lineage, HUB_CFG, merged=True))

    assert repo.tags == {"v1.0.0": v0.commit, "v1.1.0": v1.commit, "v1.1.0-merged": m1.commit}
    assert m1.branch == "merged" and m1.merged and m1.to_registry()["merged"] is True
    assert repo.files("v1.0.0")["adapter_model.safetensors"] == (
        root / "outputs/v1.0.0/adapter/adapter_model.safetensors").read_bytes()
    assert set(repo.files("v1.1.0")) == MODEL_FILES | {"README.md", ".gitattributes", "diagram.png"}
    # The merged branch holds the merged model only: stale adapter files were deleted there.
    assert set(repo.files("v1.1.0-merged")) == {
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
        "README.md", ".gitattributes", "diagram.png",
    }
    assert repo.branches["main"] == v1.commit
    meta, _ = _front_matter(repo.files("v1.1.0-merged")["README.md"].decode())
    assert meta["base_model_relation"] == "finetune"


def test_a_card_naming_merged_weights_not_on_the_hub_is_refused(release, fake_hub):
    """2.0.0 trained on the merged weights of 1.0.0: its card loads v1.0.0-merged, so that
    revision must exist on the Hub before the card does."""
    root, entry, lineage = release
    entry = {**entry, "train_base": {"path": "outputs/v1.0.0/merged", "sha256": "e" * 64, "merged_from": "1.0.0"}}
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=False)
    assert plan.requires == ["v1.0.0-merged"]
    with pytest.raises(HubError, match="loads revision v1.0.0-merged .* not on the Hub") as info:
        hub.push(plan)
    assert "cl-release push 1.0.0 --merged" in str(info.value)
    assert "v1.1.0" not in fake_hub.repos[REPO_ID].tags  # nothing uploaded
    _add_merged(root, "1.0.0")
    hub.push(hub.plan_push(root, lineage[0], lineage[:1], HUB_CFG, merged=True))
    result = hub.push(plan)
    assert set(fake_hub.repos[REPO_ID].tags) == {"v1.0.0-merged", "v1.1.0"} and result.revision == "v1.1.0"


def test_dry_run_shows_the_card_it_would_upload(release):
    root, entry, lineage = release
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=False)
    text = plan.summary()
    assert "model card (README.md):" in text and plan.readme.decode().rstrip() in text
    assert plan.to_dict()["card"] == plan.readme.decode()


def test_push_without_a_token(release, fake_hub, monkeypatch):
    root, entry, lineage = release
    monkeypatch.delenv("HF_TOKEN")
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=False)
    with pytest.raises(HubError) as info:
        hub.push(plan)
    assert "hf auth login" in str(info.value) and "HF_TOKEN" in str(info.value)
    assert fake_hub.request_count == 0


def test_push_uses_the_saved_hub_login(release, fake_hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    root, entry, lineage = release
    monkeypatch.delenv("HF_TOKEN")
    token_file = tmp_path / "login" / "token"
    token_file.parent.mkdir()
    token_file.write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    result = hub.push(hub.plan_push(root, entry, lineage, HUB_CFG, merged=False))
    assert fake_hub.repos[REPO_ID].tags["v1.1.0"] == result.commit


def test_wrong_token_is_a_hub_error_without_the_token(release, fake_hub, monkeypatch, caplog, capsys):
    root, entry, lineage = release
    wrong = "hf_WRONGxyz789secret"
    monkeypatch.setenv("HF_TOKEN", wrong)
    caplog.set_level(logging.DEBUG)
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=False)
    with pytest.raises(HubError) as info:
        hub.push(plan)
    err = info.value
    assert "401" in str(err) and "hf auth login" in str(err) and "HF_TOKEN" in str(err)
    assert wrong not in str(err) and wrong not in repr(err) and wrong not in (err.hint or "")
    assert err.__context__ is None and err.__cause__ is None  # the request does not ride along
    out, errout = capsys.readouterr()
    assert wrong not in out + errout + caplog.text
    assert fake_hub.requests[0].authorization == f"Bearer {wrong}"  # it was sent, only to the Hub
    assert REPO_ID not in fake_hub.repos


def test_token_never_reaches_output_or_logs(release, fake_hub, monkeypatch, caplog, capsys):
    from huggingface_hub import constants

    root, entry, lineage = release
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub logs every request as curl
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=False)
    result = hub.push(plan, progress=print)
    with pytest.raises(HubError) as info:
        hub.push(plan, progress=print)  # tag exists
    out, errout = capsys.readouterr()
    assert "uploading" in out
    assert "curl" in caplog.text  # the debug logging really ran
    for text in (out, errout, caplog.text, str(info.value), json.dumps(result.to_registry()),
                 repr(plan), plan.summary(), json.dumps(plan.to_dict()), plan.readme.decode()):
        assert TOKEN not in text


def test_forbidden_namespace_names_the_repo(release, fake_hub):
    root, entry, lineage = release
    fake_hub.forbidden_namespaces.add("acme")
    with pytest.raises(HubError) as info:
        hub.push(hub.plan_push(root, entry, lineage, HUB_CFG, merged=False))
    text = str(info.value)
    assert "403" in text and REPO_ID in text and "hub.repo_id" in text


def test_unreachable_hub_names_the_endpoint(release, fake_hub):
    root, entry, lineage = release
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(HubError, match="cannot reach the Hub at " + endpoint):
        hub.push(hub.plan_push(root, entry, lineage, HUB_CFG, merged=False), endpoint=endpoint)


def test_offline_mode_is_refused_before_any_request(release, fake_hub, monkeypatch):
    from huggingface_hub import constants

    root, entry, lineage = release
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        hub.push(hub.plan_push(root, entry, lineage, HUB_CFG, merged=False))
    assert fake_hub.request_count == 0


def test_file_changed_after_planning_uploads_nothing(release, fake_hub):
    root, entry, lineage = release
    plan = hub.plan_push(root, entry, lineage, HUB_CFG, merged=False)
    (root / "outputs/v1.1.0/adapter/tokenizer.json").write_text('{"changed": true}')
    with pytest.raises(IntegrityError, match="changed since the push was planned"):
        hub.push(plan)
    repo = fake_hub.repos[REPO_ID]
    assert repo.tags == {} and len(repo.commits) == 1


def test_tag_created_by_someone_else_meanwhile(release, fake_hub):
    root, entry, lineage = release

    def concurrent_tag(repo, oid):
        repo.tags.setdefault("v1.1.0", repo.commits[oid]["parent"])

    fake_hub.after_commit = concurrent_tag
    with pytest.raises(HubError) as info:
        hub.push(hub.plan_push(root, entry, lineage, HUB_CFG, merged=False))
    text = str(info.value)
    assert "appeared on acme/safety-llm during this push" in text and "not tagged" in text
    repo = fake_hub.repos[REPO_ID]
    assert repo.tags["v1.1.0"] != repo.branches["main"]  # the other client's tag was not moved


def test_record_push_appends_to_the_registry_entry_and_commits_it(release, fake_hub):
    import subprocess

    root, entry, lineage = release
    atomic_write_json(
        root / "registry" / "model_registry.json",
        {"schema_version": 1, "current": "1.1.0", "aliases": {}, "models": lineage},
    )
    (root / ".gitignore").write_text("outputs/\n.cl-release/\n")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "registry"]):
        subprocess.run(["git", "-C", str(root), *args], check=True)
    registry = Registry(root)
    result = hub.push(hub.plan_push(root, entry, lineage, HUB_CFG, merged=False))
    hub.record_push(registry, "1.1.0", result)
    saved = registry.get("1.1.0")
    assert saved["pushes"] == [result.to_registry()]
    assert TOKEN not in (root / "registry" / "model_registry.json").read_text()
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], check=True, capture_output=True, text=True).stdout  # noqa: E731
    assert git("status", "--porcelain") == "" and "Record push of v1.1.0" in git("log", "-1", "--format=%s")
