"""Serving: the Rasa plugin and actions, the analysis API, the engine process, alerts,
metrics and the review page. Imports the engine; the engine never imports it."""
