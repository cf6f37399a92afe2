"""The registry file: schema errors, semantic versions, lineage queries, atomic writes."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from cl_release import files
from cl_release.errors import RegistryError, VersionError
from cl_release.registry import (
    REGISTRY_FILE,
    Registry,
    bump_version,
    empty_registry,
    normalize_version,
    parse_version,
)

SHA = "a" * 64


def entry(version: str, parent: str | None, *, status: str = "released", strategy: str = "continued_lora",
          bump: str = "minor") -> dict:
    return {
        "version": version,
        "parent": parent,
        "bump": bump,
        "strategy": strategy if parent else "initial",
        "status": status,
        "created_at": "2026-01-01T00:00:00Z",
        "base_model": {"name": "org/base", "revision": None},
        "adapter": {"path": f"outputs/v{version}/adapter", "sha256": SHA},
        "datasets": [{"name": "new", "role": "new", "path": f"datasets/snapshots/{SHA}.jsonl",
                      "sha256": SHA, "examples": 3}],
        "config": {"path": f"outputs/v{version}/axolotl.yml", "sha256": SHA},
        "seed": 42,
        "launch": {"num_processes": 1, "num_machines": 1, "deepspeed": None},
        "training": {"train_loss": 1.0, "duration_seconds": 1.0},
        "evaluation": {},
        "toolchain": {"cl_release": "0.1.0", "axolotl": "0.19.0"},
        "source_commit": "0" * 40,
        "notes": "",
    }


def registry_with(*entries, current: str | None = None) -> dict:
    data = empty_registry()
    data["models"] = list(entries)
    data["current"] = current if current is not None else (entries[-1]["version"] if entries else None)
    return data


@pytest.fixture
def reg(tmp_path) -> Registry:
    r = Registry(tmp_path)
    (tmp_path / "registry").mkdir()
    return r


def write_raw(reg: Registry, data) -> None:
    text = data if isinstance(data, str) else json.dumps(data, indent=2)
    reg.path.write_text(text, encoding="utf-8")


@pytest.fixture
def lineage_reg(reg) -> Registry:
    """1.0.0 -> 1.1.0 -> 1.2.0, 1.0.0 -> 1.0.1 (patch), 1.3.0 rejected; current 1.2.0."""
    data = registry_with(
        entry("1.0.0", None, bump="major"),
        entry("1.1.0", "1.0.0"),
        entry("1.0.1", "1.0.0", strategy="patch", bump="patch"),
        entry("1.2.0", "1.1.0"),
        entry("1.3.0", "1.2.0", status="rejected"),
        current="1.2.0",
    )
    reg.save(data)
    return reg


# ---------------------------------------------------------------- schema errors


def test_missing_registry_file_names_the_path_and_the_fix(reg):
    with pytest.raises(RegistryError) as e:
        reg.load()
    assert "model_registry.json" in str(e.value) and "cl-release init" in str(e.value)


def test_invalid_json_names_file_and_line(reg):
    write_raw(reg, '{\n  "schema_version": 1,\n  "current": null,\n  "models": [,]\n}\n')
    with pytest.raises(RegistryError) as e:
        reg.load()
    assert f"{REGISTRY_FILE}:4: invalid JSON" in str(e.value)


def test_not_utf8_is_refused(reg):
    reg.path.write_bytes(b'{"current": "\xff"}')
    with pytest.raises(RegistryError, match="not UTF-8"):
        reg.load()


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda d: d["models"][0].update(version="1.0"), "models[0].version", "does not match"),
        (lambda d: d["models"][0].update(version="v1.0.0"), "models[0].version", "does not match"),
        (lambda d: d["models"][0].pop("adapter"), "models[0]", "'adapter' is a required property"),
        (lambda d: d.pop("current"), "(top level)", "'current' is a required property"),
        (lambda d: d["models"][0].update(seed="42"), "models[0].seed", "is not of type 'integer'"),
        (lambda d: d["models"][0]["datasets"][0].update(examples=-1), "models[0].datasets[0].examples",
         "less than the minimum"),
        (lambda d: d["models"][0]["adapter"].update(sha256="xyz"), "models[0].adapter.sha256", "does not match"),
        (lambda d: d["models"][0]["datasets"][0].update(path="../etc/passwd"), "models[0].datasets[0].path", ""),
        (lambda d: d["models"][0].update(status="shipped"), "models[0].status", "is not one of"),
        (lambda d: d.update(schema_version=2), "schema_version", "1 was expected"),
    ],
)
def test_schema_errors_name_file_and_field(reg, mutate, field, words):
    data = registry_with(entry("1.0.0", None))
    mutate(data)
    write_raw(reg, data)
    with pytest.raises(RegistryError) as e:
        reg.load()
    msg = str(e.value)
    assert msg.startswith(f"{REGISTRY_FILE}: {field}: "), msg
    assert words in msg
    assert "\n" not in msg


def test_duplicate_version_is_refused(reg):
    write_raw(reg, registry_with(entry("1.0.0", None), entry("1.0.0", None)))
    with pytest.raises(RegistryError, match=r"models\[1\]\.version: version 1\.0\.0 appears twice"):
        reg.load()


def test_current_must_be_a_version_in_models(reg):
    write_raw(reg, registry_with(entry("1.0.0", None), current="1.1.0"))
    with pytest.raises(RegistryError, match=r"current: 1\.1\.0 is not a version in models"):
        reg.load()


def test_alias_and_parent_must_exist(reg):
    data = registry_with(entry("1.0.0", None))
    data["aliases"] = {"champion": "9.9.9"}
    write_raw(reg, data)
    with pytest.raises(RegistryError, match=r"aliases\.champion: 9\.9\.9"):
        reg.load()
    write_raw(reg, registry_with(entry("1.1.0", "1.0.0")))
    with pytest.raises(RegistryError, match=r"models\[0\]\.parent: 1\.0\.0 is not a version"):
        reg.load()


def test_repo_schema_is_used_when_present(reg, tmp_path):
    # A local registry/schema.json (shipped by init) is what readers validate against.
    schema = json.loads((Path(__file__).parent.parent / "registry" / "schema.json").read_text())
    schema["properties"]["models"]["maxItems"] = 1
    (tmp_path / "registry" / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(RegistryError, match="models"):
        reg.save(registry_with(entry("1.0.0", None), entry("1.1.0", "1.0.0")))


# ---------------------------------------------------------------- semantic versions


@pytest.mark.parametrize("bump", ["major", "minor", "patch"])
def test_first_release_is_1_0_0_for_any_bump(bump):
    assert bump_version(None, bump, set()) == "1.0.0"


@pytest.mark.parametrize(
    "parent, bump, taken, expected",
    [
        ("1.0.0", "minor", {"1.0.0"}, "1.1.0"),
        ("1.0.0", "patch", {"1.0.0"}, "1.0.1"),
        ("1.0.0", "major", {"1.0.0"}, "2.0.0"),
        ("1.2.3", "minor", set(), "1.3.0"),
        ("1.2.3", "major", set(), "2.0.0"),
        # numbers never repeat: rolled back to 1.0.0 with 1.1.0 taken
        ("1.0.0", "minor", {"1.0.0", "1.1.0"}, "1.2.0"),
        ("1.0.0", "minor", {"1.0.0", "1.1.0", "1.2.0", "1.3.0"}, "1.4.0"),
        ("1.0.0", "patch", {"1.0.0", "1.0.1"}, "1.0.2"),
        ("1.0.0", "major", {"1.0.0", "2.0.0"}, "3.0.0"),
        (None, "minor", {"1.0.0"}, "2.0.0"),
    ],
)
def test_bump_version_takes_the_next_free_number(parent, bump, taken, expected):
    assert bump_version(parent, bump, taken) == expected


def test_bump_version_never_returns_a_taken_number():
    taken = {"1.0.0"}
    for bump in ["minor", "patch", "minor", "major", "patch", "minor"] * 3:
        v = bump_version("1.0.0", bump, taken)
        assert v not in taken
        taken.add(v)


def test_unknown_bump():
    with pytest.raises(VersionError, match="unknown bump 'huge'"):
        bump_version("1.0.0", "huge", set())


@pytest.mark.parametrize("text, expected", [("1.2.3", (1, 2, 3)), ("v1.2.3", (1, 2, 3)), (" 0.0.1 ", (0, 0, 1)),
                                            ("10.20.30", (10, 20, 30))])
def test_parse_version(text, expected):
    assert parse_version(text) == expected
    assert normalize_version(text) == "%d.%d.%d" % expected


@pytest.mark.parametrize("text", ["1.2", "1.2.3.4", "01.2.3", "1.02.3", "a.b.c", "", "1.2.3-rc1", "vv1.2.3", "-1.0.0"])
def test_malformed_versions(text):
    with pytest.raises(VersionError, match="invalid version") as e:
        parse_version(text)
    assert "MAJOR.MINOR.PATCH" in str(e.value)


# ---------------------------------------------------------------- lineage queries


def test_lineage_children_and_find(lineage_reg):
    data = lineage_reg.load()
    assert [m["version"] for m in Registry.lineage(data, "1.2.0")] == ["1.0.0", "1.1.0", "1.2.0"]
    assert [m["version"] for m in Registry.lineage(data, "v1.0.1")] == ["1.0.0", "1.0.1"]
    assert [m["version"] for m in Registry.children(data, "1.0.0")] == ["1.1.0", "1.0.1"]
    assert Registry.children(data, "1.3.0") == []
    assert lineage_reg.get("v1.1.0")["parent"] == "1.0.0"


def test_resolve_parent(lineage_reg):
    data = lineage_reg.load()
    assert Registry.resolve_parent(data, None)["version"] == "1.2.0"
    assert Registry.resolve_parent(data, "1.0.1")["version"] == "1.0.1"
    assert Registry.resolve_parent(empty_registry(), None) is None


def test_from_unknown_version_lists_known_ones(lineage_reg):
    data = lineage_reg.load()
    with pytest.raises(VersionError) as e:
        Registry.resolve_parent(data, "4.0.0")
    assert "unknown version 4.0.0" in str(e.value) and "1.0.0, 1.1.0" in str(e.value)
    with pytest.raises(VersionError, match="invalid version"):
        Registry.resolve_parent(data, "latest")


def test_rejected_versions_cannot_be_built_on_or_rolled_back_to(lineage_reg):
    data = lineage_reg.load()
    with pytest.raises(VersionError, match="1.3.0 is rejected"):
        Registry.resolve_parent(data, "1.3.0")
    before = lineage_reg.path.read_bytes()
    with pytest.raises(VersionError, match="cannot roll back to 1.3.0"):
        lineage_reg.rollback("1.3.0")
    assert lineage_reg.path.read_bytes() == before


def test_rollback_records_an_event_and_deletes_nothing(lineage_reg):
    before = lineage_reg.load()
    lineage_reg.rollback("1.0.0")
    after = lineage_reg.load()
    assert after["current"] == "1.0.0"
    assert after["models"] == before["models"]
    (event,) = after["events"]
    assert event["action"] == "rollback" and event["from"] == "1.2.0" and event["to"] == "1.0.0"
    assert event["at"].endswith("Z")
    lineage_reg.rollback("1.1.0")
    assert [e["to"] for e in lineage_reg.load()["events"]] == ["1.0.0", "1.1.0"]
    # after the rollback, the next minor from 1.1.0 skips every taken number
    taken = {m["version"] for m in after["models"]}
    assert bump_version("1.1.0", "minor", taken) == "1.4.0"


def test_rollback_to_unknown_version(lineage_reg):
    with pytest.raises(VersionError, match="unknown version 7.0.0"):
        lineage_reg.rollback("7.0.0")


def test_append_refuses_a_duplicate_and_sets_current(reg):
    reg.save(empty_registry())
    reg.append(entry("1.0.0", None), make_current=True)
    reg.append(entry("1.1.0", "1.0.0", status="rejected"), make_current=False)
    data = reg.load()
    assert data["current"] == "1.0.0" and len(data["models"]) == 2
    with pytest.raises(RegistryError, match="already in the registry"):
        reg.append(entry("1.0.0", None), make_current=True)
    assert reg.load() == data


# ---------------------------------------------------------------- writes: sorted, atomic, validated


def test_saved_file_is_sorted_pretty_json(reg):
    reg.save(registry_with(entry("1.0.0", None)))
    text = reg.path.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_invalid_registry_is_never_written(lineage_reg):
    before = lineage_reg.path.read_bytes()
    bad = lineage_reg.load()
    bad["models"][1]["version"] = "one.one"
    with pytest.raises(RegistryError, match=r"models\[1\]\.version"):
        lineage_reg.save(bad)
    assert lineage_reg.path.read_bytes() == before
    with pytest.raises(RegistryError, match="current"):
        with lineage_reg.transaction() as data:
            data["current"] = "8.8.8"
    assert lineage_reg.path.read_bytes() == before


def test_transaction_body_error_writes_nothing(lineage_reg):
    before = lineage_reg.path.read_bytes()
    with pytest.raises(RuntimeError):
        with lineage_reg.transaction() as data:
            data["models"].pop()
            raise RuntimeError("boom")
    assert lineage_reg.path.read_bytes() == before


def _leftovers(reg: Registry) -> list[str]:
    return sorted(p.name for p in reg.path.parent.iterdir() if p.name != reg.path.name)


@pytest.mark.parametrize("where", ["replace", "write", "fsync"])
def test_crash_during_save_keeps_the_old_registry(lineage_reg, monkeypatch, where):
    before = lineage_reg.path.read_bytes()
    new = copy.deepcopy(lineage_reg.load())
    new["current"] = "1.0.0"

    def boom(*a, **k):
        raise OSError("disk on fire")

    if where == "replace":
        monkeypatch.setattr(files.os, "replace", boom)
    elif where == "fsync":
        monkeypatch.setattr(files.os, "fsync", boom)
    else:
        real_fdopen = os.fdopen

        class Half:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):  # half of the bytes, then the crash
                self.f.write(data[: len(data) // 2])
                raise OSError("disk full")

        monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: Half(real_fdopen(fd, mode)))
    with pytest.raises(OSError):
        lineage_reg.save(new)
    monkeypatch.undo()
    assert lineage_reg.path.read_bytes() == before
    assert lineage_reg.load()["current"] == "1.2.0"
    assert _leftovers(lineage_reg) == []


def test_crash_during_serialization_keeps_the_old_registry(lineage_reg, monkeypatch):
    before = lineage_reg.path.read_bytes()
    monkeypatch.setattr(files.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError):
        with lineage_reg.transaction() as data:
            data["current"] = "1.1.0"
    monkeypatch.undo()
    assert lineage_reg.path.read_bytes() == before
    assert _leftovers(lineage_reg) == []


def test_registry_lock_times_out_with_a_locked_error(lineage_reg):
    from cl_release.errors import LockedError

    with files.locked(lineage_reg.lock_path, what="the registry"):
        with pytest.raises(LockedError, match="registry.lock"):
            with files.locked(lineage_reg.lock_path, timeout=0.05, what="the registry"):
                pass


@pytest.mark.parametrize("depth", [200, 100_000])
def test_deeply_nested_registry_is_a_registry_error_within_a_second(reg, depth):
    import time

    nested = "[" * depth + "]" * depth
    write_raw(reg, '{"schema_version": 1, "current": null, "models": [], "x": ' + nested + "}\n")
    t = time.perf_counter()
    with pytest.raises(RegistryError) as e:
        reg.load()
    assert time.perf_counter() - t < 1.0
    assert str(e.value).startswith(REGISTRY_FILE) and ("nested deeper than 64" in str(e.value) or "depth" in str(e.value))
