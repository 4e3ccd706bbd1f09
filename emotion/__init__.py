"""Speech emotion for voice bots: emotion2vec in-process, batched, with escalation rules.

The engine never imports Rasa; the Rasa actions live in ``emotion.rasa_actions``. Names
load on first use, so ``emotion.rules`` and ``emotion.windows`` stay light enough for the
Rasa Pro server's environment (PyYAML and numpy, which Rasa ships).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Decision": "emotion.rules",
    "EmotionEngine": "emotion.engine",
    "EmotionError": "emotion.errors",
    "EmotionResult": "emotion.windows",
    "EngineConfig": "emotion.config",
    "EscalationRule": "emotion.rules",
    "Segment": "emotion.windows",
    "Turn": "emotion.rules",
    "evaluate_rules": "emotion.rules",
    "load_rules": "emotion.rules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emotion' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
