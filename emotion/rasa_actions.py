"""Where a bot's ``actions`` package imports the emotion actions from (kept for that one line)."""

from emotion.serving.actions import ActionAnalyzeEmotion, ActionHandoffToHuman

__all__ = ["ActionAnalyzeEmotion", "ActionHandoffToHuman"]
