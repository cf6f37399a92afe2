"""Rendering: golden configs per strategy, hostile values, unknown keys, sandbox, hardware."""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import pytest
import yaml

from cl_release.errors import RenderError, UserError
from cl_release.release.plan import plan_release
from cl_release.release.render import (
    STRATEGIES,
    check_config,
    hardware,
    render_config,
    render_text,
    strategy_knobs,
    to_yaml_scalar,
)

from helpers import (
    TESTS, FakeTrainer, add_data, commit_all, load_project, make_release_repo, release, write_fake_model,
)

GOLDEN = TESTS / "golden"


# ---------------------------------------------------------------- golden configs per strategy


@pytest.fixture(scope="module")
def golden_repo(tmp_path_factory):
    """1.0.0 released (fake training), then new domain data, corrections and a second base."""
    mp = pytest.MonkeyPatch()
    try:
        FakeTrainer().install(mp)
        root = make_release_repo(tmp_path_factory.mktemp("golden"))
        plans = {"initial": plan_release(load_project(root), bump="minor", notes="first: release")}
        release(root, "minor")
        add_data(root, "q2-storage.jsonl", "datasets/domain/q2.jsonl", commit=False)
        add_data(root, "corrections-001.jsonl", "datasets/corrections/c1.jsonl", commit=False)
        write_fake_model(root / "models" / "base2", seed=1)
        commit_all(root)
        project = load_project(root)
        plans["continued_lora"] = plan_release(project, bump="minor")
        plans["patch"] = plan_release(project, bump="patch")
        plans["merge_and_retrain"] = plan_release(project, bump="major")
        plans["annual_reset"] = plan_release(project, bump="major", base_model="models/base2")
        yield root, plans
    finally:
        mp.undo()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_golden_config(golden_repo, strategy):
    root, plans = golden_repo
    plan = plans[strategy]
    assert plan.strategy == strategy
    golden = GOLDEN / f"{strategy}.yml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(plan.config_text, encoding="utf-8")
    assert golden.is_file(), f"missing {golden}; run with UPDATE_GOLDEN=1"
    assert plan.config_text == golden.read_text(encoding="utf-8"), (
        f"rendered {strategy} config differs from {golden} (UPDATE_GOLDEN=1 to accept)")
    assert str(root) not in plan.config_text  # repository-relative, machine independent


def test_golden_strategy_settings(golden_repo):
    _, plans = golden_repo
    c = {s: p.config for s, p in plans.items()}
    assert c["initial"]["learning_rate"] == 2e-4 and "lora_model_dir" not in c["initial"]
    assert c["continued_lora"]["learning_rate"] == 2e-4 and c["continued_lora"]["num_epochs"] == 1
    assert c["continued_lora"]["lora_dropout"] == 0.1
    assert c["continued_lora"]["lora_model_dir"] == "outputs/v1.0.0/adapter"
    assert c["patch"]["lora_model_dir"] == "outputs/v1.0.0/adapter"
    assert c["merge_and_retrain"]["base_model"] == "outputs/v1.0.0/merged"
    assert "lora_model_dir" not in c["merge_and_retrain"]
    assert c["annual_reset"]["base_model"] == "models/base2"
    for s, cfg in c.items():
        assert cfg["output_dir"] == f"outputs/v{plans[s].version}/adapter"
        assert [d["path"] for d in cfg["datasets"]] == [p.path for p in plans[s].parts]


# ---------------------------------------------------------------- a context for direct rendering


def context(**over):
    ctx = {
        "release": {"version": "1.2.0", "parent": "1.1.0", "strategy": "continued_lora", "notes": "n"},
        "base_model": {"path": "models/base", "revision": None, "model_type": None, "tokenizer_type": None},
        "chat_template": "tokenizer_default",
        "lora": {"target_linear": True, "target_modules": None},
        "lora_model_dir": "outputs/v1.1.0/adapter",
        "datasets": [{"path": "datasets/snapshots/a.jsonl", "type": "chat_template"},
                     {"path": "datasets/snapshots/b.jsonl", "type": "completion"}],
        "knobs": strategy_knobs({}, "continued_lora"),
        "seed": 42,
        "paths": {"output_dir": "outputs/v1.2.0/adapter", "prepared": "outputs/.prepared"},
        "hw": hardware({"device": "cpu"}),
        "launch": {"deepspeed": None, "fsdp": None},
        "extra": {},
    }
    for k, v in over.items():
        ctx[k] = {**ctx[k], **v} if isinstance(ctx.get(k), dict) and isinstance(v, dict) and k != "extra" else v
    return ctx


HOSTILE = [
    'a: b', "it's", 'say "hi"', "line1\nline2", "{{ release.version }}", "{% raw %}", "# not a comment",
    "tab\there", "back\\slash", "\u2028sep\u2029", "\U0001F600 emoji \U00010348", "\x85nel", "\ufeffbom",
    "- item", "[1, 2]", "{a: 1}", "&anchor *alias", "!!python/object:os.system", "null", "yes", "1e3",
    "key: value\nother: 1", " leading space", "trailing space ", "", "\r\n", "%YAML 1.1", "---", "...", "@at`tick",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_render_to_exactly_the_same_values(value):
    def ctx(v):
        return context(
            release={"notes": v},
            base_model={"path": f"models/{v}"},
            datasets=[{"path": f"datasets/{v}.jsonl", "type": "chat_template"}],
            lora_model_dir=f"outputs/{v}",
            extra={"hub_model_id": v, "special_tokens": {"pad_token": v}},
        )

    benign = render_config(None, "continued_lora", ctx("x"))
    r = render_config(None, "continued_lora", ctx(value))
    assert set(r.config) == set(benign.config)
    assert {"hub_model_id", "special_tokens", "lora_model_dir", "base_model"} <= set(r.config)
    assert r.config["base_model"] == f"models/{value}"
    assert r.config["lora_model_dir"] == f"outputs/{value}"
    assert r.config["datasets"] == [{"path": f"datasets/{value}.jsonl", "ds_type": "json", "type": "chat_template",
                                     "field_messages": "messages"}]
    assert r.config["hub_model_id"] == value
    assert r.config["special_tokens"] == {"pad_token": value}
    # the notes stay inside their one comment line
    assert r.text.count("\n") == benign.text.count("\n")
    assert r.text.splitlines()[1] == f"# notes: {to_yaml_scalar(value)}"


def _random_string(rng: random.Random) -> str:
    pool = list("abc :#'\"{}[]%&*!|>-?,\\\n\t\r") + ["\u2028", "\u2029", "\x85", "\x00", "\x7f", "\ufeff",
                                                  "\U0001F600", "\u00e9", "\uffff", "\ud800", "\U0010FFFF"]
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 12)))


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randint(0, 7 if depth < 2 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-10**20, 10**20)
    if kind == 3:
        return rng.choice([1e-05, 2e-4, 1e-5, 0.1, 3.0, -0.0, 1e16, 1.5e300, 5e-324, 123456.789]) * rng.choice([1, -1]) \
            if rng.random() < 0.5 else rng.uniform(-1, 1) * 10 ** rng.randint(-12, 12)
    if kind in (4, 5):
        return _random_string(rng)
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_random_string(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_to_yaml_scalar_round_trips_many_values():
    rng = random.Random(1234)
    fixed = [1e-05, 2e-4, 0.0002, 1e-5, 5e-5, 3, 0, -7, True, False, None, 1.0, 10.0, 1e100, -2.5e-8,
             "1e-05", "true", "~", "0x1F", "012", "1_000", [1e-05, [None, {"k": 2e-4}]], {"a": {"b": [1, "2"]}}]
    values = fixed + [_random_value(rng) for _ in range(2000)]
    for v in values:
        text = f"key: {to_yaml_scalar(v)}\n"
        back = yaml.safe_load(text)["key"]
        assert back == v and type(back) is type(v), (v, text)
        if isinstance(v, float):
            assert math.copysign(1, back) == math.copysign(1, v)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), object(), b"bytes"])
def test_to_yaml_scalar_refuses_what_it_cannot_round_trip(bad):
    with pytest.raises(RenderError):
        to_yaml_scalar(bad)


# ---------------------------------------------------------------- unknown keys, overrides, sandbox


def test_unknown_key_in_check_config_has_a_hint():
    with pytest.raises(RenderError) as e:
        check_config({"learning_rte": 1}, where="x.yml")
    assert "x.yml: learning_rte: not an Axolotl config key" in str(e.value)
    assert "did you mean 'learning_rate'?" in str(e.value)
    with pytest.raises(RenderError, match=r"datasets\[0\]\.field_mesages.*did you mean 'field_messages'"):
        check_config({"datasets": [{"path": "p", "field_mesages": "m"}]}, where="x.yml")
    with pytest.raises(RenderError, match="not a mapping"):
        check_config(["a"], where="x.yml")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    trainer = FakeTrainer().install(monkeypatch)
    root = make_release_repo(tmp_path)
    return root, trainer


def test_misspelled_extra_key_in_project_fails_before_training(repo):
    root, trainer = repo
    text = (root / "cl-release.yaml").read_text() + "axolotl:\n  learning_rte: 0.001\n"
    (root / "cl-release.yaml").write_text(text)
    commit_all(root)
    with pytest.raises(RenderError) as e:
        release(root, "minor")
    assert "learning_rte" in str(e.value) and "did you mean 'learning_rate'?" in str(e.value)
    assert trainer.calls == []
    assert not (root / "outputs" / "v1.0.0").exists()


def test_misspelled_strategy_extra_key(repo):
    root, _ = repo
    text = (root / "cl-release.yaml").read_text() + "strategies:\n  initial:\n    extra:\n      lora_dropuot: 0.2\n"
    (root / "cl-release.yaml").write_text(text)
    with pytest.raises(RenderError, match="lora_dropuot.*did you mean 'lora_dropout'"):
        plan_release(load_project(root), bump="minor")


def test_valid_extra_keys_reach_the_config(repo):
    root, _ = repo
    text = (root / "cl-release.yaml").read_text() + "axolotl:\n  max_grad_norm: 0.5\n  hub_model_id: 'a: b'\n"
    (root / "cl-release.yaml").write_text(text)
    plan = plan_release(load_project(root), bump="minor")
    assert plan.config["max_grad_norm"] == 0.5 and plan.config["hub_model_id"] == "a: b"


OVERRIDE = """{% extends "_base.yml.j2" %}
{% block output %}{{ super() }}# user override
max_grad_norm: 0.25
{% endblock %}
"""


def test_user_template_overrides_the_packaged_default(repo):
    root, _ = repo
    (root / "templates" / "initial.yml.j2").write_text(OVERRIDE)
    plan = plan_release(load_project(root), bump="minor")
    assert "# user override" in plan.config_text and plan.config["max_grad_norm"] == 0.25
    # a repository without its own templates/ uses the packaged defaults
    shutil.rmtree(root / "templates")
    plan = plan_release(load_project(root), bump="minor")
    assert "max_grad_norm" not in plan.config


def test_misspelled_key_in_user_template_fails_before_training(repo):
    root, trainer = repo
    (root / "templates" / "initial.yml.j2").write_text(OVERRIDE.replace("max_grad_norm", "max_grad_nrom"))
    commit_all(root)
    with pytest.raises(RenderError) as e:
        release(root, "minor")
    assert "max_grad_nrom" in str(e.value) and "did you mean 'max_grad_norm'?" in str(e.value)
    assert trainer.calls == []


@pytest.mark.parametrize("body", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ release.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_sandbox_refuses_unsafe_templates(tmp_path, body):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "initial.yml.j2").write_text(body + "\n")
    with pytest.raises(RenderError) as e:
        render_text(tmp_path, "initial", context())
    assert "initial.yml.j2" in str(e.value)


def test_sandbox_error_is_a_security_refusal(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "initial.yml.j2").write_text("{{ ''.__class__.__mro__ }}\n")
    with pytest.raises(RenderError, match="unsafe template operation refused"):
        render_text(tmp_path, "initial", context())


def test_undefined_variable_and_syntax_error(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "initial.yml.j2").write_text("a: {{ no_such_variable }}\n")
    with pytest.raises(RenderError, match="undefined variable.*no_such_variable"):
        render_text(tmp_path, "initial", context())
    (tmp_path / "templates" / "initial.yml.j2").write_text("a: {{ release.nope | tojson }}\n")
    with pytest.raises(RenderError, match="undefined variable"):
        render_text(tmp_path, "initial", context())
    (tmp_path / "templates" / "initial.yml.j2").write_text("a: {% if %}\n")
    with pytest.raises(RenderError, match=r"initial.yml.j2:1: template syntax error"):
        render_text(tmp_path, "initial", context())


def test_template_that_renders_invalid_yaml_or_drops_datasets(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "initial.yml.j2").write_text("a: [unclosed\n")
    with pytest.raises(RenderError, match="invalid YAML"):
        render_config(tmp_path, "initial", context())
    (tmp_path / "templates" / "initial.yml.j2").write_text('{% extends "_base.yml.j2" %}{% block data %}{% endblock %}')
    with pytest.raises(RenderError, match="differ from the planned"):
        render_config(tmp_path, "initial", context())


def test_unknown_strategy():
    with pytest.raises(UserError, match="unknown strategy 'fancy'"):
        render_text(None, "fancy", context())


# ---------------------------------------------------------------- hardware settings


def test_cpu_settings_in_the_rendered_config():
    hw = hardware({"device": "cpu", "mixed_precision": "auto"})
    assert hw["cuda"] is False and hw["mixed_precision"] == "no"
    cfg = render_config(None, "continued_lora", context(hw=hw)).config
    for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "bf16", "fp16", "tf32", "flash_attention",
                "gradient_checkpointing", "sample_packing"):
        assert cfg[key] is False, key
    assert "sdp_attention" not in cfg


def test_cuda_settings_in_the_rendered_config():
    hw = hardware({"device": "auto", "mixed_precision": "auto"}, cuda=True)
    assert hw["bf16"] is True and hw["lora_kernels"] is True and hw["mixed_precision"] == "bf16"
    cfg = render_config(None, "continued_lora", context(hw=hw)).config
    assert cfg["bf16"] is True and cfg["fp16"] is False and cfg["tf32"] is True
    for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "gradient_checkpointing"):
        assert cfg[key] is True, key
    assert cfg["flash_attention"] is hw["flash_attention"]
    assert cfg.get("sdp_attention", False) is (not hw["flash_attention"])
    fp16 = hardware({"device": "cuda", "mixed_precision": "fp16"})
    assert fp16["fp16"] is True and fp16["bf16"] is False


def test_mixed_precision_on_cpu_is_a_user_error():
    with pytest.raises(UserError, match="mixed_precision bf16 needs a CUDA GPU"):
        hardware({"device": "cpu", "mixed_precision": "bf16"})


def test_knob_layering():
    data = {"lora": {"r": 8, "dropout": 0.2}, "training": {"learning_rate": 3e-4, "extra": {"a": 1}},
            "mix": {"replay_ratio": 0.3},
            "strategies": {"continued_lora": {"learning_rate": 2e-5, "extra": {"b": 2}}}}
    k = strategy_knobs(data, "continued_lora")
    assert k["lora_r"] == 8 and k["lora_dropout"] == 0.2 and k["learning_rate"] == 2e-5
    assert k["replay_ratio"] == 0.3 and k["extra"] == {"a": 1, "b": 2}
    assert strategy_knobs(data, "initial")["learning_rate"] == 3e-4
    with pytest.raises(UserError, match="must be below 1"):
        strategy_knobs({"mix": {"replay_ratio": 0.6, "general_ratio": 0.5}}, "continued_lora")


def test_extra_key_repeating_a_template_key_is_an_error(tmp_path):
    root = make_release_repo(tmp_path)
    text = (root / "cl-release.yaml").read_text()
    (root / "cl-release.yaml").write_text(text + "axolotl:\n  learning_rate: 0.1\n")
    from cl_release.project import Project

    with pytest.raises(RenderError, match="duplicate key 'learning_rate'"):
        plan_release(Project.load(root), bump="minor")


def test_duplicate_key_in_project_file(tmp_path):
    from cl_release.errors import ProjectError
    from cl_release.project import Project

    root = make_release_repo(tmp_path)
    text = (root / "cl-release.yaml").read_text()
    (root / "cl-release.yaml").write_text(text + "seed: 1\nseed: 2\n")
    with pytest.raises(ProjectError, match=r"cl-release.yaml:\d+: duplicate key 'seed'"):
        Project.load(root)


# ---------------------------------------------------------------- runaway templates: bounded, file:line


def user_template(tmp_path: Path, body: str) -> None:
    (tmp_path / "templates").mkdir(exist_ok=True)
    (tmp_path / "templates" / "initial.yml.j2").write_text(
        '{% extends "_base.yml.j2" %}\n{% block extra %}\n' + body + "\n{% endblock %}\n")


@pytest.mark.parametrize("body, words", [
    ("{% for i in range(10**9) %}{% endfor %}", "range(1000000000) goes over the limit of 100,000"),
    ("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", "range(1000) goes over"),
    ("{% for i in range(10**30) %}{% endfor %}", "goes over the limit"),
    ("{{ ('x' * 10**9) | length }}", "goes over the limit of 1,048,576"),
    ("{{ ([1, 2] * 10**8) | length }}", "goes over the limit of 1,048,576"),
    ("{{ 7 ** 100000 }}", "over 4,096 bits"),
])
def test_runaway_template_is_refused_fast_naming_file_and_line(tmp_path, body, words):
    import time

    user_template(tmp_path, body)
    t = time.perf_counter()
    with pytest.raises(RenderError) as e:
        render_text(tmp_path, "initial", context())
    assert time.perf_counter() - t < 1.0
    assert str(e.value).startswith("templates/initial.yml.j2:3: unsafe template operation refused")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_rendered_output_is_capped(tmp_path):
    user_template(tmp_path, "{% for i in range(90000) %}{{ 'x' * 1000 }}{% endfor %}")
    with pytest.raises(RenderError, match="the rendered config goes over 16 MiB"):
        render_text(tmp_path, "initial", context())


def test_template_runtime_error_names_file_and_line(tmp_path):
    user_template(tmp_path, "a: 1\n{{ 1 / 0 }}")
    with pytest.raises(RenderError, match=r"^templates/initial.yml.j2:4: template error: ZeroDivisionError"):
        render_text(tmp_path, "initial", context())


def test_loops_within_the_bounds_still_render(tmp_path):
    user_template(tmp_path, "{% for i in range(3) %}\n{{ ('k' ~ i) | tojson }}: {{ ('-' * 3) | tojson }}\n{% endfor %}")
    text = render_text(tmp_path, "initial", context())
    assert yaml.safe_load(text)["k2"] == "---"


def test_render_command_refuses_unconfined_axolotl_keys(repo):
    from click.testing import CliRunner

    from cl_release.cli import main

    root, _ = repo
    (root / "cl-release.yaml").write_text((root / "cl-release.yaml").read_text() + "axolotl:\n  deepspeed: /etc/passwd\n")
    r = CliRunner().invoke(main, ["-C", str(root), "render", "initial"])
    assert r.exit_code == 2 and r.stdout == ""
    assert "cl-release.yaml:" in r.stderr and "axolotl.deepspeed: '/etc/passwd' is an absolute path" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_opted_in_unconfined_keys_are_recorded_in_the_registry(repo):
    from cl_release.registry import Registry

    root, trainer = repo
    (root / "cl-release.yaml").write_text((root / "cl-release.yaml").read_text()
                                          + "axolotl:\n  trust_remote_code: true\n  max_grad_norm: 0.5\n"
                                            "allow_unconfined: [trust_remote_code]\n")
    commit_all(root)
    plan = plan_release(load_project(root), bump="minor")
    assert plan.unconfined == {"trust_remote_code": True} and plan.to_dict()["unconfined"] == plan.unconfined
    assert plan.config["trust_remote_code"] is True
    release(root, "minor")
    entry = Registry(root).get("1.0.0")
    assert entry["unconfined"] == {"trust_remote_code": True}


def test_entries_without_opt_ins_record_nothing_extra(repo):
    from cl_release.registry import Registry

    root, _ = repo
    release(root, "minor")
    assert "unconfined" not in Registry(root).get("1.0.0")
