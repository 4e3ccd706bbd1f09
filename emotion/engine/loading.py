"""Loading a checkpoint through FunASR's AutoModel: hub id or local directory, its chatter
kept off stdout and the root logger, its failures said as ModelUnavailable.

Shared by the torch forward (model.py) and the ONNX export (onnx.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import torch

from emotion.errors import ModelUnavailable, first_line


def build_automodel(model: str, hub: str, device: torch.device):
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
