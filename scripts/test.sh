#!/usr/bin/env bash
# Sets up (scripts/setup.sh --test) and runs lint and the tests: the main suite (the real
# rasa-sdk server, newest and 3.6.2, and the real Rasa Open Source 3.6 server end to end),
# the torch-free tests again on Python 3.10 (the Python of Rasa Open Source 3.6 and its
# rasa-sdk images), our CALM parts in Rasa Pro's own environment, and a smoke run of the
# benchmarks. Extra arguments go to each pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check emotion actions tests domain_snippets bench
.venv/bin/python -m pytest "$@"
.venv310/bin/python -m pytest -m "not model" "$@" tests/test_audio.py tests/test_sources.py tests/test_batching.py \
    tests/test_rules.py tests/test_config.py
.rasa-pro-venv/bin/python -m pytest -p no:cacheprovider "$@" tests/rasa_pro
.venv/bin/python bench/smoke.py
