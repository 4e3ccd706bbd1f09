"""One FlexAttention call over a packed 32k-token batch (64 clips of 410 tokens, filler to
the budget), compiled, with the engine's document block mask: how each part of a
score_mod costs on a GPU.

    python bench/flex_probe.py
"""

import time
import warnings

import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention

from emotion.engine.model import document_block_mask

warnings.filterwarnings("ignore")
H, D, dev = 16, 64, torch.device("cuda")
sizes = [410] * 64
doc = np.concatenate([np.repeat(np.arange(len(sizes)), sizes), -1 - np.arange(32768 - sum(sizes))]).astype(np.int32)
T = len(doc)
q, k, v = (torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
mask = document_block_mask(doc, dev)
docs = torch.from_numpy(doc).to(dev)
pos = torch.arange(T, device=dev, dtype=torch.float32)
on = torch.ones(T, device=dev)
extra = on == 0
unit = -torch.rand(H, device=dev)


def document(s, b, h, qi, ki):
    return torch.where(docs[qi] == docs[ki], s, -float("inf"))


def alibi(s, b, h, qi, ki):
    return torch.where(docs[qi] == docs[ki], s + unit[h] * (pos[qi] - pos[ki]).abs(), -float("inf"))


def alibi_bool_gather(s, b, h, qi, ki):
    bias = torch.where(extra[qi] | extra[ki], 0.0, -0.1 * (pos[qi] - pos[ki]).abs())
    return torch.where(docs[qi] == docs[ki], s + bias, -float("inf"))


def filler_by_index(s, b, h, qi, ki):  # filler as one document (-1) that attends to itself alone
    same = (docs[qi] == docs[ki]) & ((docs[qi] >= 0) | (qi == ki))
    return torch.where(same, s, -float("inf"))


def first_packed(s, b, h, qi, ki):  # the first packed version: bool gathers and filler by index
    bias = torch.where(extra[qi] | extra[ki], 0.0, unit[h] * (pos[qi] - pos[ki]).abs())
    same = (docs[qi] == docs[ki]) & ((docs[qi] >= 0) | (qi == ki))
    return torch.where(same, s + bias, -float("inf"))


def float_weights(s, b, h, qi, ki):  # float weights, a document per filler token, positions gathered
    return torch.where(docs[qi] == docs[ki], s + unit[h] * (pos[qi] - pos[ki]).abs() * on[qi] * on[ki], -float("inf"))


def alibi_only(s, b, h, qi, ki):  # distances from the indices; the document test left to the block mask, below
    return s + unit[h] * (qi - ki).abs() * on[qi] * on[ki]


def engine(s, b, h, qi, ki):  # the engine's now: float weights, distances from the indices
    return torch.where(docs[qi] == docs[ki], alibi_only(s, b, h, qi, ki), -float("inf"))


# The same blocks, the document test as their mask_mod: FlexAttention applies it only in
# blocks that straddle documents, where the score_mod above tests every visited score.
by_mask = document_block_mask(doc, dev)
by_mask.mask_mod = lambda b, h, qi, ki: docs[qi] == docs[ki]

attend = torch.compile(flex_attention, dynamic=False)
for name, score_mod, block_mask in [
    ("none, block-sparse", None, mask), ("none, dense", None, None), ("document", document, mask),
    ("document + ALiBi", alibi, mask), ("document + ALiBi + bool extra-token test", alibi_bool_gather, mask),
    ("document + filler by index", filler_by_index, mask), ("first packed version", first_packed, mask),
    ("float weights, positions gathered", float_weights, mask), ("engine now", engine, mask),
    ("engine now, document test as the mask_mod", alibi_only, by_mask),
]:
    torch._dynamo.reset()  # each its own compile: past 8 variants dynamo would run them eagerly
    attend(q, k, v, score_mod=score_mod, block_mask=block_mask)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(5):
        attend(q, k, v, score_mod=score_mod, block_mask=block_mask)
    torch.cuda.synchronize()
    print(f"{name}: {(time.perf_counter() - started) / 5 * 1000:.2f} ms", flush=True)
diff = (attend(q, k, v, score_mod=engine, block_mask=mask) - attend(q, k, v, score_mod=alibi_only, block_mask=by_mask)).abs().max()
print(f"engine now vs document test as the mask_mod: max difference {diff.item():.2e}")
