"""cl-release.yaml: loading, schema errors with file, line and field; safe paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cl_release.errors import ProjectError, UserError
from cl_release.project import PROJECT_FILE, Project, safe_relpath

GOOD = """\
name: demo
base_model:
  name: org/base
datasets:
  - name: domain
    path: datasets/domain/*.jsonl
  - name: fixes
    path: datasets/fixes.jsonl
    role: corrections
launch:
  device: cpu
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / PROJECT_FILE).write_text(text, encoding="utf-8")
    return tmp_path / PROJECT_FILE


def load_error(tmp_path: Path, text: str) -> ProjectError:
    write(tmp_path, text)
    with pytest.raises(ProjectError) as e:
        Project.load(tmp_path)
    assert "\n" not in str(e.value)
    return e.value


def test_good_project_loads_with_defaults(tmp_path):
    write(tmp_path, GOOD)
    p = Project.load(tmp_path)
    assert p.name == "demo" and p.seed == 42 and p.chat_template == "tokenizer_default"
    assert [d["role"] for d in p.datasets] == ["domain", "corrections"]
    assert p.datasets[0]["format"] == "messages"
    assert p.launch["device"] == "cpu" and p.launch["num_processes"] == 1 and p.launch["deepspeed"] is None


def test_missing_file(tmp_path):
    with pytest.raises(ProjectError) as e:
        Project.load(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / PROJECT_FILE}: no project file here")
    assert "cl-release init" in str(e.value)


def test_malformed_yaml_names_the_line(tmp_path):
    err = load_error(tmp_path, GOOD + "training:\n  learning_rate: [1\n  num_epochs: 2\n")
    assert err.path.endswith(PROJECT_FILE)
    assert err.line is not None and err.line >= 13
    assert f"{PROJECT_FILE}:{err.line}:" in str(err)


def test_bad_indentation_names_the_line(tmp_path):
    err = load_error(tmp_path, "name: demo\nbase_model:\n  name: x\n name: y\n")
    assert err.line == 4


def test_python_tags_are_refused_with_file_and_line(tmp_path):
    marker = tmp_path / "pwned"
    text = GOOD + f'description: !!python/object/apply:os.system ["touch {marker}"]\n'
    err = load_error(tmp_path, text)
    assert f"{PROJECT_FILE}:12:" in str(err)
    assert "python/object/apply" in str(err)
    assert not marker.exists()


def test_not_utf8(tmp_path):
    (tmp_path / PROJECT_FILE).write_bytes(b"name: d\xe9mo\n")
    with pytest.raises(ProjectError, match="not UTF-8"):
        Project.load(tmp_path)


def test_not_a_mapping(tmp_path):
    err = load_error(tmp_path, "- a\n- b\n")
    assert "must be a mapping" in str(err) and err.line == 1


def test_unknown_top_level_key_names_field_and_line(tmp_path):
    err = load_error(tmp_path, GOOD + "sede: 1\n")
    assert err.field == "sede" and err.line == 12
    assert str(err).startswith(f"{tmp_path / PROJECT_FILE}:12: sede: unknown key 'sede'")
    assert "did you mean 'seed'?" in str(err)


def test_unknown_nested_key_names_field_and_line(tmp_path):
    err = load_error(tmp_path, GOOD.replace("  device: cpu\n", "  device: cpu\n  num_proceses: 2\n"))
    assert err.field == "launch.num_proceses" and err.line == 12
    assert str(err).startswith(f"{tmp_path / PROJECT_FILE}:12: launch.num_proceses: unknown key 'num_proceses'")
    assert "did you mean 'num_processes'?" in str(err)


def test_misspelled_strategy_knob(tmp_path):
    err = load_error(tmp_path, GOOD + "strategies:\n  continued_lora:\n    learning_rte: 1.0e-5\n")
    assert err.field == "strategies.continued_lora.learning_rte" and err.line == 14
    assert "unknown key 'learning_rte'" in str(err) and "did you mean 'learning_rate'?" in str(err)


def test_unknown_key_in_a_dataset_entry(tmp_path):
    err = load_error(tmp_path, GOOD.replace("    role: corrections\n", "    role: corrections\n    fromat: alpaca\n"))
    assert err.field == "datasets[1].fromat" and err.line == 10
    assert "did you mean 'format'?" in str(err)


@pytest.mark.parametrize(
    "extra, field, line",
    [
        ("seed: forty-two\n", "seed", 12),
        ("training:\n  num_epochs: many\n", "training.num_epochs", 13),
        ("training:\n  learning_rate: -1\n", "training.learning_rate", 13),
        ("mix:\n  replay_ratio: 1.5\n", "mix.replay_ratio", 13),
        ("launch2: {}\n", None, None),
    ],
)
def test_wrong_types_name_field_and_line(tmp_path, extra, field, line):
    err = load_error(tmp_path, GOOD + extra)
    if field:
        assert err.field == field and err.line == line, str(err)
        assert f":{line}: {field}: " in str(err)


def test_wrong_type_in_a_dataset_entry(tmp_path):
    err = load_error(tmp_path, GOOD.replace("    role: corrections\n", "    role: fixes\n"))
    assert err.field == "datasets[1].role" and err.line == 9
    assert "is not one of" in str(err)


@pytest.mark.parametrize("path, words", [("../outside.jsonl", "contains '..'"),
                                          ("datasets/../../x.jsonl", "contains '..'"),
                                          ("/etc/passwd", "is absolute")])
def test_dataset_path_escapes_are_refused(tmp_path, path, words):
    err = load_error(tmp_path, GOOD.replace("datasets/fixes.jsonl", path))
    assert err.field == "datasets[1].path" and err.line == 8
    assert words in str(err)
    assert f"{PROJECT_FILE}:8: datasets[1].path:" in str(err)


def test_dataset_path_through_a_symlink_out_of_the_repo(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(outside, repo / "link")
    err = load_error(repo, GOOD.replace("datasets/fixes.jsonl", "link/x.jsonl"))
    assert err.field == "datasets[1].path" and "outside the release repository" in str(err)


def test_duplicate_dataset_names(tmp_path):
    err = load_error(tmp_path, GOOD.replace("name: fixes", "name: domain"))
    assert err.field == "datasets[1].name" and err.line == 7
    assert "'domain' is used twice" in str(err)


def test_deepspeed_path_escape(tmp_path):
    err = load_error(tmp_path, GOOD + "  deepspeed: ../zero2.json\n")
    assert err.field == "launch.deepspeed"


def test_missing_dataset_file_names_the_entry(tmp_path):
    write(tmp_path, GOOD)
    p = Project.load(tmp_path)
    with pytest.raises(ProjectError) as e:
        p.dataset_files(p.datasets[1])
    assert e.value.field == "datasets[1].path" and e.value.line == 8
    assert p.dataset_files(p.datasets[0]) == []  # an empty glob is no data, not an error


def test_glob_is_sorted_and_stays_inside(tmp_path):
    write(tmp_path, GOOD)
    d = tmp_path / "datasets" / "domain"
    d.mkdir(parents=True)
    for n in ("b", "a", "c"):
        (d / f"{n}.jsonl").write_text("{}\n")
    p = Project.load(tmp_path)
    assert [f.name for f in p.dataset_files(p.datasets[0])] == ["a.jsonl", "b.jsonl", "c.jsonl"]


@pytest.mark.parametrize("rel", ["", "   ", "a\x00b", "/abs", "../up", "a/../../up"])
def test_safe_relpath_refuses(tmp_path, rel):
    with pytest.raises(UserError):
        safe_relpath(tmp_path, rel)


def test_safe_relpath_accepts_inside_paths(tmp_path):
    assert safe_relpath(tmp_path, "a/b/c.jsonl") == tmp_path / "a" / "b" / "c.jsonl"


# ---------------------------------------------------------------- hostile inputs: bounded, fast, one line


def laughs(levels: int, indent: str = "  ") -> str:
    """The 'billion laughs' document: each level 9 aliases of the one before (9**levels values)."""
    lines = [f'{indent}x0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{indent}x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def timed_load_error(tmp_path: Path, text: str, seconds: float = 1.0) -> ProjectError:
    import time

    t = time.perf_counter()
    err = load_error(tmp_path, text)
    assert time.perf_counter() - t < seconds, "the error took too long"
    return err


@pytest.mark.parametrize("levels", [6, 9])
def test_billion_laughs_under_axolotl_is_refused_within_a_second(tmp_path, levels):
    err = timed_load_error(tmp_path, GOOD + "axolotl:\n" + laughs(levels))
    assert "aliases expand to more than 10,000 values" in str(err)
    assert err.line is not None and err.line > 11 and err.field.startswith("axolotl.x")


def test_billion_laughs_as_a_top_level_key_is_refused_too(tmp_path):
    err = timed_load_error(tmp_path, laughs(9, indent="") + GOOD)
    assert "aliases expand" in str(err)


def test_a_few_anchors_and_merge_keys_still_work(tmp_path):
    write(tmp_path, GOOD + "training: &t {learning_rate: 1.0e-4, num_epochs: 2}\n"
                           "strategies:\n  patch:\n    <<: *t\n    num_epochs: 1\n  initial: *t\n")
    p = Project.load(tmp_path)
    assert p.data["strategies"]["patch"] == {"learning_rate": 1e-4, "num_epochs": 1}
    assert p.data["strategies"]["initial"]["num_epochs"] == 2


@pytest.mark.parametrize("deep", [
    "axolotl:\n  x: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "axolotl:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(2_000)) + "  " * 2_001 + "v: 1\n",
    "axolotl:\n  x: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n",
])
def test_deep_nesting_is_a_one_line_error_within_a_second(tmp_path, deep):
    err = timed_load_error(tmp_path, GOOD + deep)
    assert "nested deeper than 64 levels" in str(err) and err.line is not None
    assert err.field in ("axolotl.x[0][0]...", "axolotl.x.a.a...", "axolotl.k0.k1.k2...")


def test_deep_nesting_through_aliases_is_refused(tmp_path):
    chain = "axolotl:\n  a0: &a0 [[[[[[[[[[1]]]]]]]]]]\n" + "".join(
        f"  a{i}: &a{i} [[[[[[[[[[*a{i - 1}]]]]]]]]]]\n" for i in range(1, 10))
    err = timed_load_error(tmp_path, GOOD + chain)
    assert "nested deeper than 64 levels through aliases" in str(err)


@pytest.mark.parametrize("text, value", [("1e-5", 1e-5), ("5E-05", 5e-5), ("2e-4", 2e-4), ("1.5e3", 1500.0),
                                          ("-1e+2", -100.0), (".5e1", 5.0), ("3.0e-5", 3e-5)])
def test_yaml_12_floats_are_numbers(tmp_path, text, value):
    write(tmp_path, GOOD + f"training:\n  learning_rate: {text}\n  weight_decay: 0\n")
    if value < 0:
        with pytest.raises(ProjectError, match="learning_rate"):  # a number now, refused by the schema's minimum
            Project.load(tmp_path)
        return
    lr = Project.load(tmp_path).data["training"]["learning_rate"]
    assert isinstance(lr, float) and lr == value


def test_strings_that_only_look_like_numbers_stay_strings(tmp_path):
    write(tmp_path, GOOD + 'axolotl:\n  hub_model_id: "1e5"\n  run_name: e5\n  wandb_name: 1e\n')
    ax = Project.load(tmp_path).data["axolotl"]
    assert ax == {"hub_model_id": "1e5", "run_name": "e5", "wandb_name": "1e"}


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN", "+.INF"])
def test_non_finite_numbers_name_the_field(tmp_path, value):
    err = timed_load_error(tmp_path, GOOD + f"training:\n  learning_rate: {value}\n")
    assert err.field == "training.learning_rate" and err.line == 13
    assert "must be a finite number" in str(err)


def test_non_finite_numbers_under_axolotl_name_the_field(tmp_path):
    err = load_error(tmp_path, GOOD + "axolotl:\n  max_grad_norm: .nan\n")
    assert err.field == "axolotl.max_grad_norm" and err.line == 13


def test_lone_surrogate_in_a_string_names_the_field(tmp_path):
    err = load_error(tmp_path, GOOD + 'description: "bad \\ud800 text"\n')
    assert err.field == "description" and err.line == 12 and "surrogate" in str(err)


@pytest.mark.parametrize("name, words", [("/models/llama", "absolute"), ("../other-repo/models/llama", "'..'"),
                                          ("~/models/llama", "absolute")])
def test_base_model_outside_the_repository_is_refused(tmp_path, name, words):
    err = load_error(tmp_path, GOOD.replace("name: org/base", f"name: {name}"))
    assert err.field == "base_model.name" and err.line == 3 and words in str(err)
    assert "inside the release repository" in str(err)


def test_base_model_hub_id_or_inside_path_is_fine(tmp_path):
    for name in ("org/base", "models/base", "base"):
        write(tmp_path, GOOD.replace("name: org/base", f"name: {name}"))
        assert Project.load(tmp_path).base_model["name"] == name


@pytest.mark.parametrize("extra, field, words", [
    ("axolotl:\n  deepspeed: /etc/passwd\n", "axolotl.deepspeed", "absolute"),
    ("axolotl:\n  test_datasets:\n    - path: /outside\n      type: completion\n", "axolotl.test_datasets[0].path",
     "absolute"),
    ("axolotl:\n  trust_remote_code: true\n", "axolotl.trust_remote_code", "runs code"),
    ("axolotl:\n  plugins: [os]\n", "axolotl.plugins", "runs code"),
    ("axolotl:\n  test_datasets:\n    - path: data/x.jsonl\n      trust_remote_code: true\n",
     "axolotl.test_datasets[0].trust_remote_code", "runs code"),
    ("axolotl:\n  resume_from_checkpoint: ../elsewhere/ckpt\n", "axolotl.resume_from_checkpoint", "'..'"),
    ("axolotl:\n  pretraining_dataset: [{path: 'file:///etc/shadow'}]\n", "axolotl.pretraining_dataset[0].path",
     "absolute"),
    ("strategies:\n  patch:\n    extra:\n      deepspeed: /etc/passwd\n", "strategies.patch.extra.deepspeed",
     "absolute"),
])
def test_axolotl_keys_are_confined_like_the_rest_of_the_file(tmp_path, extra, field, words):
    err = load_error(tmp_path, GOOD + extra)
    assert err.field == field and err.line is not None and err.line >= 13, str(err)
    assert words in str(err) and "allow_unconfined" in str(err)


def test_axolotl_path_through_a_link_out_of_the_repository(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(outside, repo / "link")
    err = load_error(repo, GOOD + "axolotl:\n  deepspeed: link/ds.json\n")
    assert err.field == "axolotl.deepspeed" and "through a link" in str(err)


def test_allow_unconfined_opts_in_per_key(tmp_path):
    text = GOOD + "axolotl:\n  trust_remote_code: true\n  deepspeed: /opt/ds/zero2.json\n  max_grad_norm: 1.0\n"
    err = load_error(tmp_path, text + "allow_unconfined: [trust_remote_code]\n")
    assert err.field == "axolotl.deepspeed"
    write(tmp_path, text + "allow_unconfined: [trust_remote_code, deepspeed]\n")
    p = Project.load(tmp_path)
    assert p.allow_unconfined == ["trust_remote_code", "deepspeed"]
    assert p.unconfined(p.data["axolotl"]) == {"deepspeed": "/opt/ds/zero2.json", "trust_remote_code": True}


def test_inside_paths_and_plain_values_under_axolotl_are_fine(tmp_path):
    write(tmp_path, GOOD + "axolotl:\n  deepspeed: deepspeed/zero2.json\n  trust_remote_code: false\n  plugins: []\n"
                           "  test_datasets: [{path: datasets/eval.jsonl, type: completion}]\n"
                           "  special_tokens: {pad_token: '</s>'}\n  hub_model_id: org/name\n")
    p = Project.load(tmp_path)
    assert p.unconfined(p.data["axolotl"]) == {}
