"""Where a packed batch spends its GPU time: torch profiler over one batch of the engine
(mixed lengths, as the benchmark draws them).

    python bench/profile_batch.py --size large --batch 64 --seconds 1 15 [--cudnn-benchmark]
"""

import argparse
import tempfile
import time

import numpy as np
import torch

from emotion.engine.model import EmotionModel
from emotion.tools.checkpoint import write_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("--size", default="large")
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--seconds", type=float, nargs=2, default=(1.0, 15.0))
parser.add_argument("--dtype", default="auto")
parser.add_argument("--cudnn-benchmark", action="store_true")
parser.add_argument("--compile", default="auto")
parser.add_argument("--rows", type=int, default=25)
args = parser.parse_args()
torch.backends.cudnn.benchmark = args.cudnn_benchmark

with tempfile.TemporaryDirectory() as tmp:
    model = EmotionModel(str(write_checkpoint(tmp, size=args.size)), dtype=args.dtype, compile=args.compile)
rng = np.random.default_rng(0)
waves = [(rng.standard_normal(int(s * 16000)) * 0.1).astype(np.float32) for s in rng.uniform(*args.seconds, args.batch)]
for _ in range(3):
    model.forward(waves)
torch.cuda.synchronize()
started = time.perf_counter()
for _ in range(5):
    model.forward(waves)
torch.cuda.synchronize()
per_batch = (time.perf_counter() - started) / 5
print(f"{model.dtype_name} batch {args.batch} x {args.seconds} s, {sum(map(len, waves)) / 16000:.0f} s of audio: {per_batch * 1000:.1f} ms/batch, {args.batch / per_batch:.0f} clips/s")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    model.forward(waves)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
