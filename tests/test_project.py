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
