# Your bot's own actions package: this one import adds emotion tagging and the handoff.
from emotion.rasa_actions import ActionAnalyzeEmotion, ActionHandoffToHuman  # noqa: F401
