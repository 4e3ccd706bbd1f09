"""emotion2vec through FunASR, with an exact packed-batch forward pass.

With the model modules beside it (loading.py, onnx.py), the only engine module that imports
torch and funasr.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from emotion.engine import onnx
from emotion.engine.loading import _alibi_unit, _conv_layers, _samples_for_frames, _scored, build_automodel
from emotion.engine.packing import Pack, plan_pack
from emotion.engine.results import Head
from emotion.errors import ConfigError, InferenceFailed, ModelUnavailable, first_line
from emotion.settings import DEFAULT_ONNX_CACHE_DIR

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5; the engine turns this into ModelUnavailable naming the version
    raise ImportError(f"torch {torch.__version__} is too old: emotion2vec-rasa needs torch >= 2.5 (FlexAttention)") from None

log = logging.getLogger(__name__)

# Token budgets of a packed batch on the GPU: each is compiled once, at warm-up, for its
# fixed shape, so no graph is built while callers wait. 32k tokens hold 64 turns of 10 s.
TOKEN_BUDGETS = (2048, 4096, 8192, 16384, 32768)
MASK_BLOCK = 128  # FlexAttention's block size: the block mask is built at this grain
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ClipOutput:
    probs: np.ndarray  # (labels,)
    embedding: np.ndarray | None = None  # (dim,)
    frame_probs: np.ndarray | None = None  # (frames, labels)
    frame_embeddings: np.ndarray | None = None  # (frames, dim)
    frames: int = 0


def english_label(token: str) -> str:
    # FunASR labels read '生气/angry'; we keep the English half.
    if token == "<unk>":
        return "unknown"
    return token.rsplit("/", 1)[-1].strip().lower()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# What the onnx runtime needs, the export included: onnxruntime alone is not enough (Rasa Pro
# installs it without the other two).
ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")


def resolve_runtime(runtime: str, device: torch.device, dtype: str) -> str:
    """``auto``: ONNX Runtime on the CPU where the ``onnx`` extra is installed and the dtype
    is fp32; torch otherwise, and always on CUDA. Only what needs the device is checked here:
    Settings checks the rest (int8 only with ``onnx``, which runs no fp16 or bf16)."""
    if runtime == "auto":
        fits = device.type == "cpu" and dtype in ("auto", "float32")
        runtime = "onnx" if fits and all(importlib.util.find_spec(p) for p in ONNX_PACKAGES) else "torch"
    if runtime == "onnx" and device.type != "cpu":  # EMOTION_DEVICE=auto on a machine with a GPU
        raise ConfigError(f"EMOTION_RUNTIME=onnx runs on the CPU only, and EMOTION_DEVICE gives {device}: set "
                          "EMOTION_DEVICE=cpu or EMOTION_RUNTIME=torch")
    return runtime


class EmotionModel:
    """One emotion2vec checkpoint, resident on one device, answering packed batches.
    ``runtime="onnx"``: clips run one at a time through the checkpoint's ONNX export
    (``emotion.engine.onnx``) in place of FunASR's forward; labels and head stay the same."""

    def __init__(self, model: str, *, hub: str = "ms", device: str = "auto", dtype: str = "auto", compile: str = "auto",
                 labels: tuple[str, ...] = (), runtime: str = "torch", onnx_cache_dir: str = DEFAULT_ONNX_CACHE_DIR) -> None:
        self.device = resolve_device(device)
        self.runtime = resolve_runtime(runtime, self.device, dtype)
        self.dtype = resolve_dtype("float32" if self.runtime == "onnx" else dtype, self.device)
        self.precision = "int8" if dtype == "int8" else self.dtype_name
        auto = build_automodel(model, hub, self.device)
        self.net = auto.model
        self.funasr = auto
        tokens = list(auto.kwargs.get("token_list") or [])
        if self.net.proj is None or not tokens:
            raise ModelUnavailable(f"{model}: checkpoint has no classification head or no tokens.txt")
        self._keep = _scored(tokens)
        self.labels = [english_label(tokens[i]) for i in self._keep]
        if labels:
            # Scores renormalised over the labels an application uses: a softmax over their
            # logits alone (emotion2vec issue #41).
            missing = [lab for lab in labels if lab not in self.labels]
            if missing:
                raise ModelUnavailable(f"{model}: EMOTION_LABELS names {missing}, which this model lacks (it has {self.labels})")
            self._keep = [i for i, lab in zip(self._keep, self.labels) if lab in labels]
            self.labels = [lab for lab in self.labels if lab in labels]
        # make-checkpoint's marker: random weights, scores that mean nothing (/ready says so).
        self.test_checkpoint = bool(auto.kwargs.get("test_checkpoint"))
        self.embed_dim = int(self.net.cfg.get("embed_dim"))
        self._lock = threading.Lock()
        self._head: Head | None = None
        encoder = self.net.modality_encoders["AUDIO"]
        cfg = encoder.modality_cfg
        self._encoder = encoder
        self._conv_layers = _conv_layers(self.net)
        self.stride = int(np.prod([s for _k, s in self._conv_layers]))
        self._extra = int(cfg.num_extra_tokens)
        # Zero frames a packed clip needs on each side, so that the positional convolution
        # (each layer reaching this far) sees past its edges what a clip alone sees: zeros.
        self._gap = max(3, cfg.conv_pos_width // cfg.conv_pos_depth) // 2
        self._frame_keep: torch.Tensor | None = None
        self._onnx: onnx.OnnxFrames | None = None
        self.packs = False
        self.budgets: tuple[int, ...] = ()
        if self.runtime == "onnx":
            # Dropped before an export starts: its process loads the weights itself.
            self._drop_encoder()
            self._onnx = onnx.load_cached(auto, model, hub=hub, precision=self.precision,
                                          cache_dir=Path(onnx_cache_dir).expanduser(), threads=torch.get_num_threads())
            _release_freed()  # and what reading the file into the session took
            return
        self._install_gap_hooks()
        blocks = use_flex_attention(self.net)
        # Packing is exact where everything before attention works frame by frame.
        self.packs = bool(blocks) and cfg.extractor_mode == "layer_norm" and self._extra > 0
        if compile == "on" or (compile == "auto" and self.device.type == "cuda"):
            # The conv front end is memory-bound: eager runs it as dozens of transposes, casts
            # and layer norms over (512 x frames) tensors; Inductor fuses them.
            cuda = self.device.type == "cuda"
            encoder.local_encoder.compile(dynamic=not (cuda and self.packs))
            if cuda and self.packs:  # Inductor's CPU FlexAttention template fails to build
                # One static graph per budget, built at warm-up: nothing compiles while serving.
                self.budgets = TOKEN_BUDGETS
                for block in blocks:
                    block.compile(dynamic=False)

    def _drop_encoder(self) -> None:
        # The ONNX session holds its own copy of every weight but the head's: the torch
        # copies would only take memory.
        self.net.modality_encoders = torch.nn.ModuleDict()
        self.net.blocks = torch.nn.ModuleList()
        self.net.norm = None
        self._encoder = None
        _release_freed()

    @staticmethod
    def compiled_graphs() -> int:
        """Graphs torch.compile has built in this process so far (all models)."""
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _install_gap_hooks(self) -> None:
        # The 5-layer positional convolution would leak a packed clip's neighbours into its
        # edge frames (emotion2vec issue #37 is the padded-batch form of this). Zeroing every
        # frame outside a clip at the input of each conv layer gives each clip the zero
        # padding it gets alone, so packed scores equal one-by-one scores.
        def zero_between_clips(_module, args):
            if self._frame_keep is None:
                return None
            return (args[0] * self._frame_keep,)

        for module in self._encoder.relative_positional_encoder.modules():
            if isinstance(module, torch.nn.Conv1d):
                module.register_forward_pre_hook(zero_between_clips)

    def frames(self, samples: int) -> int:
        """Frames the conv front end gives for a clip of this many samples (FunASR's formula)."""
        for kernel, stride in self._conv_layers:
            samples = (samples - kernel) // stride + 1
        return max(samples, 0)

    def tokens(self, samples: int) -> int:
        """What a clip costs in a packed batch: its frames and its extra tokens."""
        return self.frames(samples) + self._extra

    @property
    def max_batch_tokens(self) -> int | None:
        return self.budgets[-1] if self.budgets else None

    def forward(self, waves: list[np.ndarray], *, frames: bool = False, embeddings: bool = False) -> list[ClipOutput]:
        """Score clips of any lengths (16 kHz mono float32), packed into one forward pass."""
        with self._lock:
            try:
                with torch.inference_mode():
                    with self._autocast():
                        # Packed only where attention is a compiled kernel: unfused, FlexAttention
                        # would write the whole packed sequence's (tokens x tokens) scores.
                        if self.budgets:
                            rows, counts = self._packed(waves)
                        else:  # FunASR's own forward, a clip at a time (the CPU's best too)
                            rows, counts = self._alone(waves)
                    # The head and the pooling in fp32, outside autocast: under CPU autocast
                    # the head's linear would come back in bf16, which numpy cannot take.
                    return self._outputs(rows.float(), counts, frames, embeddings)
            except torch.cuda.OutOfMemoryError as exc:
                raise InferenceFailed(f"GPU out of memory on a batch of {len(waves)} clips") from exc
            except RuntimeError as exc:
                raise InferenceFailed(f"inference failed: {first_line(exc)}") from exc
            finally:
                self._frame_keep = None

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _alone(self, waves):
        if self._onnx is not None:
            rows = [torch.from_numpy(self._onnx(wave)) for wave in waves]
            return torch.cat(rows), [len(r) for r in rows]
        rows = []
        for wave in waves:
            source = torch.from_numpy(wave).to(self.device)[None]
            if self.net.cfg.normalize:
                source = F.layer_norm(source, source.shape)
            rows.append(self.net.extract_features(source, padding_mask=None)["x"][0])
        return torch.cat(rows), [len(r) for r in rows]

    def _packed(self, waves):
        """All clips in one sequence (batch of one), with no padding between them: clips start
        at multiples of the conv stride, so each clip's frames are the frames it gets alone;
        each clip gets its own extra tokens; attention stays within a clip (a document mask)
        and ALiBi is computed from distances within the clip."""
        pack = plan_pack([len(w) for w in waves], frames=self.frames, stride=self.stride,
                         receptive=self.frames_to_samples(1), extra=self._extra, gap=self._gap, budgets=self.budgets)
        dev = self.device
        pinned = dev.type == "cuda"
        buf = torch.zeros(pack.samples, pin_memory=pinned)
        for wave, start in zip(waves, pack.sample_start):
            buf[start:start + len(wave)] = torch.from_numpy(wave)
        x = buf.to(dev, non_blocking=True)
        if self.net.cfg.normalize:  # FunASR's per-clip layer norm, over each whole clip
            x = _normalise_regions(x, waves, pack, dev)

        def send(array):
            return torch.from_numpy(array).to(dev, non_blocking=True)

        enc = self._encoder
        self._frame_keep = send(pack.frame_keep)[None, None]
        x = enc.local_features(x[None])
        x = x + enc.relative_positional_encoder(x)
        self._frame_keep = None
        rows = torch.cat([enc.extra_tokens[0].to(x.dtype), x[0]])  # the extra tokens, then every frame
        x = rows[send(pack.token_row)][None]
        packing = Packing(send(pack.doc), send((~pack.is_extra).astype(np.float32)), document_block_mask(pack.doc, dev))
        # FunASR's context encoder and blocks, as its own forward runs them, told where each
        # token belongs in place of a padding mask.
        x = enc.context_encoder(x, packing, None, None)
        for block in self.net.blocks:
            x, _ = block(x, padding_mask=packing, alibi_bias=None)
        if self.net.norm is not None:
            x = self.net.norm(x)
        return x[0, send(pack.frame_tokens)], pack.frame_counts.tolist()

    def frames_to_samples(self, frames: int) -> int:
        """The fewest samples that give this many frames."""
        return _samples_for_frames(self._conv_layers, frames)

    def _outputs(self, x: torch.Tensor, counts: list[int], frames: bool, embeddings: bool) -> list[ClipOutput]:
        """Per-clip results from every clip's frame rows, one after another."""
        pooled = _segment_means(x, counts)
        probs = self._probs(pooled).cpu().numpy()
        frame_probs = np.split(self._probs(x).cpu().numpy(), np.cumsum(counts)[:-1]) if frames else None
        pooled_np = pooled.cpu().numpy() if embeddings else None
        x_np = np.split(x.cpu().numpy(), np.cumsum(counts)[:-1]) if (frames and embeddings) else None
        return [
            ClipOutput(
                probs=probs[i],
                embedding=None if pooled_np is None else pooled_np[i],
                frame_probs=None if frame_probs is None else frame_probs[i],
                frame_embeddings=None if x_np is None else x_np[i],
                frames=n,
            )
            for i, n in enumerate(counts)
        ]

    @property
    def head(self) -> Head:
        """The classification head on the host, so long turns are aggregated without
        touching the device (and without waiting behind the batch in flight)."""
        if self._head is None:
            proj = self.net.proj
            self._head = Head(
                tuple(self.labels),
                proj.weight.detach().float().cpu().numpy()[self._keep],
                proj.bias.detach().float().cpu().numpy()[self._keep],
            )
        return self._head

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.net.proj.weight.float(), self.net.proj.bias.float())
        return torch.softmax(logits[..., self._keep], dim=-1)


def _release_freed() -> None:
    gc.collect()
    # glibc keeps most of what was freed in its heap, counted as resident, until asked.
    with contextlib.suppress(OSError, AttributeError):  # another libc: nothing to ask
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Packing(NamedTuple):
    """Where each token of a packed sequence belongs; handed to the blocks in place of a
    padding mask."""

    doc: torch.Tensor  # its clip; each filler token (rounding a batch up to its budget) alone: -1 - index
    # 1 for a frame, 0 for a clip's extra tokens: no ALiBi bias to or from them. A float, not
    # a bool: gathering bools inside the kernel made it 30 times slower on an H100.
    alibi_on: torch.Tensor
    block_mask: BlockMask


class FlexAltAttention(torch.nn.Module):
    """FunASR's AltAttention on a packed sequence: a FlexAttention kernel keeps each token
    within its clip and adds the clip's ALiBi bias from token distances, so nothing of size
    tokens^2 is ever written. Without a Packing it is FunASR's own attention, unchanged."""

    def __init__(self, attn: torch.nn.Module, alibi_unit: torch.Tensor) -> None:
        super().__init__()
        self.inner = attn  # its qkv and proj weights, unchanged
        # This layer's bias per head for a distance of one frame (FunASR's scale included).
        self.register_buffer("alibi_unit", alibi_unit, persistent=False)

    def forward(self, x, padding_mask=None, alibi_bias=None):
        if not isinstance(padding_mask, Packing):
            return self.inner(x, padding_mask, alibi_bias)
        a, unit = self.inner, self.alibi_unit
        doc, on, block_mask = padding_mask
        batch, tokens, dim = x.shape
        q, k, v = a.qkv(x).reshape(batch, tokens, 3, a.num_heads, dim // a.num_heads).permute(2, 0, 3, 1, 4)

        def score_mod(score, b, h, q_idx, kv_idx):
            # A clip's frames are consecutive tokens: their distance in the clip is their
            # distance in the sequence, and no position need be looked up.
            bias = unit[h] * (q_idx - kv_idx).abs() * on[q_idx] * on[kv_idx]
            return torch.where(doc[q_idx] == doc[kv_idx], score + bias, -float("inf"))

        # q, k and v are in the compute dtype; the kernel adds the fp32 bias to its fp32
        # scores. Autocast is kept out so it cannot recast either.
        with torch.autocast(x.device.type, enabled=False):
            out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=a.scale)
        return a.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def use_flex_attention(net: torch.nn.Module) -> list[torch.nn.Module]:
    """Swap FlexAltAttention into every transformer block (context encoder, then the main
    blocks); return those blocks, or none if any block does not fit it."""
    from funasr.models.emotion2vec.modules import AltBlock  # funasr is imported by now

    enc = net.modality_encoders["AUDIO"]
    cfg = enc.modality_cfg
    blocks = list(enc.context_encoder.blocks) + list(net.blocks)
    heads = cfg.num_alibi_heads
    if cfg.get("learned_alibi") or not all(
        isinstance(b, AltBlock) and not b.attn.cosine_attention and b.attn.num_heads == heads for b in blocks
    ):
        return []
    unit = _alibi_unit(heads).to(next(net.parameters()).device)
    if enc.get_alibi_bias is None:
        unit = torch.zeros_like(unit)
    # FunASR's scale: clamped at 0, one for all layers or one per layer, per head or shared.
    scale = enc.alibi_scale.detach().float().clamp_min(0) if enc.alibi_scale is not None else torch.ones(1, 1, 1, 1, 1)
    for layer, block in enumerate(blocks):
        block.attn = FlexAltAttention(block.attn, unit * scale[layer if scale.size(0) > 1 else 0].flatten().to(unit.device))
    return blocks


def document_block_mask(doc: np.ndarray, device: torch.device, block: int = MASK_BLOCK) -> BlockMask:
    """The blocks of the (tokens x tokens) score matrix that attention must visit when
    tokens attend within their document alone (each document's tokens contiguous): the
    block-sparse layout FlexAttention skips by. Blocks inside one document are full; the
    others are left to the score_mod's mask."""
    change = np.flatnonzero(np.diff(doc)) + 1
    lo = np.repeat(np.concatenate([[0], change]), np.diff(np.concatenate([[0], change, [len(doc)]])))
    hi = np.repeat(np.concatenate([change, [len(doc)]]), np.diff(np.concatenate([[0], change, [len(doc)]])))
    starts = np.arange(0, len(doc), block)
    ends = np.minimum(starts + block, len(doc))
    first_kv, last_kv = lo[starts] // block, (hi[ends - 1] - 1) // block
    j = np.arange(len(starts))[None, :]
    visit = (j >= first_kv[:, None]) & (j <= last_kv[:, None])
    one_doc = (doc[starts] == doc[ends - 1])[:, None]
    full = one_doc & (starts[None, :] >= lo[starts][:, None]) & (ends[None, :] <= hi[starts][:, None])

    def blocks(which):
        counts = torch.from_numpy(which.sum(1).astype(np.int32))[None, None]
        order = torch.from_numpy(np.argsort(~which, axis=1, kind="stable").astype(np.int32))[None, None]
        return counts.to(device), order.to(device)

    return BlockMask.from_kv_blocks(*blocks(visit & ~full), *blocks(full), BLOCK_SIZE=block, seq_lengths=(len(doc), len(doc)))


def _segment_means(x: torch.Tensor, counts) -> torch.Tensor:
    """Means of consecutive runs of rows (``counts`` rows each, none for an empty run) from
    an fp64 running sum: no atomics to contend for however few and long the runs."""
    counts = torch.as_tensor(counts, device=x.device)
    ends = counts.cumsum(0)
    total = torch.cat([x.new_zeros((1, *x.shape[1:]), dtype=torch.float64), x.double().cumsum(0)])
    n = counts.clamp_min(1).double().view(-1, *[1] * (x.dim() - 1))
    return ((total[ends] - total[ends - counts]) / n).to(x.dtype)


def _normalise_regions(x: torch.Tensor, waves, pack: Pack, device) -> torch.Tensor:
    """FunASR's layer norm over each whole clip (mean and variance of its samples, eps 1e-5),
    on the device: the packed input is cut into regions, each clip and each gap around
    clips; a gap's samples are zeros and stay zeros."""
    bounds = []
    for start, wave in zip(pack.sample_start, waves):
        bounds += [start, start + len(wave)]
    lengths = torch.from_numpy(np.diff([0, *bounds, pack.samples])).to(device)
    region = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=pack.samples)
    centered = x - _segment_means(x, lengths)[region]
    return centered * torch.rsqrt(_segment_means(centered.square(), lengths) + 1e-5)[region]

