#!/usr/bin/env bash
# Creates .venv with the project installed (editable). With --test, also what the tests
# run against: the real Rasa Open Source 3.6 server (.rasa-venv), rasa-sdk 3.6.2 with the
# project (.venv-sdk36), Rasa Pro 3.21 (.rasa-pro-venv), Python 3.10 (.venv310) and
# Debian's Chromium. Each is made once; a later run checks and returns in seconds, so a
# machine without a package index can run the server and the tests after the first setup.
#
# torch: TORCH_SPEC picks the build. Without it, a machine with an NVIDIA driver gets pip's
# default (CUDA) torch, and one without gets torch==2.13.0 (on CI, a CPU build on local disk;
# elsewhere add --index-url https://download.pytorch.org/whl/cpu for a CPU-only build).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
pip_flags=(-q --disable-pip-version-check)
say() { echo "setup: $*" >&2; }

torch_spec() {
    if [ -n "${TORCH_SPEC:-}" ]; then echo "$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1; then echo torch
    else echo torch==2.13.0; fi
}

# A venv with torch and the project; $2 names extras, $3.. are installed first (pins).
# A venv is made again when pyproject.toml (its dependencies) changes.
stamp=$(sha1sum pyproject.toml | cut -c1-12)

project_venv() {
    local venv=$1 extras=$2
    shift 2
    [ -f "$venv/.done-$extras-$stamp" ] && return
    say "$venv: creating (torch, FunASR and the project: a few minutes the first time)"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    # shellcheck disable=SC2046
    "$venv/bin/python" -m pip install "${pip_flags[@]}" $(torch_spec)
    [ $# -gt 0 ] && "$venv/bin/python" -m pip install "${pip_flags[@]}" "$@"
    "$venv/bin/python" -m pip install "${pip_flags[@]}" -e ".[$extras]"
    touch "$venv/.done-$extras-$stamp"
}

if [ "${1:-}" != "--test" ]; then
    project_venv .venv plot,onnx
    exit 0
fi

# onnx: EMOTION_RUNTIME=auto then runs ONNX Runtime on CPU here; the other venvs lack the
# extra (Rasa Pro's has onnxruntime alone) and fall back to torch.
project_venv .venv test,onnx
# The test extra holds the plot extra's packages: the server's setup (scripts/serve.sh) needs
# nothing more, and must not reinstall (without a package index it could not).
touch ".venv/.done-plot,onnx-$stamp"
# rasa-sdk 3.6.2 (Sanic 21.12), as Rasa Open Source 3.6 and its rasa-sdk image run it. It
# declares Python < 3.11; the project's own code runs on 3.11 there, as Rasa 3.6 does.
if [ ! -f ".venv-sdk36/.done-plot-$stamp" ]; then
    say ".venv-sdk36: rasa-sdk 3.6.2 beside the project"
    [ -x .venv-sdk36/bin/python ] || "$python" -m venv .venv-sdk36
    .venv-sdk36/bin/python -m pip install "${pip_flags[@]}" --no-deps --ignore-requires-python "rasa-sdk==3.6.2"
    project_venv .venv-sdk36 plot "Sanic-Cors>=2.0.0,<3.0.0" "coloredlogs>=10,<16" "pluggy>=1.0.0,<2.0.0" \
        "prompt-toolkit>=3.0,<3.0.29" "ruamel.yaml>=0.16.5,<0.18.0" "sanic>=21.12.0,<22.0.0" "websockets>=10.0,<11.0" \
        "typing-extensions>=4.1.1,<5"
fi
if [ ! -x .rasa-venv/bin/rasa ]; then
    say ".rasa-venv: Rasa Open Source 3.6.21 (about 3 minutes)"
    scripts/install-rasa-oss.sh .rasa-venv
fi
# Rasa Pro in its own environment, for tests/rasa_pro (its modules, never its server).
if [ ! -f .rasa-pro-venv/.done ]; then
    say ".rasa-pro-venv: Rasa Pro 3.21.0 (a few minutes)"
    "$python" -m venv .rasa-pro-venv
    .rasa-pro-venv/bin/python -m pip install "${pip_flags[@]}" "rasa-pro==3.21.0" "twilio>=9.12,<9.13" pytest soundfile soxr
    .rasa-pro-venv/bin/python -m pip install "${pip_flags[@]}" --no-deps -e .
    touch .rasa-pro-venv/.done
fi
# The project with its dependencies (torch, FunASR) beside Rasa Pro, for custom actions run
# inside Rasa Pro (endpoints.yml: actions_module), where the model loads in Rasa's own
# process. Every package Rasa Pro installed stays at its version: they constrain the install.
if [ ! -f ".rasa-pro-venv/.done-project-$stamp" ]; then
    say ".rasa-pro-venv: torch, FunASR and the project beside Rasa Pro (about 5 minutes)"
    pins=$(mktemp)
    .rasa-pro-venv/bin/python -m pip freeze --exclude-editable | grep '==' >"$pins"
    # shellcheck disable=SC2046
    .rasa-pro-venv/bin/python -m pip install "${pip_flags[@]}" -c "$pins" $(torch_spec)
    .rasa-pro-venv/bin/python -m pip install "${pip_flags[@]}" -c "$pins" -e .
    rm -f "$pins"
    touch ".rasa-pro-venv/.done-project-$stamp"
fi
# Debian's Chromium for the review page's browser test (Playwright drives it).
if ! command -v chromium >/dev/null 2>&1; then
    say "Chromium for the review page's test (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
        || { echo "the review page test needs Chromium: apt-get install chromium (as root)" >&2; exit 1; }
fi
# The engine's torch-free parts, on the lowest Python we support.
if [ ! -f ".venv310/.done-$stamp" ]; then
    py310=${PYTHON310:-}
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10 python3.10; do
        [ -z "$py310" ] && "$candidate" -c "" 2>/dev/null && py310=$candidate
    done
    [ -n "$py310" ] || { echo "Python 3.10 is needed for the tests (set PYTHON310)" >&2; exit 1; }
    say ".venv310: Python 3.10 for the torch-free tests, and rasa-sdk 3.6.2's server with no model"
    "$py310" -m venv .venv310
    .venv310/bin/python -m pip install "${pip_flags[@]}" --no-deps -e .
    .venv310/bin/python -m pip install "${pip_flags[@]}" numpy soundfile soxr httpx idna sniffio pyyaml pytest hypothesis \
        "rasa-sdk==3.6.2" prometheus-client tqdm
    touch ".venv310/.done-$stamp"
fi
