#!/usr/bin/env bash
# Set up (idempotent; the tests need no downloaded corpus) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMOE_SKIP_CORPUS=1 bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q "$@"
