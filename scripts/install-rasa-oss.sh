#!/usr/bin/env bash
# Installs Rasa Open Source 3.6.21 into its own virtual environment, for the end-to-end tests
# (it is the client our action server answers). Rasa 3.6 declares Python <3.11; on 3.11 it
# runs once numpy, scipy, scikit-learn, dask and matplotlib are held to releases with 3.11
# wheels, so rasa and rasa-sdk go in without the Python check and the rest resolves normally.
#
# Usage: scripts/install-rasa-oss.sh VENV_DIR    (a few minutes, ~2 GB)
set -euo pipefail
venv=${1:?usage: install-rasa-oss.sh VENV_DIR}
python=${PYTHON:-python3}
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --ignore-requires-python -d "$tmp" rasa==3.6.21
wheel=$(ls "$tmp"/rasa-3.6.21-*.whl)

"$venv/bin/python" - "$wheel" > "$tmp/requirements.txt" <<'PY'
import sys
import zipfile

from pip._vendor.packaging.requirements import Requirement

held = {"numpy": "==1.23.5", "scipy": "==1.10.1", "scikit-learn": "==1.1.3", "dask": "==2022.10.2",
        "matplotlib": ">=3.6,<3.9", "rasa-sdk": None, "tensorflow-text": None}
archive = zipfile.ZipFile(sys.argv[1])
metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
marker_env = {"python_version": "3.10", "python_full_version": "3.10.12", "extra": ""}
for line in archive.read(metadata).decode().splitlines():
    if line.startswith("Requires-Dist: "):
        req = Requirement(line.removeprefix("Requires-Dist: "))
        if (req.marker is None or req.marker.evaluate(marker_env)) and req.name.lower() not in held:
            extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            print(f"{req.name}{extras}{req.specifier}")
for name, spec in held.items():
    if spec:
        print(name + spec)
PY

"${pip[@]}" -r "$tmp/requirements.txt"
"${pip[@]}" --no-deps --ignore-requires-python "rasa-sdk>=3.6.2,<3.7" "$wheel"
RASA_TELEMETRY_ENABLED=false "$venv/bin/rasa" --version
