#!/usr/bin/env bash
# Fills .whl/ for bench/gpu.sh, for a GPU machine that reaches no package index: the wheels,
# for that machine's Python, of what the project and its GPU tests run on (the project's
# requirements, pytest and hypothesis, at the versions in .venv) that the machine lacks (by
# name: a version it has already stays). torch and the CUDA libraries stay the machine's.
# The device tool carries at most 64 MiB.
#   FREEZE: the machine's `python3 -m pip list --format=freeze`
# Usage: bench/wheels.sh FREEZE [PYTHON_VERSION]   (3.12 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
freeze=$1 py=${2:-3.12}
names() { sed -E 's/[=@ ].*//; s/[-_.]+/-/g' | tr '[:upper:]' '[:lower:]'; }
have=$(names <"$freeze")
pins=$(.venv/bin/python - <<'PY'
import importlib.metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pins, todo = {}, ["rasa-emotion2vec", "pytest", "hypothesis"]
while todo:
    name = canonicalize_name(todo.pop())
    if name not in pins:
        dist = md.distribution(name)
        pins[name] = f"{dist.metadata['Name']}=={dist.version}"
        todo += [r.name for r in map(Requirement, dist.requires or []) if r.marker is None or r.marker.evaluate({"extra": ""})]
print("\n".join(pins.values()))
PY
)
rm -rf .whl && mkdir .whl
for pin in $pins; do
    name=$(names <<<"$pin")
    if grep -qxE '(torch|triton|nvidia-.*|setuptools|rasa-emotion2vec)' <<<"$name" || grep -qxF "$name" <<<"$have"; then continue; fi
    # A package published only as source (jieba, antlr4-python3-runtime) is built here.
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$py" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pin" 2>/dev/null \
        || .venv/bin/python -m pip wheel -q --no-deps -w .whl "$pin" 2>/dev/null \
        || echo "no wheel for $pin" >&2
done
# A C extension built here is for this Python, and pip would refuse the whole set for it
# (crcmod: only modelscope's dataset downloads use it).
for wheel in $(ls .whl | grep -E -- '-cp[0-9]+-cp[0-9]+m?-' | grep -v -- "-cp${py/./}-" || true); do
    echo "left out, built for another Python: $wheel" >&2
    rm ".whl/$wheel"
done
size=$(du -sm .whl | cut -f1)
echo ".whl: $(ls .whl | wc -l) wheels, ${size} MiB"
[ "$size" -le 64 ] || { echo "over the 64 MiB the device tool carries: $(ls -S .whl | head -5 | tr '\n' ' ')" >&2; exit 1; }
