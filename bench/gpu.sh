#!/usr/bin/env bash
# The GPU checks and benchmarks in one command, for a machine with an NVIDIA GPU and a CUDA
# torch already installed: the GPU tests, a profile of one packed batch, the engine's own
# event-loop cost (in process, and through an engine process fed by 8 workers), then
# `python bench/bench.py` on mixed 1-15 s turns, in-process and open-loop through the
# action server, then through the action server again with 8 Sanic workers sharing one
# engine process, and last the attention probe (bench/flex_probe.py). Wheels for the
# other packages may wait in .whl/ (a GPU machine without package index access:
# bench/wheels.sh makes them from the machine's `pip list --format=freeze`). Output
# goes to ${OUT:-bench/out}; BENCH_ARGS replaces the benchmark's arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__)'
python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning tests/test_gpu.py tests/test_model.py tests/test_engine_process.py 2>&1 | tail -5
python3 bench/profile_batch.py --size large --batch 64 --rows 30 >"$out/profile.txt" 2>&1
head -c 6000 "$out/profile.txt"
python3 bench/loop_cost.py --batch 64 2>/dev/null
python3 bench/loop_cost.py --batch 64 --workers 8 2>/dev/null
python3 bench/bench.py ${BENCH_ARGS:---size large --clips 2048 --baseline-clips 64 --concurrency 1 64 \
    --server-turns 4000 --server-rate 1000 --load-processes 8 --compare-fp32} >"$out/bench.json" 2>"$out/bench.log"
echo "bench exit $?"
tail -5 "$out/bench.log"
cat "$out/bench.json"
python3 bench/bench.py ${WORKERS_BENCH_ARGS:---size large --clips 64 --baseline-clips 8 --concurrency 1 \
    --server-turns 4000 --server-rate 1000 --load-processes 8 --server-workers 8} >"$out/bench-workers.json" 2>"$out/bench-workers.log"
echo "bench (8 workers) exit $?"
tail -5 "$out/bench-workers.log"
cat "$out/bench-workers.json"
python3 bench/flex_probe.py 2>&1 | tee "$out/flex_probe.txt"
