"""Speech emotion for voice bots: emotion2vec in-process, batched, with escalation rules.

Three layers: ``emotion.engine`` (audio in, results out; never imports Rasa),
``emotion.serving`` (the Rasa plugin and actions, the analysis API) and ``emotion.tools``
(the command line). Names load on first use, so ``emotion.rules`` and
``emotion.engine.results`` stay light enough for Rasa Pro's environment (PyYAML and
numpy, which Rasa ships).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Decision": "emotion.rules",
    "EmotionEngine": "emotion.engine.core",
    "EmotionError": "emotion.errors",
    "EmotionResult": "emotion.engine.results",
    "EscalationRule": "emotion.rules",
    "Segment": "emotion.engine.results",
    "Settings": "emotion.settings",
    "Turn": "emotion.rules",
    "evaluate_rules": "emotion.rules",
    "load_rules": "emotion.rules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emotion' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
