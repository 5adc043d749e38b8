#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up (Debian packages, .venv), the tests,
# then the linters. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/python -m pytest -q "$@"
.venv/bin/ruff check netd tests bench
.venv/bin/mypy --strict netd
