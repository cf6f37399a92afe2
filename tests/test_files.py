"""Atomic writes, locks and hashing (cl_release.files)."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from cl_release import files
from cl_release.errors import LockedError


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 64, 1000])
def test_sha256_file_streams_across_chunk_boundaries(tmp_path, monkeypatch, size):
    monkeypatch.setattr(files, "HASH_CHUNK", 8)
    data = os.urandom(size)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert files.sha256_file(p) == hashlib.sha256(data).hexdigest() == files.sha256_bytes(data)


def test_atomic_write_json_is_sorted_pretty_and_unicode(tmp_path):
    p = tmp_path / "deep" / "dir" / "x.json"
    files.atomic_write_json(p, {"b": 1, "a": {"z": "é\U0001F600", "y": [1, 2]}})
    text = p.read_text(encoding="utf-8")
    assert text == '{\n  "a": {\n    "y": [\n      1,\n      2\n    ],\n    "z": "é\U0001F600"\n  },\n  "b": 1\n}\n'
    assert list(p.parent.iterdir()) == [p]


def test_atomic_write_replaces_whole_files(tmp_path):
    p = tmp_path / "x.txt"
    files.atomic_write_text(p, "old contents, longer")
    files.atomic_write_text(p, "new")
    assert p.read_text() == "new"


@pytest.mark.parametrize("fail", ["replace", "fsync"])
def test_crash_during_atomic_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, fail):
    p = tmp_path / "x.json"
    files.atomic_write_json(p, {"v": 1})

    def boom(*a, **k):
        raise OSError("crash")

    monkeypatch.setattr(files.os, fail, boom)
    with pytest.raises(OSError):
        files.atomic_write_json(p, {"v": 2})
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"v": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["x.json"]


def test_keyboard_interrupt_during_write_cleans_up(tmp_path, monkeypatch):
    p = tmp_path / "x.txt"
    files.atomic_write_text(p, "old")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_text(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["x.txt"]


def test_lock_is_exclusive_and_names_the_lock_file(tmp_path):
    lock = tmp_path / ".cl-release" / "x.lock"
    with files.locked(lock, what="the thing"):
        with pytest.raises(LockedError) as e:
            with files.locked(lock, timeout=0, what="the thing"):
                pass
        assert "another cl-release process is using the thing" in str(e.value) and str(lock) in str(e.value)
        assert "wait for it" in str(e.value)
    with files.locked(lock, timeout=0):  # released on exit
        pass


def test_lock_is_released_when_the_body_raises(tmp_path):
    lock = tmp_path / "x.lock"
    with pytest.raises(RuntimeError):
        with files.locked(lock):
            raise RuntimeError
    with files.locked(lock, timeout=0):
        pass


def test_lock_waits_for_a_holder_in_another_thread(tmp_path):
    lock = tmp_path / "x.lock"
    held, release = threading.Event(), threading.Event()

    def holder():
        with files.locked(lock):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(5)
    with pytest.raises(LockedError):
        with files.locked(lock, timeout=0.05):
            pass
    threading.Timer(0.1, release.set).start()
    with files.locked(lock, timeout=5):
        pass
    t.join(5)
