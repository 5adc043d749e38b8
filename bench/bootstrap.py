"""The bench scripts run on the repository's .venv, made by scripts/setup.sh if need be."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
PYTHON = VENV / "bin" / "python"


def in_venv() -> bool:
    """Whether this interpreter is the repository's .venv."""
    return Path(sys.prefix).resolve() == VENV.resolve()


def has_netd(python: Path) -> bool:
    """Whether `python` imports this checkout's netd (what scripts/setup.sh installs)."""
    if not python.exists():
        return False
    probe = "import netd, sys; sys.stdout.write(netd.__file__)"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.returncode == 0 and Path(done.stdout).resolve().is_relative_to(REPO)


def ensure_venv(script: str) -> None:
    """Unless running under .venv: make it with scripts/setup.sh when it has no netd
    (a fresh clone), then re-exec `script` with .venv/bin/python and the same arguments."""
    if in_venv():
        return
    if has_netd(PYTHON):
        print(f"bench: running under {sys.executable}, not .venv: "
              f"re-running with {PYTHON.relative_to(REPO)}", file=sys.stderr, flush=True)
    else:
        print(f"bench: running under {sys.executable} and .venv has no netd: running "
              f"`bash scripts/setup.sh`, then again with {PYTHON.relative_to(REPO)}",
              file=sys.stderr, flush=True)
        subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], cwd=REPO, check=True)
    os.execv(PYTHON, [str(PYTHON), str(Path(script).resolve()), *sys.argv[1:]])
