"""``python -m emotion``: analyze, evaluate and calibrate on files, send a voice turn to Rasa, check settings, make test checkpoints, export to ONNX."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from emotion.errors import EmotionError, ModelUnavailable, first_line
from emotion.settings import GRANULARITIES, Settings, reference_markdown
from emotion.tools.calibrate import DEFAULT_MIN_POSITIVES, DEFAULT_PRECISION
from emotion.tools.console import Progress, quiet_libraries
from emotion.tools.exports import AUDIO_SUFFIXES


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is none to show (a flag, or an
    option that is unset unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        nothing = action.default is None or action.default is False or action.default in ("", ())
        if nothing and "%(default)" not in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emotion", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    analyze = command("analyze", "tag audio files with an emotion")
    analyze.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER",
                         help="audio files; a folder gives its audio files, recursively and sorted by path (the "
                              f"suffixes {' '.join(AUDIO_SUFFIXES)}, whose header says how to decode them; headerless "
                              "audio is named file by file, with --encoding)")
    _model_args(analyze)
    analyze.add_argument("--granularity", choices=GRANULARITIES, default="utterance", help="one result per file, per 20 ms frame or per segment")
    analyze.add_argument("--encoding", help="headerless input: mulaw, alaw or pcm_s16le")
    analyze.add_argument("--sample-rate", type=int, help="sample rate of headerless input, e.g. 8000")
    analyze.add_argument("--channel", type=int, help="analyse this channel (from 0) of a multichannel recording (default: the mix)")
    analyze.add_argument("--embeddings", action="store_true", help="include the utterance embedding")
    analyze.add_argument("--json", action="store_true", help="one JSON object per input line")
    analyze.add_argument("--plot", metavar="PNG", help="draw emotion over time (one file, frame or segment granularity)")
    analyze.add_argument("--threshold", type=float, default=0.7, help="escalation threshold drawn on the plot")
    analyze.add_argument("--csv", metavar="CSV", help="also write one row per file (per segment with --granularity frame|segment)")
    analyze.add_argument("--embeddings-out", metavar="DIR",
                         help="write each file's embedding ((dim,), or (frames, dim) with --granularity frame) as "
                              "DIR/NAME.npy, NAME keeping the suffix: a folder argument's files by their path inside it "
                              "(DIR/a/call.wav.npy), other files by the relative path given, else their name; two files "
                              "that would share a name are refused")

    evaluate = command("evaluate", "accuracy against your own labelled recordings")
    evaluate.add_argument("labels", help="CSV with columns file,label (files relative to the CSV)")
    _model_args(evaluate)
    evaluate.add_argument("--map", default="", metavar="OURS=THEIRS,...", help="dataset label names, e.g. angry=ang,happy=hap")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON (failed files in failed_files)")
    evaluate.add_argument("--plot", metavar="PNG", help="draw the confusion matrix")

    calibrate = command("calibrate", "escalation thresholds from your own labelled recordings")
    calibrate.add_argument("labels", help="CSV with columns file,label (files relative to the CSV)")
    _model_args(calibrate)
    calibrate.add_argument("--map", default="", metavar="OURS=THEIRS,...", help="dataset label names, e.g. angry=ang,happy=hap")
    calibrate.add_argument("--rules", metavar="YAML", help="the rules to calibrate (default: EMOTION_RULES, else the default rules)")
    calibrate.add_argument("--precision", type=_fraction, default=DEFAULT_PRECISION,
                           help="target precision: the lowest threshold reaching it is suggested")
    calibrate.add_argument("--min-positives", type=int, default=DEFAULT_MIN_POSITIVES, metavar="N",
                           help="labelled turns of an emotion needed before its threshold is recommended")
    calibrate.add_argument("--scores", nargs="+", metavar="CSV",
                           help="take the scores from `analyze --csv` files (one row per file) instead of running the model")
    calibrate.add_argument("--json", action="store_true", help="print the report as JSON (the review page draws it)")
    calibrate.add_argument("--plot", metavar="PNG", help="draw precision against recall, the rules' thresholds marked")
    calibrate.add_argument("--suggest-rules", metavar="YAML", help="write the rules with the recommended thresholds, each commented")

    send = command("send-turn", "send a voice turn to Rasa, as a voice gateway would")
    send.add_argument("audio", help="an audio file (or, with --url, a URL)")
    send.add_argument("--rasa", default="http://localhost:5005", help="Rasa's address")
    send.add_argument("--sender", default="caller-1", help="the conversation's sender id")
    send.add_argument("--text", default="", help="the turn's transcript")
    send.add_argument("--url", action="store_true", help="send AUDIO as a URL reference instead of base64")
    send.add_argument("--mulaw", action="store_true", help="convert to 8 kHz mu-law raw before sending, as a phone gateway would")
    send.add_argument("--via", choices=("api", "channel", "metadata"), default="api",
                      help="api: analyse with the action server's /v1/analyze, send the result as metadata.emotion; "
                           "channel: send the audio to the EmotionRestInput channel; metadata: audio in metadata.audio "
                           "(Rasa's tracker then keeps the audio)")
    send.add_argument("--api", default="http://localhost:5055/v1/analyze", help="the analysis API, for --via api")
    send.add_argument("--token", help="bearer token for the analysis API (EMOTION_API_TOKEN)")

    settings = command("settings", "check the EMOTION_* settings and print them (or the reference)")
    settings.add_argument("--markdown", action="store_true", help="print the configuration reference (docs/configuration.md)")

    make = command("make-checkpoint", "write a random-weight checkpoint (tests and benchmarks only)")
    make.add_argument("directory", help="where to write config.yaml, model.pt and tokens.txt")
    make.add_argument("--size", choices=("tiny", "base", "large"), default="tiny", help="the architecture's size")
    make.add_argument("--head", nargs="*", default=None, metavar="LABEL=P", help="fix the scores, e.g. angry=0.9 (default: random)")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights")

    export = command("export-onnx", "export a checkpoint to ONNX, checked against FunASR (docs/onnx.md)")
    export.add_argument("model", metavar="MODEL", help="hub id, alias (plus_large, ...) or local FunASR directory")
    export.add_argument("out", metavar="OUT", help="the .onnx file to write")
    export.add_argument("--int8", action="store_true", help="quantise the MatMul/Gemm weights to int8 (dynamic quantisation)")
    export.add_argument("--hub", choices=("ms", "hf"), default="ms", help="where a hub id downloads from")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with quiet_libraries(verbose):
            return _run(args)
    except EmotionError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "evaluate":
        from emotion.engine.core import EmotionEngine
        from emotion.tools.evaluate import evaluate

        return evaluate(EmotionEngine(config_from_args(args, warmup=False)), args)
    if args.command == "calibrate":
        from emotion.tools.calibrate import calibrate

        engine = None
        if not args.scores:
            from emotion.engine.core import EmotionEngine

            engine = EmotionEngine(config_from_args(args, warmup=False))
        return calibrate(engine, args)
    if args.command == "settings":
        return _settings(args)
    if args.command == "send-turn":
        from emotion.tools.client import send_turn

        return send_turn(args)
    if args.command == "export-onnx":
        from emotion.engine.onnx import export_onnx
        from emotion.settings import MODEL_ALIASES

        model = MODEL_ALIASES.get(args.model, args.model)
        try:
            report = export_onnx(model, Path(args.out), hub=args.hub, int8=args.int8)
        except OSError as exc:
            raise ModelUnavailable(f"cannot write {args.out}: {first_line(exc)}") from exc
        print(json.dumps(report, indent=2))
        return 0
    from emotion.tools.checkpoint import write_checkpoint

    head = None
    if args.head is not None:
        head = {k: float(v) for k, v in (item.split("=", 1) for item in args.head)}
    print(write_checkpoint(args.directory, size=args.size, head_probs=head, seed=args.seed))
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: expected a number in (0, 1]")
    return value


def _model_args(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument("--model", help="hub id, alias (plus_large, plus_base, ...) or local directory "
                                        f"(default: EMOTION_MODEL, else {defaults.model})")
    parser.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default: EMOTION_DEVICE, else {defaults.device})")
    parser.add_argument("--dtype", help=f"auto, float32, bfloat16, float16 or int8 (default: EMOTION_DTYPE, else {defaults.dtype})")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show our INFO log and what the model libraries print (FunASR's banners, warnings, log)")


def config_from_args(args: argparse.Namespace, **extra) -> Settings:
    overrides = {k: getattr(args, k) for k in ("model", "device", "dtype") if getattr(args, k, None)}
    overrides.update(extra)
    return Settings.from_env(**overrides)


def _settings(args: argparse.Namespace) -> int:
    if args.markdown:
        print(reference_markdown(), end="")
        return 0
    values = dataclasses.asdict(Settings.from_env())
    for f in dataclasses.fields(Settings):
        if f.metadata["secret"] and values[f.name]:
            values[f.name] = "(set)"
    print(json.dumps(values, indent=2))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from emotion.engine.core import EmotionEngine
    from emotion.tools.exports import CsvWriter, analyze_files, embedding_paths, input_files, save_embeddings

    inputs = input_files(args.files)
    if args.plot and (len(inputs) != 1 or args.granularity == "utterance"):
        print("error: --plot takes one file and --granularity frame or segment", file=sys.stderr)
        return 2
    npy_paths = embedding_paths(args.embeddings_out, inputs) if args.embeddings_out else [None] * len(inputs)
    engine = EmotionEngine(config_from_args(args, warmup=False))
    failed = 0
    embeddings = args.embeddings or bool(args.embeddings_out)
    with CsvWriter(args.csv, engine.labels, segments=args.granularity != "utterance") as csv_out, Progress(len(inputs)) as progress:
        results = analyze_files(engine, [i.path for i in inputs], encoding=args.encoding, sample_rate=args.sample_rate,
                                channel=args.channel, granularity=args.granularity, embeddings=embeddings, progress=progress,
                                hold_library_output=not args.verbose)
        for (name, result), npy_path in zip(results, npy_paths):
            csv_out.write(name, result)
            if isinstance(result, dict):
                failed += 1
                progress.write(json.dumps({"file": name, "error": result}, ensure_ascii=False) if args.json
                               else f"{name}: error [{result['code']}] {result['message']}")
                continue
            if npy_path is not None:
                save_embeddings(npy_path, result)
            if args.json:
                out = result.as_dict()
                if not args.embeddings:
                    out.pop("embedding", None)
                progress.write(json.dumps({"file": name, **out}, ensure_ascii=False))
            else:
                others = sorted(result.scores.items(), key=lambda kv: -kv[1])[1:4]
                progress.write(f"{name}: {result.emotion} {result.confidence:.2f} ({', '.join(f'{k} {v:.2f}' for k, v in others)})")
            if args.plot:
                from emotion.tools.plot import plot_timeline

                plot_timeline(result, args.plot, threshold=args.threshold, title=Path(name).name)
    return 1 if failed else 0
