"""The engine: fetch → decode → plan → batch → model → result. It never imports Rasa.

One module per stage: ``fetch`` (audio references), ``audio`` (decoding), ``plan`` (a turn
as clips and back), ``batching``, ``packing`` and ``model`` (torch and FunASR, nowhere
else), ``results``, ``backend`` (where inference runs: the interface, and the model in this
process), ``cpu`` (CPU time by thread role) and ``core`` (the engine). Names load on first
use, so the light modules (``results``) import without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"Backend": "emotion.engine.backend", "EmotionEngine": "emotion.engine.core", "EmotionResult": "emotion.engine.results",
            "InProcessBackend": "emotion.engine.backend", "Segment": "emotion.engine.results"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emotion.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
