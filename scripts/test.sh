#!/usr/bin/env bash
# Sets up (scripts/setup.sh --test) and runs lint and the whole test suite, the real-Rasa
# end-to-end test included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check emotion actions tests domain_snippets bench
.venv/bin/python -m pytest "$@"
