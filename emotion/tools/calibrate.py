"""``python -m emotion calibrate``: escalation thresholds from your own labelled calls.

A rule matches a turn whose top emotion is one of its ``emotions`` with a confidence of at
least ``min_confidence``. For each set of emotions the rules use, this measures precision
(of the turns the threshold flags, how many carry that label) and recall (of the turns that
carry it, how many are flagged) at every threshold from 0.00 to 1.00 in steps of 0.01 (the
step a rules file is written in), and finds the lowest threshold whose precision reaches the
target. A threshold measured on fewer labelled turns than ``min_positives`` is reported as
unreliable, never recommended.
"""

from __future__ import annotations

import bisect
import csv
import datetime
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emotion.errors import ConfigError
from emotion.rules import DEFAULT_RULES_YAML, EscalationRule, parse_rules
from emotion.settings import LABELS
from emotion.tools.console import Progress
from emotion.tools.evaluate import label_map, labelled_results, read_labels

THRESHOLDS = tuple(i / 100 for i in range(101))  # as a rules file writes them: 0.81 is float("0.81")
DEFAULT_PRECISION = 0.9
DEFAULT_MIN_POSITIVES = 30


@dataclass(frozen=True)
class _Scored:
    """A result as an ``analyze --csv`` row keeps it."""

    emotion: str
    confidence: float


def calibration_report(turns: Sequence[tuple[str, str, float]], rules: Sequence[EscalationRule], *,
                       target_precision: float = DEFAULT_PRECISION, min_positives: int = DEFAULT_MIN_POSITIVES) -> dict[str, Any]:
    """``turns``: ``(truth, emotion, confidence)`` per labelled turn. One entry in ``targets``
    per set of emotions the rules use, in the rules' order."""
    groups: list[frozenset[str]] = []
    for rule in rules:
        if rule.emotions not in groups:
            groups.append(rule.emotions)
    labelled = Counter(truth for truth, _, _ in turns)
    return {
        "turns": len(turns),
        "target_precision": target_precision,
        "min_positives": min_positives,
        "labelled": dict(sorted(labelled.items())),
        "targets": [_target(group, [r for r in rules if r.emotions == group], turns, target_precision, min_positives)
                    for group in groups],
    }


def _target(emotions: frozenset[str], rules: list[EscalationRule], turns, target: float, min_positives: int) -> dict[str, Any]:
    # A confidence as results report it (6 decimals): a score of 0.9 that the model computes
    # as 0.89999998 meets a threshold of 0.9 here, as it reads in the result.
    flagged = sorted(round(conf, 6) for _, emotion, conf in turns if emotion in emotions)
    hits = sorted(round(conf, 6) for truth, emotion, conf in turns if emotion in emotions and truth in emotions)
    positives = sum(truth in emotions for truth, _, _ in turns)

    def at(threshold: float) -> dict[str, Any]:
        n = len(flagged) - bisect.bisect_left(flagged, threshold)
        tp = len(hits) - bisect.bisect_left(hits, threshold)
        return {"threshold": threshold, "precision": round(tp / n, 4) if n else None,
                "recall": round(tp / positives, 4) if positives else None, "flagged": n, "true_positives": tp,
                "escalations_per_1000": round(1000 * n / len(turns), 1) if turns else None}

    curve = [at(t) for t in THRESHOLDS]
    reaching = next((p for p in curve if p["precision"] is not None and p["precision"] >= target), None)
    name = "/".join(sorted(emotions))
    out: dict[str, Any] = {
        "emotions": sorted(emotions), "positives": positives,
        "rules": [{"name": r.name, **at(r.min_confidence)} for r in rules],
        "curve": curve, "threshold": None, "reliable": positives >= min_positives, "recommended": None,
    }
    if reaching is not None:
        out.update({k: reaching[k] for k in ("threshold", "precision", "recall", "flagged", "true_positives", "escalations_per_1000")})
    where = f"{positives} labelled {name} turn{'s' if positives != 1 else ''} of {len(turns)}"
    if not positives:
        out["note"] = f"no labelled {name} turns: nothing to measure"
    elif reaching is None:
        best = max((p for p in curve if p["precision"] is not None), key=lambda p: p["precision"], default=None)
        out["note"] = f"no threshold reaches precision {target:g} on {where}" + (
            f" (the best is {best['precision']:.4f}, at {best['threshold']:.2f})" if best else " (no turn is flagged)")
    elif not out["reliable"]:
        out["note"] = (f"{reaching['threshold']:.2f} is unreliable, not recommended: measured on {where}, "
                       f"fewer than {min_positives}")
    else:
        out["recommended"] = reaching["threshold"]
        out["note"] = f"the lowest threshold with precision >= {target:g} on {where}"
    return out


def calibrate(engine, args) -> int:
    """The command: score (or read the scores of) the labelled files, then report."""
    text, where = _rules_source(args.rules)
    rules = parse_rules(text, where=where, labels=LABELS)
    rows = read_labels(args.labels)
    with Progress(len(rows), enabled=not args.scores) as progress:
        if args.scores:
            found, labels = scores_from_csv(args.scores)
            results = ((file, found.get(_key(file)) or {"code": "no_score", "message": "no row for this file in --scores"})
                       for file, _, _ in rows)
            label_list = lambda: labels  # noqa: E731
        else:
            from emotion.tools.exports import analyze_files

            results = analyze_files(engine, [file for file, _, _ in rows], progress=progress, hold_library_output=not args.verbose)
            label_list = lambda: engine.labels  # noqa: E731
        turns, failures, failed_files = labelled_results(results, rows, label_list, label_map(args.map), progress=progress,
                                                         quiet=args.json)
    report = calibration_report(turns, rules, target_precision=args.precision, min_positives=args.min_positives)
    report["labels_file"] = args.labels
    report["rules_file"] = where
    if args.scores:
        report["scores"] = list(args.scores)
    else:
        report["model"] = engine.settings.model
        model = engine.backend.model
        report["test_checkpoint"] = bool(model is not None and model.test_checkpoint)
    report["failed"] = dict(failures)
    report["failed_files"] = failed_files
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(as_text(report))
    if args.plot:
        plot_calibration(report, args.plot)
    if args.suggest_rules:
        Path(args.suggest_rules).write_text(suggested_rules(report, text), encoding="utf-8")
    return 0 if turns else 1


def _rules_source(path: str | None) -> tuple[str, str]:
    """The rules' YAML and where it came from: ``--rules``, else EMOTION_RULES, else the default."""
    if path is None:
        from emotion.settings import Settings

        path = Settings.from_env().rules_path
    if path is None:
        return DEFAULT_RULES_YAML, "default rules"
    try:
        return Path(path).read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read rules file {path}: {exc}") from None


def _key(file: str) -> str:
    return str(Path(file).resolve())


def scores_from_csv(paths: Sequence[str]) -> tuple[dict[str, _Scored | dict], list[str]]:
    """Results from ``analyze --csv`` files (one row per file), by the file's resolved path
    (relative paths as analyze wrote them: from the folder calibrate runs in), and the
    labels their score columns name."""
    found: dict[str, _Scored | dict] = {}
    labels: list[str] = []
    for path in paths:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                if "start_s" in header or not {"file", "emotion", "confidence", "error"} <= set(header):
                    raise ConfigError(f"--scores {path}: expected the CSV of `analyze --csv` with one row per file "
                                      "(without --granularity)")
                labels += [h for h in header[header.index("confidence") + 1 : header.index("duration_s")] if h not in labels]
                for row in reader:
                    if row["error"]:
                        code, _, message = row["error"].partition("] ")
                        found[_key(row["file"])] = {"code": code.lstrip("["), "message": message}
                    else:
                        found[_key(row["file"])] = _Scored(row["emotion"], float(row["confidence"]))
        except OSError as exc:
            raise ConfigError(f"--scores: cannot read {path}: {exc.strerror or exc}") from None
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"--scores {path}: malformed row: {exc}") from None
    return found, labels


def as_text(report: dict) -> str:
    failed = sum(report.get("failed", {}).values())
    lines = [f"calibrated on {report['turns']} labelled turns (failed: {failed}); target precision {report['target_precision']:g}; "
             f"a threshold is recommended only from at least {report['min_positives']} labelled turns of its emotion"]
    if report.get("test_checkpoint"):
        lines.append("warning: the model is a random-weight test checkpoint (make-checkpoint); these figures mean nothing")
    for target in report["targets"]:
        name, n = "/".join(target["emotions"]), target["positives"]
        lines += ["", f"{name}: {n} labelled {name} turns of {report['turns']}"]
        for rule in target["rules"]:
            lines.append(f"  now      {rule['name']} {rule['threshold']:.2f}: {_figures(rule, n, name)}")
        if target["threshold"] is not None:
            verdict = "recommended" if target["recommended"] is not None else "UNRELIABLE, not recommended"
            lines.append(f"  lowest reaching precision {report['target_precision']:g}: {target['threshold']:.2f}: "
                         f"{_figures(target, n, name)} ({verdict})")
        lines.append(f"  {target['note']}")
        lines.append("  threshold    precision  recall  flagged")
        for low, high, point in _runs(target["curve"]):
            span = f"{low:.2f}" if low == high else f"{low:.2f}-{high:.2f}"
            precision = "-" if point["precision"] is None else f"{point['precision']:.4f}"
            recall = "-" if point["recall"] is None else f"{point['recall']:.4f}"
            lines.append(f"  {span:<11}  {precision:>9}  {recall:>6}  {point['flagged']:>7}")
    return "\n".join(lines)


def _figures(point: dict, positives: int, name: str) -> str:
    precision = "-" if point["precision"] is None else f"{point['precision']:.4f}"
    recall = "-" if point["recall"] is None else f"{point['recall']:.4f}"
    return (f"precision {precision} ({point['true_positives']} of {point['flagged']} flagged), "
            f"recall {recall} (of {positives} {name}), {point['escalations_per_1000']} escalations per 1,000 turns")


def _runs(curve: list[dict]):
    """The curve as runs of thresholds with the same counts: (first, last, point)."""
    start = 0
    for i in range(1, len(curve) + 1):
        if i == len(curve) or (curve[i]["flagged"], curve[i]["true_positives"]) != (curve[start]["flagged"], curve[start]["true_positives"]):
            yield curve[start]["threshold"], curve[i - 1]["threshold"], curve[start]
            start = i


def suggested_rules(report: dict, source_yaml: str) -> str:
    """The rules file with each rule's min_confidence set to the recommended threshold of its
    emotions (left as it was where none is recommended), each with a comment on what was measured."""
    raw = yaml.safe_load(source_yaml)["rules"]
    by_emotions = {tuple(t["emotions"]): t for t in report["targets"]}
    when = datetime.date.today().isoformat()
    out = [f"# Escalation rules suggested by `python -m emotion calibrate` on {when} from {report.get('labels_file', 'labels')}:",
           f"# {report['turns']} labelled turns, target precision {report['target_precision']:g}; a threshold is recommended only",
           f"# from at least {report['min_positives']} labelled turns of its emotion. Measured on those calls alone: review before use.",
           "# Escalations per 1,000 turns count the turns the threshold alone flags; consecutive_turns, at_least,",
           "# text_contains and cooldown_turns only ever lower them.",
           "rules:"]
    for rule in raw:
        emotions = rule["emotions"] if isinstance(rule["emotions"], list) else [rule["emotions"]]
        target = by_emotions[tuple(sorted(emotions))]
        was = float(rule.get("min_confidence", 0.0))
        name = "/".join(target["emotions"])
        if target["recommended"] is not None:
            rule = {**rule, "min_confidence": target["recommended"]}
            comment = (f"{name}: {target['recommended']:.2f} (was {was:g}): {target['note']}: precision {target['precision']:.4f}, "
                       f"recall {target['recall']:.4f}, {target['escalations_per_1000']} escalations per 1,000 turns")
        else:
            comment = f"{name}: kept at {was:g}: {target['note']}"
        out += [f"  # {line}" for line in _wrapped(comment)]
        dumped = yaml.dump(rule, Dumper=_RulesDumper, sort_keys=False, allow_unicode=True).splitlines()
        out += [f"  - {dumped[0]}", *(f"    {line}" for line in dumped[1:])]
    return "\n".join(out) + "\n"


class _RulesDumper(yaml.SafeDumper):
    """Rules as people write them: a mapping a line, lists inline (``emotions: [angry]``)."""


_RulesDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def _wrapped(text: str, width: int = 100) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line]


def plot_calibration(report: dict, path: str) -> None:
    """Precision against recall per set of emotions, the current rules' thresholds and the
    lowest reaching the target marked."""
    from emotion.tools.plot import COLORS, pyplot

    plt = pyplot()
    targets = report["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.6 * len(targets), 4.4), dpi=110, squeeze=False)
    for ax, target in zip(axes[0], targets):
        name, color = "/".join(target["emotions"]), COLORS.get(target["emotions"][0], "#333333")
        points = [p for p in target["curve"] if p["precision"] is not None and p["recall"] is not None]
        ax.plot([p["recall"] for p in points], [p["precision"] for p in points], color=color, marker=".", markersize=3,
                linewidth=1.5, label=f"{name}, thresholds 0.00-1.00")
        ax.axhline(report["target_precision"], color="#555555", linestyle=":", linewidth=1,
                   label=f"target precision {report['target_precision']:g}")
        for rule in target["rules"]:
            if rule["precision"] is not None and rule["recall"] is not None:
                ax.plot(rule["recall"], rule["precision"], "o", color="black", markersize=6)
                left = rule["recall"] > 0.6  # the label on the side with room, inside the axes
                ax.annotate(f"{rule['name']} {rule['threshold']:.2f} (now)", (rule["recall"], rule["precision"]),
                            textcoords="offset points", xytext=(-6 if left else 6, -12), ha="right" if left else "left", fontsize=8)
        if target["threshold"] is not None:
            reliable = target["recommended"] is not None
            ax.plot(target["recall"], target["precision"], "*", color=color if reliable else "#999999", markersize=13,
                    label=f"{target['threshold']:.2f}: " + ("recommended" if reliable else "unreliable, not recommended"))
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{name}: {target['positives']} labelled of {report['turns']} turns", loc="left", fontsize=10)
        ax.legend(loc="lower left", fontsize=7, frameon=False)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
