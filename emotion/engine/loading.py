"""Loading a checkpoint through FunASR's AutoModel: hub id or local directory, its chatter
kept off stdout and the root logger, its failures said as ModelUnavailable, its weights
checked against its config; and the facts about FunASR's emotion2vec that the torch forward
(model.py) and the ONNX export (onnx.py) both use.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path

import torch

from emotion.errors import ModelUnavailable, first_line


def build_automodel(model: str, hub: str, device: torch.device):
    """FunASR's AutoModel for a hub id or a local directory, on ``device``, its weights
    checked against its config."""
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().is_dir():
        raise ModelUnavailable(f"no model directory at {model}")
    if Path(model).exists() and not (Path(model) / "config.yaml").is_file():
        raise ModelUnavailable(f"{model}: not a FunASR model directory (config.yaml, model.pt, tokens.txt)")
    try:
        # FunASR prints a banner on import and configures the root logger; stdout is the
        # CLI's JSON, so its prints go to stderr.
        with _root_log_at(logging.WARNING), contextlib.redirect_stdout(sys.stderr):  # its INFO chatter while it loads
            from funasr import AutoModel

            # disable_update: FunASR otherwise asks PyPI for a newer release at every start.
            # ncpu: FunASR otherwise resets torch's global thread count.
            auto = AutoModel(model=model, hub=hub, device=str(device), disable_update=True, ncpu=torch.get_num_threads(),
                             log_level="ERROR", disable_pbar=True)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {first_line(exc, 300)}"
        if not Path(model).exists():
            # FunASR reports a failed download as an unregistered model; say what to do.
            raise ModelUnavailable(
                f"could not download {model!r} from the {hub} hub ({reason}); on a machine without hub access, "
                "download it elsewhere and set EMOTION_MODEL to its directory"
            ) from exc
        raise ModelUnavailable(f"could not load model {model!r}: {reason}") from exc
    _check_checkpoint(auto.model, auto.kwargs.get("init_param"), model)
    return auto


@contextlib.contextmanager
def _root_log_at(level: int):
    """The root logger at ``level`` or quieter meanwhile, then as it was: FunASR calls
    logging.basicConfig, and the host application owns the root logger."""
    root = logging.getLogger()
    handlers, before = list(root.handlers), root.level
    root.setLevel(max(before, level))
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(before)


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


def _scored(tokens: list[str]) -> list[int]:
    """The tokens generate() scores: FunASR hides labels named 'unuse*' (the 4-class seed
    model pads its head with them)."""
    return [i for i, t in enumerate(tokens) if not t.startswith("unuse")]


def _conv_layers(net: torch.nn.Module) -> list[tuple[int, int]]:
    """The conv front end's (kernel, stride) per layer."""
    return [(int(k), int(s)) for _dim, k, s in net.modality_encoders["AUDIO"].feature_enc_layers]


def _samples_for_frames(layers: list[tuple[int, int]], frames: int) -> int:
    """The fewest samples that give this many frames."""
    samples = 1
    for kernel, stride in reversed(layers):
        samples = (samples - 1) * stride + kernel
    return samples + (frames - 1) * math.prod(stride for _kernel, stride in layers)


def _alibi_unit(heads: int) -> torch.Tensor:
    """FunASR's ALiBi bias per head at a distance of one frame (-slope): at distance d it is d times this."""
    from funasr.models.emotion2vec.base import get_alibi  # funasr is imported by now

    return get_alibi(2, heads)[:, 0, 1].float()
