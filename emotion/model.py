"""emotion2vec through FunASR, with an exact padded-batch forward pass.

This is the only engine module that imports torch and funasr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from emotion.errors import InferenceFailed, ModelUnavailable, first_line
from emotion.windows import Head

try:
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # torch < 2.5; the engine turns this into ModelUnavailable naming the version
    raise ImportError(f"torch {torch.__version__} is too old: emotion2vec-rasa needs torch >= 2.5 (FlexAttention)") from None

log = logging.getLogger(__name__)

# Past this many bytes the model's ALiBi cache is dropped after a batch: it grows with
# heads x frames^2 and is never freed by FunASR.
ALIBI_CACHE_CAP_BYTES = 256 * 1024 * 1024
# The kernel stages a tile of the fp32 ALiBi bias in shared memory beside q, k and v; the
# default tiles (128 x 128, three stages on an H100) overflow it. Attention is ~4% of the
# FLOPs at turn lengths, so small tiles, chosen to leave room on GPUs with less shared
# memory than an H100 (only an H100 was tried), cost little.
FLEX_TILES = {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 2}
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


class EmotionModel:
    """One emotion2vec checkpoint, resident on one device, answering padded batches."""

    def __init__(self, model: str, *, hub: str = "ms", device: str = "auto", dtype: str = "auto", compile: str = "auto",
                 labels: tuple[str, ...] = ()) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        auto = _build_automodel(model, hub, self.device)
        self.net = auto.model
        self.funasr = auto
        tokens = list(auto.kwargs.get("token_list") or [])
        if self.net.proj is None or not tokens:
            raise ModelUnavailable(f"{model}: checkpoint has no classification head or no tokens.txt")
        # FunASR hides labels named 'unuse*' (the 4-class seed model pads its head with them).
        self._keep = [i for i, t in enumerate(tokens) if not t.startswith("unuse")]
        self.labels = [english_label(tokens[i]) for i in self._keep]
        if labels:
            # Scores renormalised over the labels an application uses: a softmax over their
            # logits alone (emotion2vec issue #41).
            missing = [lab for lab in labels if lab not in self.labels]
            if missing:
                raise ModelUnavailable(f"{model}: EMOTION_LABELS names {missing}, which this model lacks (it has {self.labels})")
            self._keep = [i for i, lab in zip(self._keep, self.labels) if lab in labels]
            self.labels = [lab for lab in self.labels if lab in labels]
        self.embed_dim = int(self.net.cfg.get("embed_dim"))
        self._lock = threading.Lock()
        self._head: Head | None = None
        self._sample_pad: torch.Tensor | None = None
        self._frame_keep: torch.Tensor | None = None
        _check_checkpoint(self.net, auto.kwargs.get("init_param"), model)
        self._install_padding_hooks()
        self._share_alibi_rows()
        if compile == "on" or (compile == "auto" and self.device.type == "cuda"):
            # The conv front end is memory-bound: eager runs it as dozens of transposes, casts
            # and layer norms over (batch x 512 x frames) tensors; Inductor fuses them.
            self.net.modality_encoders["AUDIO"].local_encoder.compile(dynamic=True)
            if self.device.type == "cuda":  # Inductor's CPU FlexAttention template fails to build
                # With FlexAttention the blocks have no data-dependent branch left, so each
                # compiles to one graph with its norms and residuals fused.
                for block in use_flex_attention(self.net):
                    block.compile(dynamic=True)

    @staticmethod
    def compiled_graphs() -> int:
        """Graphs torch.compile has built in this process so far (all models)."""
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _install_padding_hooks(self) -> None:
        # The 5-layer positional convolution sees padded frames of shorter clips and leaks
        # them into real frames (emotion2vec issue #37). Zeroing padded frames at the input
        # of each conv layer reproduces the zero padding a lone clip gets, so batched scores
        # equal one-by-one scores.
        encoder = self.net.modality_encoders["AUDIO"]
        positional = encoder.relative_positional_encoder

        def frame_mask(_module, args):
            if self._sample_pad is None:
                self._frame_keep = None
                return None
            pad = encoder.convert_padding_mask(args[0], self._sample_pad)
            self._frame_keep = (~pad).unsqueeze(1)
            return None

        def zero_padded(_module, args):
            if self._frame_keep is None:
                return None
            return (args[0] * self._frame_keep.to(args[0].dtype),)

        positional.register_forward_pre_hook(frame_mask)
        for module in positional.modules():
            if isinstance(module, torch.nn.Conv1d):
                module.register_forward_pre_hook(zero_padded)

    def _share_alibi_rows(self) -> None:
        # FunASR builds and caches the ALiBi bias once per clip of the batch (on the CPU, then
        # copied), so its cache grows with batch x frames^2 and is rebuilt whenever a batch is
        # larger or longer than any before. The bias is the same for every clip: build one and
        # view it per clip.
        encoder = self.net.modality_encoders["AUDIO"]
        build = encoder.get_alibi_bias
        if build is None:
            return

        def shared(batch_size, **kwargs):
            return build(batch_size=1, **kwargs).expand(batch_size, -1, -1, -1)

        encoder.get_alibi_bias = shared

    def forward(self, waves: list[np.ndarray], *, frames: bool = False, embeddings: bool = False) -> list[ClipOutput]:
        """Score clips of any lengths (16 kHz mono float32) in one padded forward pass."""
        with self._lock:
            try:
                return self._forward(waves, frames, embeddings)
            except torch.cuda.OutOfMemoryError as exc:
                raise InferenceFailed(f"GPU out of memory on a batch of {len(waves)} clips") from exc
            except RuntimeError as exc:
                raise InferenceFailed(f"inference failed: {first_line(exc)}") from exc
            finally:
                self._sample_pad = self._frame_keep = None
                self._trim_alibi_cache()

    @torch.inference_mode()
    def _forward(self, waves, frames, embeddings) -> list[ClipOutput]:
        lengths = torch.tensor([len(w) for w in waves])
        batch = torch.zeros(len(waves), int(lengths.max()), pin_memory=self.device.type == "cuda")
        for i, wave in enumerate(waves):
            batch[i, : len(wave)] = torch.from_numpy(wave)
        source = batch.to(self.device, non_blocking=True)
        padded = int(lengths.min()) < batch.shape[1]
        lengths = lengths.to(self.device, non_blocking=True)
        pad = torch.arange(batch.shape[1], device=self.device) >= lengths[:, None]
        if self.net.cfg.normalize:
            # FunASR's per-clip layer norm over the real samples only, on the device.
            n = lengths[:, None].to(source.dtype)
            centered = (source - source.sum(1, keepdim=True) / n).masked_fill(pad, 0)
            source = centered * torch.rsqrt(centered.square().sum(1, keepdim=True) / n + 1e-5)
        self._sample_pad = pad if padded else None
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.net.extract_features(source, padding_mask=self._sample_pad)
        x = out["x"].float()
        frame_pad = out["padding_mask"]
        keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if frame_pad is None else ~frame_pad
        counts = keep.sum(1)
        pooled = (x * keep.unsqueeze(-1)).sum(1) / counts.unsqueeze(-1)
        probs = self._probs(pooled).cpu().numpy()
        frame_probs = self._probs(x).cpu().numpy() if frames else None
        pooled_np = pooled.cpu().numpy() if embeddings else None
        x_np = x.cpu().numpy() if (frames and embeddings) else None
        results = []
        for i, n in enumerate(counts.tolist()):
            results.append(
                ClipOutput(
                    probs=probs[i],
                    embedding=None if pooled_np is None else pooled_np[i],
                    frame_probs=None if frame_probs is None else frame_probs[i, :n],
                    frame_embeddings=None if x_np is None else x_np[i, :n],
                    frames=n,
                )
            )
        return results

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

    def _trim_alibi_cache(self) -> None:
        cache = self.net.alibi_biases
        if sum(t.numel() * t.element_size() for t in cache.values()) > ALIBI_CACHE_CAP_BYTES:
            cache.clear()


class FlexAltAttention(torch.nn.Module):
    """FunASR's AltAttention with the ALiBi bias and the padding applied inside a FlexAttention
    kernel. FunASR's own forward writes batch x heads x frames^2 fp32 scores several times per
    layer (cast, bias add, mask, softmax); under bf16 that traffic was a fifth of a batch."""

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.inner = attn  # its qkv and proj weights, unchanged

    def forward(self, x, padding_mask=None, alibi_bias=None):
        a = self.inner
        batch, frames, dim = x.shape
        q, k, v = a.qkv(x).reshape(batch, frames, 3, a.num_heads, dim // a.num_heads).permute(2, 0, 3, 1, 4)

        def score_mod(score, b, h, q_idx, kv_idx):
            if alibi_bias is not None:
                score = score + alibi_bias[b, h, q_idx, kv_idx]
            if padding_mask is not None:
                score = torch.where(padding_mask[b, kv_idx], -float("inf"), score)
            return score

        # q, k and v are in the compute dtype already and the kernel adds the fp32 bias to
        # its fp32 scores; autocast is kept out so it cannot recast either.
        with torch.autocast(x.device.type, enabled=False):
            out = flex_attention(q, k, v, score_mod=score_mod, scale=a.scale, kernel_options=FLEX_TILES)
        return a.proj(out.transpose(1, 2).reshape(batch, frames, dim))


def use_flex_attention(net: torch.nn.Module) -> list[torch.nn.Module]:
    """Swap FlexAltAttention into every transformer block that fits it; return those blocks."""
    from funasr.models.emotion2vec.modules import AltBlock  # funasr is imported by now

    heads = net.modality_encoders["AUDIO"].modality_cfg.num_alibi_heads
    blocks = []
    for block in net.modules():
        attn = getattr(block, "attn", None)
        if isinstance(block, AltBlock) and not attn.cosine_attention and attn.num_heads == heads:
            block.attn = FlexAltAttention(attn)
            blocks.append(block)
    return blocks


def _build_automodel(model: str, hub: str, device: torch.device):
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().is_dir():
        raise ModelUnavailable(f"no model directory at {model}")
    if Path(model).exists() and not (Path(model) / "config.yaml").is_file():
        raise ModelUnavailable(f"{model}: not a FunASR model directory (config.yaml, model.pt, tokens.txt)")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.setLevel(max(level, logging.WARNING))  # FunASR's INFO chatter while it loads
    try:
        # FunASR prints a banner on import and configures the root logger; stdout is the
        # CLI's JSON, so its prints go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            from funasr import AutoModel

            # disable_update: FunASR otherwise asks PyPI for a newer release at every start.
            # ncpu: FunASR otherwise resets torch's global thread count.
            return AutoModel(
                model=model,
                hub=hub,
                device=str(device),
                disable_update=True,
                ncpu=torch.get_num_threads(),
                log_level="ERROR",
                disable_pbar=True,
            )
    except ModelUnavailable:
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {first_line(exc, 300)}"
        if not Path(model).exists():
            # FunASR reports a failed download as an unregistered model; say what to do.
            raise ModelUnavailable(
                f"could not download {model!r} from the {hub} hub ({reason}); on a machine without hub access, "
                "download it elsewhere and set EMOTION_MODEL to its directory"
            ) from exc
        raise ModelUnavailable(f"could not load model {model!r}: {reason}") from exc
    finally:
        # FunASR calls logging.basicConfig; the host application owns the root logger.
        root.handlers[:] = handlers
        root.setLevel(level)


def _check_checkpoint(net: torch.nn.Module, path: str | None, model: str) -> None:
    """FunASR skips checkpoint tensors that do not fit the config and keeps random
    weights in their place; refuse such a checkpoint instead."""
    if not path or not Path(path).is_file():
        raise ModelUnavailable(f"{model}: model.pt not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelUnavailable(f"{model}: model.pt is unreadable: {first_line(exc)}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    bad = []
    for name, tensor in net.state_dict().items():
        if ".decoder." in name or name.startswith("ema."):
            continue  # pre-training parts, unused at inference
        if name not in state:
            bad.append(f"{name} (missing)")
        elif tuple(state[name].shape) != tuple(tensor.shape):
            bad.append(f"{name} (checkpoint {tuple(state[name].shape)}, config {tuple(tensor.shape)})")
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ModelUnavailable(f"{model}: checkpoint does not match its config.yaml: {shown}")
