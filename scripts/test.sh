#!/usr/bin/env bash
# Sets up (scripts/setup.sh --test) and runs lint and the tests: the main suite (the real
# rasa-sdk server, newest and 3.6.2, and the real Rasa Open Source 3.6 server end to end),
# the torch-free tests again on Python 3.10 (the Python of Rasa Open Source 3.6 and its
# rasa-sdk images), our CALM parts in Rasa Pro's own environment, and a smoke run of the
# benchmarks. Extra arguments go to each pytest run.
#
# The Python 3.10 and Rasa Pro runs go beside the main suite, whose test process leaves a
# core idle much of the time; their output follows the main suite's.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check emotion actions tests domain_snippets bench
logs=$(mktemp -d)
py310='' rasa_pro=''
# The background runs too, when the main suite is interrupted; `|| true`: under set -e a
# failed kill (none left to kill) would end the trap before rm and change the exit status.
trap 'kill $py310 $rasa_pro 2>/dev/null || true; rm -rf "$logs"' EXIT
.venv310/bin/python -m pytest -p no:cacheprovider -m "not model" "$@" tests/test_audio.py tests/test_sources.py tests/test_batching.py \
    tests/test_rules.py tests/test_config.py >"$logs/py310" 2>&1 &
py310=$!
.rasa-pro-venv/bin/python -m pytest -p no:cacheprovider "$@" tests/rasa_pro >"$logs/rasa_pro" 2>&1 &
rasa_pro=$!
status=0
.venv/bin/python -m pytest "$@" || status=$?
wait $py310 || status=$((status ? status : $?))
py310=''  # waited for: its pid may be another process's by the time the trap runs
echo "--- Python 3.10 (torch-free tests)"
cat "$logs/py310"
wait $rasa_pro || status=$((status ? status : $?))
rasa_pro=''
echo "--- Rasa Pro 3.21"
cat "$logs/rasa_pro"
[ "$status" -eq 0 ] || exit "$status"
.venv/bin/python bench/smoke.py
