"""Where a result came from: the commit (and whether the tree had uncommitted changes), library versions,
the machine and the thread count. Every result JSON of the examples and experiments records this."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(threads: int) -> dict:
    """{"git_commit", "git_dirty" (tracked files changed), versions, machine, threads}; git fields are None
    outside a git checkout."""
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status),
            "torch": torch.__version__, "transformers": tf_version, "python": platform.python_version(),
            "machine": {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count()},
            "threads": threads}
