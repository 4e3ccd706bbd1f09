#!/usr/bin/env bash
# Creates .venv with the project installed (editable). With --test, also the test tools and
# the real Rasa server (.rasa-venv) for the end-to-end tests.
#
# torch: TORCH_SPEC picks the build. Without it, a machine with an NVIDIA driver gets pip's
# default (CUDA) torch, and one without gets torch==2.13.0 (on CI, a CPU build on local disk;
# elsewhere add --index-url https://download.pytorch.org/whl/cpu for a CPU-only build).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_SPEC:-}" ]; then
        # shellcheck disable=SC2086
        "${pip[@]}" $TORCH_SPEC
    elif command -v nvidia-smi >/dev/null 2>&1; then
        "${pip[@]}" torch
    else
        "${pip[@]}" torch==2.13.0
    fi
fi
if [ "${1:-}" = "--test" ]; then
    "${pip[@]}" -e '.[test]'
    [ -x .rasa-venv/bin/rasa ] || scripts/install-rasa-oss.sh .rasa-venv
    # Rasa Pro in its own environment, for tests/rasa_pro (its modules, never its server).
    if [ ! -x .rasa-pro-venv/bin/rasa ]; then
        "$python" -m venv .rasa-pro-venv
        .rasa-pro-venv/bin/python -m pip install -q --disable-pip-version-check "rasa-pro==3.21.0" "twilio>=9.12,<9.13" pytest soundfile soxr
    fi
    .rasa-pro-venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
    # Debian's Chromium for the review page's browser test (Playwright drives it).
    if ! command -v chromium >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
            || { echo "the review page test needs Chromium: apt-get install chromium (as root)" >&2; exit 1; }
    fi
    # The engine's torch-free parts, on the lowest Python we support.
    if [ ! -x .venv310/bin/python ]; then
        py310=${PYTHON310:-}
        for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10 python3.10; do
            [ -z "$py310" ] && "$candidate" -c "" 2>/dev/null && py310=$candidate
        done
        [ -n "$py310" ] || { echo "Python 3.10 is needed for the tests (set PYTHON310)" >&2; exit 1; }
        "$py310" -m venv .venv310
        .venv310/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
        .venv310/bin/python -m pip install -q --disable-pip-version-check numpy soundfile soxr httpx pyyaml pytest hypothesis
    fi
else
    "${pip[@]}" -e '.[plot]'
fi
