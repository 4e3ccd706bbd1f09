"""Emotion over time for a supervisor reviewing a call (matplotlib, installed with the 'plot' extra)."""

from __future__ import annotations

from emotion.engine.core import EmotionResult
from emotion.errors import ConfigError

COLORS = {
    "angry": "#d62728", "disgusted": "#8c564b", "fearful": "#9467bd", "happy": "#2ca02c", "neutral": "#7f7f7f",
    "other": "#bcbd22", "sad": "#1f77b4", "surprised": "#ff7f0e", "unknown": "#c7c7c7",
}


def pyplot():
    """matplotlib's pyplot on a file backend, or a clear error when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("plotting needs matplotlib: pip install 'rasa-emotion2vec[plot]'") from exc
    return plt


def plot_timeline(result: EmotionResult, path: str, *, threshold: float = 0.7, title: str = "") -> None:
    """One line per emotion over time, with the escalation threshold drawn."""
    plt = pyplot()
    if not result.segments:
        raise ConfigError("plotting needs frame or segment granularity")
    segments = result.segments
    times = [(s.start_s + s.end_s) / 2 for s in segments]
    # Hold the first and last windows' values out to the edges of the audio.
    times = [segments[0].start_s, *times, segments[-1].end_s]
    fig, ax = plt.subplots(figsize=(10, 4), dpi=110)
    for label in result.scores:
        values = [s.scores[label] for s in segments]
        values = [values[0], *values, values[-1]]
        ax.plot(times, values, label=label, color=COLORS.get(label, "#333333"), linewidth=2 if label == result.emotion else 1.2)
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"escalation threshold {threshold:g}")
    ax.set_xlim(0, result.duration_s)
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    ax.set_title(title or "emotion over time", loc="left")
    ax.text(1.0, 1.02, f"overall: {result.emotion} {result.confidence:.2f}", transform=ax.transAxes, ha="right")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
