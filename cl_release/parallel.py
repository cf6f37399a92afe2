"""Forked worker processes: how many cores this process may use, and whether forking is safe now.

The feedback import and the data build fork parse/read workers; both ask here, and tests
patch these two public names to force either path."""

from __future__ import annotations

import multiprocessing
import os
import threading


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def can_fork() -> bool:
    """Forked workers start at once with this process's modules loaded. Without fork, or while
    another thread runs (it might hold a lock, SQLite's or the allocator's, at the fork), the
    work runs in this process instead."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
