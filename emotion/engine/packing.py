"""Packing arithmetic: where each clip of a batch lies in one unpadded sequence.

Pure numpy, so it is tested and reasoned about without the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emotion.errors import InferenceFailed


@dataclass
class Pack:
    samples: int  # length of the packed input
    sample_start: list[int]  # where each clip starts in it
    frame_keep: np.ndarray  # (frames,) bool: the frame belongs to a clip
    token_row: np.ndarray  # (tokens,) which row of [extra tokens; frames] each token takes
    doc: np.ndarray  # (tokens,) int32: the clip, or -1 - index for filler
    is_extra: np.ndarray  # (tokens,) bool
    frame_tokens: np.ndarray  # the tokens of every clip's frames, clip after clip
    frame_counts: np.ndarray  # frames per clip


def plan_pack(lengths: list[int], *, frames, stride: int, receptive: int, extra: int, gap: int,
              budgets: tuple[int, ...] = ()) -> Pack:
    """Lay out clips of these sample lengths in one sequence. Clip c starts at frame m_c
    (sample m_c x stride), so its frames are exactly those it gets alone; ``gap`` frames
    separate it from the next. Its tokens are its ``extra`` tokens, then its frames. With
    ``budgets``, frames and tokens are rounded up to the smallest budget that holds both."""
    counts = np.array([frames(n) for n in lengths], dtype=np.int64)
    if (counts < 1).any():
        raise InferenceFailed("a clip is shorter than one frame")
    first = np.concatenate([[0], np.cumsum(counts + gap)[:-1]])
    n_frames = int(first[-1] + counts[-1])
    n_tokens = int(counts.sum()) + extra * len(counts)
    samples = int(first[-1]) * stride + lengths[-1]  # the last clip whole: its layer norm sees it all
    if budgets:
        # A frame to spare holds the last clip's samples past its last frame.
        fits = [b for b in budgets if b >= max(n_frames + 1, n_tokens)]
        if not fits:
            raise InferenceFailed(f"a batch of {n_tokens} tokens exceeds the largest budget ({budgets[-1]})")
        n_frames = n_tokens = fits[0]
        samples = (n_frames - 1) * stride + receptive
    if frames(samples) != n_frames:
        raise InferenceFailed(f"packing error: {samples} samples give {frames(samples)} frames, not {n_frames}")
    frame_keep = np.zeros(n_frames, bool)
    for m, n in zip(first, counts):
        frame_keep[m:m + n] = True
    per_clip = counts + extra
    clip_of = np.repeat(np.arange(len(counts)), per_clip)
    within = np.arange(len(clip_of)) - np.repeat(np.cumsum(per_clip) - per_clip, per_clip)
    is_extra = within < extra
    filler = n_tokens - len(clip_of)
    token_row = np.where(is_extra, within, extra + np.repeat(first, per_clip) + within - extra)
    return Pack(
        samples=samples,
        sample_start=(first * stride).tolist(),
        frame_keep=frame_keep,
        token_row=np.concatenate([token_row, np.zeros(filler, np.int64)]),
        doc=np.concatenate([clip_of, -1 - np.arange(filler)]).astype(np.int32),
        is_extra=np.concatenate([is_extra, np.ones(filler, bool)]),
        frame_tokens=np.flatnonzero(~is_extra),
        frame_counts=counts,
    )
