"""``python -m emotion evaluate``: accuracy against labelled recordings."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from emotion.tools.console import Progress
from emotion.tools.exports import analyze_files


def confusion_report(truth: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, unweighted average recall over the classes present, per-class precision,
    recall, F1 and support, and the confusion matrix (rows: truth, columns: predicted)."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(truth, predicted):
        matrix[index[t], index[p]] += 1
    per_class = {}
    for label, i in index.items():
        support, hits, said = int(matrix[i].sum()), int(matrix[i, i]), int(matrix[:, i].sum())
        precision = hits / said if said else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "support": support}
    present = [c for c in per_class.values() if c["support"]]
    return {
        "files": len(truth),
        "accuracy": round(float(np.trace(matrix)) / len(truth), 4) if truth else 0.0,
        "unweighted_average_recall": round(sum(c["recall"] for c in present) / len(present), 4) if present else 0.0,
        "per_class": per_class,
        "labels": labels,
        "confusion_matrix": matrix.tolist(),
    }


def label_map(text: str) -> dict[str, str]:
    """``--map angry=ang,happy=hap``: the dataset's label names to ours."""
    theirs_to_ours = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        ours, _, theirs = pair.partition("=")
        theirs_to_ours[theirs.strip()] = ours.strip()
    return theirs_to_ours


def read_labels(path: str) -> list[tuple[str, str, int]]:
    """The rows of a ``file,label`` CSV: (the file, relative to the CSV's folder; the label;
    the row's line in the CSV)."""
    base = Path(path).parent
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return [(str(base / r["file"]), r["label"].strip(), reader.line_num) for r in reader]


def labelled_results(results, rows: list[tuple[str, str, int]], labels: Callable[[], list[str]], mapping: dict[str, str], *,
                     progress: Progress, quiet: bool):
    """Each row's truth beside its result, ``(truth, emotion, confidence)``, from ``results``
    (``(file, result or error)`` in the rows' order); the files that failed or carry a label
    that is not ours are counted by code and named, each on stderr unless ``quiet``.
    ``labels`` gives ours once a result came (a model's are known once it has loaded)."""
    failures: Counter = Counter()
    failed_files, scored = [], []
    for (name, result), (_file, label, line) in zip(results, rows):
        ours = mapping.get(label, label)
        if isinstance(result, dict):
            failure = result
        elif ours not in labels():
            failure = {"code": "unknown_label", "message": f"label {label!r} is not one of ours; map it with --map"}
        else:
            scored.append((ours, result.emotion, result.confidence))
            continue
        failures[failure["code"]] += 1
        failed_files.append({"file": name, "line": line, **failure})
        if not quiet:
            progress.write(f"{name}: error [{failure['code']}] {failure['message']}", err=True)
    return scored, failures, failed_files


def evaluate(engine, args) -> int:
    rows = read_labels(args.labels)
    files = [file for file, _, _ in rows]
    with Progress(len(files)) as progress:
        results = analyze_files(engine, files, progress=progress, hold_library_output=not args.verbose)
        scored, failures, failed_files = labelled_results(results, rows, lambda: engine.labels, label_map(args.map),
                                                          progress=progress, quiet=args.json)
    truth = [t for t, _, _ in scored]
    predicted = [p for _, p, _ in scored]
    labels = [lab for lab in engine.labels if lab in truth or lab in predicted]
    report = confusion_report(truth, predicted, labels)
    report["failed"] = dict(failures)
    report["failed_files"] = failed_files
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_as_text(report))
    if args.plot and labels:
        _plot(report, args.plot)
    return 0 if truth else 1


def _as_text(report: dict) -> str:
    labels, width = report["labels"], max([9, *map(len, report["labels"])])
    lines = [f"files scored: {report['files']}, failed: {sum(report['failed'].values())} {report['failed'] or ''}".rstrip(),
             f"accuracy: {report['accuracy']:.4f}   unweighted average recall: {report['unweighted_average_recall']:.4f}", "",
             f"{'':{width}}  precision  recall     f1  support"]
    for label in labels:
        c = report["per_class"][label]
        lines.append(f"{label:{width}}  {c['precision']:9.4f}  {c['recall']:6.4f} {c['f1']:6.4f}  {c['support']:7d}")
    lines += ["", "confusion matrix (rows: truth, columns: predicted)", f"{'':{width}}  " + " ".join(f"{lab[:7]:>7}" for lab in labels)]
    for label, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"{label:{width}}  " + " ".join(f"{n:7d}" for n in row))
    return "\n".join(lines)


def _plot(report: dict, path: str) -> None:
    from emotion.tools.plot import pyplot

    plt = pyplot()
    labels, matrix = report["labels"], np.array(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(labels), 1 + 0.7 * len(labels)), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    ax.set_title(f"accuracy {report['accuracy']:.3f}, UAR {report['unweighted_average_recall']:.3f}", loc="left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
