"""Prometheus metrics for the engine and the actions.

One registry per process; with the model in its own process, the action server sets
``PROMETHEUS_MULTIPROC_DIR`` before its workers start, and every worker's page shows the
sum over all of them and the engine process.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

TURNS = Counter("emotion_turns_total", "Turns seen, by outcome and path (webhook, api, predict)", ["outcome", "path"])
ERRORS = Counter("emotion_errors_total", "Turns that could not be analysed, by error code and path", ["code", "path"])
ESCALATIONS = Counter("emotion_escalations_total", "Escalations, by the rule that fired", ["rule"])
STAGE_SECONDS = Histogram("emotion_stage_seconds", "Time per stage of a turn", ["stage", "path"], buckets=_LATENCY_BUCKETS)
BATCH_SIZE = Histogram("emotion_batch_size", "Clips per inference batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_SECONDS = Histogram("emotion_batch_seconds", "Time per inference batch", buckets=_LATENCY_BUCKETS)
ALERTS = Counter("emotion_alerts_total", "Escalation alerts to EMOTION_ALERT_URL, by outcome", ["outcome"])

# The codes a label may take: a code from elsewhere (metadata.emotion.error.code is the
# gateway's word) counts as "upstream_error", so no caller can mint label values.
ERROR_CODES = frozenset({"bad_reference", "refused", "fetch_failed", "too_large", "decode_failed", "invalid_audio",
                         "model_unavailable", "inference_failed", "overloaded", "timeout", "bad_result", "bad_config",
                         "bad_request", "unauthorized", "internal", "analysis_unavailable", "upstream_error"})

__all__ = ["CONTENT_TYPE_LATEST", "page", "record_batch", "record_turn"]


def page(status: dict) -> bytes:
    """The /metrics page; the engine's gauges come from its status at scrape time, since
    gauges set in one process mean nothing summed over several."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    gauges = CollectorRegistry()
    gauges.register(_Gauges(status))
    return generate_latest(registry) + generate_latest(gauges)


class _Gauges:
    def __init__(self, status: dict) -> None:
        self.status = status

    def collect(self):
        yield GaugeMetricFamily("emotion_queue_depth", "Clips waiting for inference", value=self.status["queue_depth"])
        yield GaugeMetricFamily("emotion_model_ready", "1 once the model is loaded and warm", value=float(bool(self.status["ready"])))


def record_batch(size: int, seconds: float) -> None:
    BATCH_SIZE.observe(size)
    BATCH_SECONDS.observe(seconds)


def record_turn(path: str, *, timings_ms: dict[str, float] | None = None, error_code: str | None = None,
                outcome: str | None = None) -> None:
    """One turn on ``path``: tagged (with its stage timings), failed (with its code), or
    ``outcome`` as given (no_audio)."""
    if error_code is not None:
        TURNS.labels("error", path).inc()
        ERRORS.labels(error_code if error_code in ERROR_CODES else "upstream_error", path).inc()
        return
    TURNS.labels(outcome or "tagged", path).inc()
    for stage, ms in (timings_ms or {}).items():
        STAGE_SECONDS.labels(stage, path).observe(ms / 1000)
