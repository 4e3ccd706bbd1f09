"""The ready-to-run actions package: ``rasa run actions`` serves emotion tagging and handoff.

In your own bot, add this one import to your ``actions`` package instead.
"""

from emotion.rasa_actions import ActionAnalyzeEmotion, ActionHandoffToHuman  # noqa: F401
