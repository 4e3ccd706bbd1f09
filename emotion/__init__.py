"""Speech emotion for voice bots: emotion2vec in-process, batched, with escalation rules.

The engine never imports Rasa; the Rasa actions live in ``emotion.rasa_actions``.
"""

from emotion.config import EngineConfig
from emotion.engine import EmotionEngine, EmotionResult, Segment
from emotion.errors import EmotionError
from emotion.rules import Decision, EscalationRule, Turn, evaluate_rules, load_rules

__all__ = [
    "Decision",
    "EmotionEngine",
    "EmotionError",
    "EmotionResult",
    "EngineConfig",
    "EscalationRule",
    "Segment",
    "Turn",
    "evaluate_rules",
    "load_rules",
]
