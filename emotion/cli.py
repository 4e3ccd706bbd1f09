"""``python -m emotion``: analyze files, benchmark, send a voice turn to Rasa, make test checkpoints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from emotion.config import GRANULARITIES, EngineConfig
from emotion.errors import EmotionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emotion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="tag audio files with an emotion")
    analyze.add_argument("files", nargs="+")
    _model_args(analyze)
    analyze.add_argument("--granularity", choices=GRANULARITIES, default="utterance")
    analyze.add_argument("--encoding", help="headerless input: mulaw, alaw or pcm_s16le")
    analyze.add_argument("--sample-rate", type=int, help="sample rate of headerless input, e.g. 8000")
    analyze.add_argument("--channel", type=int, help="analyse this channel (from 0) of a multichannel recording, not the mix")
    analyze.add_argument("--embeddings", action="store_true", help="include the utterance embedding")
    analyze.add_argument("--json", action="store_true", help="one JSON object per input line")
    analyze.add_argument("--plot", metavar="PNG", help="draw emotion over time (one file, frame or segment granularity)")
    analyze.add_argument("--threshold", type=float, default=0.7, help="escalation threshold drawn on the plot")
    analyze.add_argument("--csv", metavar="CSV", help="also write one row per file (per segment with --granularity frame|segment)")
    analyze.add_argument("--embeddings-out", metavar="DIR", help="write each file's embedding as DIR/NAME.npy ((dim,), or (frames, dim) with --granularity frame)")

    evaluate = sub.add_parser("evaluate", help="accuracy against your own labelled recordings")
    evaluate.add_argument("labels", help="CSV with columns file,label (files relative to the CSV)")
    _model_args(evaluate)
    evaluate.add_argument("--map", default="", metavar="OURS=THEIRS,...", help="dataset label names, e.g. angry=ang,happy=hap")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.add_argument("--plot", metavar="PNG", help="draw the confusion matrix")

    bench = sub.add_parser("bench", help="throughput and latency against FunASR's generate()")
    _model_args(bench)
    bench.add_argument("--size", choices=("tiny", "base", "large"), default="large", help="checkpoint built when --model is not given")
    bench.add_argument("--clips", type=int, default=64)
    bench.add_argument("--baseline-clips", type=int, default=16)
    bench.add_argument("--seconds", type=float, nargs=2, default=(1.0, 15.0), metavar=("MIN", "MAX"))
    bench.add_argument("--fixed-seconds", type=float, help="every clip this long (e.g. 5)")
    bench.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    bench.add_argument("--server-turns", type=int, default=64, help="turns through the action server over HTTP, per path (0: skip)")
    bench.add_argument("--server-rate", type=float, default=8.0, help="turns per second offered to the server, Poisson arrivals")
    bench.add_argument("--load-processes", type=int, default=2, help="processes sending those turns")
    bench.add_argument("--server-workers", type=int, default=1, help="the action server's Sanic workers (ACTION_SERVER_SANIC_WORKERS)")
    bench.add_argument("--engine-process", choices=("auto", "on", "off"), default="auto",
                       help="the model in a process of its own (EMOTION_ENGINE_PROCESS)")
    bench.add_argument("--compare-fp32", action="store_true", help="check bf16/fp16 against fp32: argmax agreement on mixed clips")
    bench.add_argument("--agreement-clips", type=int, default=1000, help="clips for --compare-fp32")

    send = sub.add_parser("send-turn", help="send a voice turn to Rasa, as a voice gateway would")
    send.add_argument("audio")
    send.add_argument("--rasa", default="http://localhost:5005")
    send.add_argument("--sender", default="caller-1")
    send.add_argument("--text", default="")
    send.add_argument("--url", action="store_true", help="send AUDIO as a URL reference instead of base64")
    send.add_argument("--mulaw", action="store_true", help="convert to 8 kHz mu-law raw before sending, as a phone gateway would")
    send.add_argument("--via", choices=("api", "channel", "metadata"), default="api",
                      help="api: analyse with the action server's /v1/analyze, send the result as metadata.emotion (default); "
                           "channel: send the audio to the EmotionRestInput channel; metadata: audio in metadata.audio "
                           "(Rasa's tracker then keeps the audio)")
    send.add_argument("--api", default="http://localhost:5055/v1/analyze", help="the analysis API, for --via api")
    send.add_argument("--token", help="bearer token for the analysis API (EMOTION_API_TOKEN)")

    make = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint (tests and benchmarks only)")
    make.add_argument("directory")
    make.add_argument("--size", choices=("tiny", "base", "large"), default="tiny")
    make.add_argument("--head", nargs="*", default=None, metavar="LABEL=P", help="fix the scores, e.g. angry=0.9")
    make.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "bench":
            from emotion.bench import run_bench

            print(json.dumps(run_bench(args), indent=2))
            return 0
        if args.command == "evaluate":
            from emotion.exports import evaluate

            return evaluate(args)
        if args.command == "send-turn":
            from emotion.client import send_turn

            return send_turn(args)
        from emotion.checkpoint import write_checkpoint

        head = None
        if args.head is not None:
            head = {k: float(v) for k, v in (item.split("=", 1) for item in args.head)}
        print(write_checkpoint(args.directory, size=args.size, head_probs=head, seed=args.seed))
        return 0
    except EmotionError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id, alias (plus_large, plus_base, ...) or local directory; default EMOTION_MODEL")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", help="auto, float32, bfloat16 or float16")


def config_from_args(args: argparse.Namespace, **extra) -> EngineConfig:
    overrides = {k: getattr(args, k) for k in ("model", "device", "dtype") if getattr(args, k, None)}
    overrides.update(extra)
    return EngineConfig.from_env(**overrides)


FILES_PER_BATCH = 64  # decoded audio held at once; large runs go through in such chunks


def analyze_files(engine, files: list[str], *, encoding=None, sample_rate=None, channel=None, granularity="utterance",
                  embeddings=False, progress=False):
    """Yield ``(file, EmotionResult)`` or ``(file, {"code", "message"})`` per file, in order;
    a bad file is reported and the run goes on."""
    from tqdm import tqdm

    bar = tqdm(total=len(files), unit="file", disable=not (progress and sys.stderr.isatty()), file=sys.stderr)
    for start in range(0, len(files), FILES_PER_BATCH):
        chunk = files[start : start + FILES_PER_BATCH]
        answers: dict = {}
        waves = {}
        for name in chunk:
            try:
                waves[name] = engine.decode_sync(Path(name).read_bytes(), encoding, sample_rate, channel)
            except OSError as exc:
                answers[name] = {"code": "fetch_failed", "message": f"cannot read file: {exc.strerror}"}
            except EmotionError as exc:
                answers[name] = exc.as_dict()
        if waves:
            if engine.model is None:
                engine.load()  # only once a file decodes
            for name, result in zip(waves, engine.analyze_waves(list(waves.values()), granularity=granularity, embeddings=embeddings)):
                answers[name] = result.as_dict() if isinstance(result, EmotionError) else result
        for name in chunk:
            bar.update()
            yield name, answers[name]
    bar.close()


def _analyze(args: argparse.Namespace) -> int:
    from emotion.engine import EmotionEngine
    from emotion.exports import CsvWriter, save_embeddings

    if args.plot and (len(args.files) != 1 or args.granularity == "utterance"):
        print("error: --plot takes one file and --granularity frame or segment", file=sys.stderr)
        return 2
    engine = EmotionEngine(config_from_args(args, warmup=False))
    failed = 0
    embeddings = args.embeddings or bool(args.embeddings_out)
    with CsvWriter(args.csv, engine.labels, segments=args.granularity != "utterance") as csv_out:
        for name, result in analyze_files(engine, args.files, encoding=args.encoding, sample_rate=args.sample_rate,
                                          channel=args.channel, granularity=args.granularity, embeddings=embeddings,
                                          progress=bool(args.csv or args.embeddings_out)):
            csv_out.write(name, result)
            if isinstance(result, dict):
                failed += 1
                print(json.dumps({"file": name, "error": result}, ensure_ascii=False) if args.json
                      else f"{name}: error [{result['code']}] {result['message']}")
                continue
            if args.embeddings_out:
                save_embeddings(args.embeddings_out, name, result)
            if args.json:
                out = result.as_dict()
                if not args.embeddings:
                    out.pop("embedding", None)
                print(json.dumps({"file": name, **out}, ensure_ascii=False))
            else:
                others = sorted(result.scores.items(), key=lambda kv: -kv[1])[1:4]
                print(f"{name}: {result.emotion} {result.confidence:.2f} ({', '.join(f'{k} {v:.2f}' for k, v in others)})")
            if args.plot:
                from emotion.plot import plot_timeline

                plot_timeline(result, args.plot, threshold=args.threshold, title=Path(name).name)
    return 1 if failed else 0
