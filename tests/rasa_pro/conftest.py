"""Rasa Pro's own environment: keep its libraries off the network (LiteLLM would fetch a
price list from the internet on import; telemetry would phone home)."""

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["RASA_TELEMETRY_ENABLED"] = "false"
