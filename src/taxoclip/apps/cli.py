"""The `taxoclip` command: parses arguments and calls the library. Heavy imports happen inside the
command that needs them, so `taxoclip --help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import MISSING, fields
from pathlib import Path

from taxoclip.allocator import configure as configure_allocator
from taxoclip.apps.data_commands import add_data_parsers, build_verify_parser
from taxoclip.apps.train_commands import add_train_parser
from taxoclip.data.labels import SCORINGS
from taxoclip.errors import TaxoclipError
from taxoclip.eval.config import EvalConfig
from taxoclip.flag_types import NON_NEGATIVE, POSITIVE, port_number, probability
from taxoclip.models.novelty_names import NOVELTY_SCORES
from taxoclip.output_lock import output_lock
from taxoclip.taxonomy import Rank

RANKS = [rank.column for rank in Rank]
LINEAGE_RANKS = RANKS[:-1]  # kingdom ... genus: the species is the answer itself


def default(config_class: type, name: str):
    """The library's default for one field of a settings dataclass (what --help shows)."""
    field = next(f for f in fields(config_class) if f.name == name)
    return field.default_factory() if field.default is MISSING else field.default


def cmd_ask(args: argparse.Namespace) -> int:
    from taxoclip.models.vqa import ask, parse_choices

    choices = parse_choices(args.choices)
    result = ask(args.model, args.photo, args.question, choices)
    if args.format == "json":
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(result["answer"])
        for entry in result.get("ranked", []):
            print(f"  {entry['log_likelihood']:9.3f}  {entry['answer']}")
        if "identifier" in result:  # what the answer rested on
            print("resting on the identifier:")
            for entry in result["identifier"]["top"]:
                print(f"  {entry['probability']:6.3f}  {entry['name']}  ({entry.get('family') or '-'})")
    return 0


def model_kind(model: str) -> str | None:
    """The kind a model directory's config names (None for open_clip:NAME or no directory)."""
    from taxoclip.models.bundle import read_config

    return read_config(Path(model)).get("kind") if (Path(model) / "config.json").is_file() else None


def cmd_eval_vqa(args: argparse.Namespace) -> int:
    from taxoclip.eval.vqa import VQAEvalConfig, run_vqa_evaluation

    if not args.questions:
        raise TaxoclipError(
            f"{args.model} answers questions: give --questions qa.jsonl ('taxoclip questions {args.data} -o qa.jsonl')"
        )
    summary = run_vqa_evaluation(
        VQAEvalConfig(
            model=args.model,
            data=args.data,
            questions=args.questions,
            output=args.output,
            split=args.split,
            per_type=args.per_type,
            force=args.force,
            progress=not args.quiet,
        )
    )
    print(f"{summary['questions']} questions about {summary['photos']} photos; exact match (%):")
    answerers = [w for w in next(iter(summary["exact_match"].values())) if w != "questions"]
    print(f"  {'group':28s} " + " ".join(f"{w[:14]:>14s}" for w in answerers))
    for name, row in summary["exact_match"].items():
        shown = ("—" if row[w] is None else f"{100 * row[w]:.1f}" for w in answerers)
        print(f"  {name:28s} " + " ".join(f"{v:>14s}" for v in shown))
    if "grounding" in summary:
        g = summary["grounding"]
        rate = g["contradicts_confident_identifier"]
        print(f"  contradicts a confident identifier: {'—' if rate is None else f'{100 * rate:.1f}%'}")
    print(f"report: {args.output}/report.md (and metrics.json, answers.csv)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from taxoclip.eval.report import EvalConfig, run_evaluation

    if model_kind(args.model) == "vqa":
        return cmd_eval_vqa(args)
    if args.questions:  # never silently ignored
        raise TaxoclipError(f"--questions is for question-answering (vqa) models; {args.model} identifies species")
    config = EvalConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        style=args.style,
        scoring=args.scoring,
        split=args.split,
        baselines=not args.no_baselines,
        shots=tuple(int(s) for s in args.shots.split(",")) if args.shots else (),
        group_by=[c.strip() for c in args.group_by.split(",")] if args.group_by else [],
        random_weights=args.random_weights,
        baseline_rows=args.baseline_rows or None,
        baseline_steps=args.baseline_steps,
        open_set=args.open_set,
        unknown=args.unknown,
        progress=not args.quiet,
    )
    report = run_evaluation(config)
    metrics = report["metrics"]
    print(
        f"{metrics['images']} images, {metrics['classes_scored']} classes: top-1 {100 * metrics['top1']:.1f}%, "
        f"top-5 {100 * metrics['top5']:.1f}%"
    )
    for rank, values in metrics["per_rank"].items():
        print(
            f"  {rank:8s} {100 * values['rollup']:5.1f}% (summed up the tree), "
            f"{100 * values['top1_lineage']:5.1f}% (top-1 lineage)"
        )
    if "unseen_top1" in metrics:
        print(
            f"  seen classes {100 * metrics['seen_top1']:.1f}%; unseen {100 * metrics['unseen_top1']:.1f}% among all "
            f"classes, {100 * metrics['unseen_top1_among_unseen']:.1f}% among the {metrics['unseen_classes']} unseen"
        )
    open_set = report.get("open_set")
    if open_set:
        chosen = open_set["scores"][open_set["chosen"]]
        print(
            f"  open set ({open_set['chosen']}): AUROC {chosen['auroc']:.3f}; {100 * chosen['unknown_flagged']:.1f}% "
            f"of {open_set['unknown_photos']} photos of held-out species flagged, "
            f"{100 * chosen['known_rejected']:.1f}% of known photos"
        )
    print(f"report: {args.output}/report.html (and report.md, metrics.json, CSVs, plots)")
    return 0


def build_predictor(args: argparse.Namespace):
    """A Predictor from --model (any model directory, or open_clip:NAME with --classes) or --onnx."""
    from taxoclip.inference.predict import DEFAULT_THRESHOLD, Predictor, torch_predictor

    subset = None
    if getattr(args, "subset", None) is not None:
        subset = [t.strip() for t in args.subset.split(",") if t.strip()]
        if not subset:
            raise TaxoclipError(f"--subset {args.subset!r} names no taxon; give names like 'Rosaceae,Tulipa'")
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    if args.onnx:
        from taxoclip.inference.export import OnnxClassifier
        from taxoclip.models.bundle import read_classes

        runner = OnnxClassifier(args.onnx)
        classes = runner.classes()  # the sidecar's class table
        if args.model and not args.model.startswith("open_clip:"):
            model_classes = read_classes(Path(args.model))
            if classes is not None and classes.ids != model_classes.ids:
                raise TaxoclipError(
                    f"{args.onnx} was exported for other classes than {args.model}'s "
                    f"({len(classes)} vs {len(model_classes)}); give the model it was exported from, or none"
                )
            classes = classes or model_classes
        if classes is None:
            model_dir = runner.meta.get("model_dir")
            if not model_dir:
                raise TaxoclipError("--onnx needs --model (the model directory it was exported from)")
            classes = read_classes(Path(model_dir))
        if runner.n_classes is not None and runner.n_classes != len(classes):
            raise TaxoclipError(f"{args.onnx} scores {runner.n_classes} classes but the class table has {len(classes)}")
        rule = runner.open_set_rule() if args.open_set != "off" else None
        return Predictor(classes, runner.preprocess, runner, subset=subset, threshold=threshold, open_set=rule)
    if args.model is None:
        raise TaxoclipError("give --model (a model directory or open_clip:NAME) or --onnx")
    from taxoclip.models.novelty import open_set_for
    from taxoclip.models.registry import load_classifier

    classifier = load_classifier(args.model, classes=args.classes, style=args.style, scoring=args.scoring)
    novelty = open_set_for(classifier, args.open_set)
    if novelty is None and args.open_set == "auto" and not args.model.startswith("open_clip:"):
        print(
            f"note: {args.model} has no open-set score and no training cache to compute one from: every photo "
            "is named as one of its species ('taxoclip openset --model DIR --features CACHE' adds one)",
            file=sys.stderr,
        )
    return torch_predictor(classifier, subset=subset, threshold=threshold, novelty=novelty)


def cmd_predict(args: argparse.Namespace) -> int:

    from taxoclip.inference.predict import collect_photos

    photos = collect_photos(args.photos)
    predictor = build_predictor(args)
    results = predictor.predict_paths(
        photos, progress=not args.quiet and len(photos) > 8, top_k=args.top_k, rank=args.rank
    )
    failed = [r for r in results if r.error]
    if args.format == "json":
        print(json.dumps([r.to_json() for r in results], indent=1, ensure_ascii=False))
    elif args.format == "csv":
        print_predictions_csv(results)
    else:
        print_predictions_table(results)
    if failed:
        print(f"{len(failed)} of {len(results)} photos could not be read (listed above)", file=sys.stderr)
    return 2 if len(failed) == len(results) else 0


def print_predictions_table(results) -> None:
    for result in results:
        if result.error:
            print(f"{result.source}: skipped ({result.error})")
            continue
        print(f"{result.source}: {result.confident['text']} [{100 * result.confident['probability']:.0f}%]")
        if result.at_rank:
            print(
                f"  at {result.at_rank['rank']}: {result.at_rank['name']} ({100 * result.at_rank['probability']:.1f}%)"
            )
        for entry in result.top:
            lineage = " > ".join(v for k, v in entry["lineage"].items() if v and k != "species")
            name = f"{entry['name']} ({entry['scientific_name']})" if entry["name"] else entry["scientific_name"]
            print(f"  {100 * entry['probability']:5.1f}%  {name}   {lineage}")


def print_predictions_csv(results) -> None:
    import csv

    writer = csv.writer(sys.stdout)
    writer.writerow(
        [
            "photo",
            "rank_of_answer",
            "answer",
            "answer_probability",
            "top",
            "id",
            "name",
            "scientific_name",
            "probability",
            *LINEAGE_RANKS,
            "known",
            "error",
        ]
    )
    for result in results:
        if result.error:
            writer.writerow([result.source, *[""] * 8, *[""] * len(LINEAGE_RANKS), "", result.error])
            continue
        for position, entry in enumerate(result.top, start=1):
            lineage = [entry["lineage"].get(r, "") for r in LINEAGE_RANKS]
            writer.writerow(
                [
                    result.source,
                    result.confident["rank"],
                    result.confident["name"],
                    result.confident["probability"],
                    position,
                    entry["id"],
                    entry["name"],
                    entry["scientific_name"],
                    entry["probability"],
                    *lineage,
                    "" if result.known is None else str(result.known).lower(),
                    "",
                ]
            )


def cmd_serve(args: argparse.Namespace) -> int:
    from taxoclip.apps.serve import serve

    predictor = build_predictor(args)
    asker = None
    if args.ask:
        from taxoclip.models.vqa import Asker

        asker = Asker(args.ask)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}, reachable from other machines", file=sys.stderr)
    api = "/api/predict" + (", /api/ask" if asker else "")
    print(f"open http://{args.host}:{args.port}/ (JSON API at {api}, docs at /api/docs)")
    name = Path(args.model or args.onnx or "model").name
    serve(predictor, host=args.host, port=args.port, model_name=name, asker=asker)
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from taxoclip.inference.export import export_onnx

    path = export_onnx(
        args.model, args.output, classes=args.classes, style=args.style, scoring=args.scoring, open_set=args.open_set
    )
    print(f"ONNX model -> {path} (preprocessing and classes in {path}.json)")
    return 0


def cmd_export_open_clip(args: argparse.Namespace) -> int:
    from taxoclip.inference.open_clip_export import export_open_clip

    out = export_open_clip(args.model, args.output, text_config_from_hub=args.text_config_from_hub)
    print(f"open_clip model -> {out} (checked against the model; open it with open_clip 'local-dir:{out}')")
    return 0


def cmd_openset(args: argparse.Namespace) -> int:
    """Fit (or fit again) a model directory's open-set score from its training cache."""
    from taxoclip.data.features import load_features
    from taxoclip.models.novelty import RECORD, fit_novelty
    from taxoclip.models.registry import load_classifier

    classifier = load_classifier(args.model)
    features = args.features or (classifier.training or {}).get("features")
    if not features or not (Path(features) / "meta.json").exists():
        raise TaxoclipError(
            f"{args.model}: give --features, the feature cache it trained on ({features or 'not recorded'})"
        )
    detector = fit_novelty(classifier, load_features(features), keep=args.keep)
    detector.save(Path(args.model))
    record = detector.record
    print(f"open-set score: {detector.score} ({record['chosen_by']}), threshold {detector.threshold:.4g}")
    for name, area in record.get("calibration_auroc", {}).items():
        print(f"  {name:12s} AUROC on the calibration classes {area:.3f}")
    tried = ", ".join(f"{t}: {a:.3f}" for t, a in record.get("temperature_auroc", {}).items())
    print(
        f"max-softmax at temperature {record['softmax_temperature']:g}"
        + (f" (AUROC by temperature {tried})" if tried else "")
    )
    print(f"kept {100 * record['keep']:.0f}% of {record['calibration_photos']} known calibration photos")
    print(f"-> {Path(args.model) / RECORD}")
    return 0


def add_scoring_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scoring",
        choices=SCORINGS,
        help="a catlip model's class scores (default: the model's own); standardised for species it never saw",
    )


def add_predictor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a model directory (taxoclip train) or open_clip:NAME (with --classes)")
    p.add_argument("--classes", help="class CSV, for an open_clip model")
    p.add_argument(
        "--style",
        help="caption style, or 'templates' for a prompt ensemble (default: the model's own; paper for open_clip)",
    )
    add_scoring_argument(p)
    p.add_argument("--onnx", help="run this exported ONNX file instead of PyTorch")
    p.add_argument("--subset", help="answer only among these taxa (any rank), comma-separated: 'Rosaceae,Tulipa'")
    p.add_argument(
        "--threshold",
        type=probability,
        help="probability the honest answer's rank must reach (default 0.5, measured on flowers valid)",
    )
    add_open_set_argument(p)


def add_open_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--open-set",
        default="auto",
        choices=("auto", "off", *NOVELTY_SCORES),
        help="say 'not one of the species this model knows' above a novelty score's threshold: auto (the score "
        "chosen on held-out classes, computed on first use from the training cache), off, or a score",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from taxoclip.apps.demo import run_demo

    return run_demo(data=args.data, out=args.output, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxoclip", description="Turn labelled organism photos into a vision-language species identifier."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    add_data_parsers(commands)
    add_train_parser(commands)

    add_eval_parsers(commands)
    add_field_parsers(commands)
    return parser


def add_eval_parsers(commands) -> None:
    """ask and eval."""
    p = commands.add_parser("ask", help="answer a question about a photo with a vqa model")
    p.add_argument("photo", help="the photo")
    p.add_argument("question", help='the question, e.g. "Which family does this plant belong to?"')
    p.add_argument("--model", required=True, help="a model directory from 'taxoclip train vqa'")
    p.add_argument("--choices", help="candidate answers, comma-separated: also ranked by likelihood")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_ask)

    p = commands.add_parser("eval", help="evaluate a model at every rank, with baselines, as a report")
    p.add_argument("--model", required=True, help="a model directory (taxoclip train) or open_clip:NAME (e.g. BioCLIP)")
    p.add_argument(
        "--data", required=True, help="a feature cache, shards, or a source (embedded with the model's tower)"
    )
    p.add_argument("-o", "--output", required=True, help="report folder")
    p.add_argument(
        "--style", help="caption style, or 'templates' for a CLIP-style prompt ensemble (default: the model's)"
    )
    add_scoring_argument(p)
    p.add_argument("--split", default=default(EvalConfig, "split"), help="split to evaluate (default %(default)s)")
    p.add_argument("--no-baselines", action="store_true", help="skip probe / nearest class mean / Transfer Init")
    p.add_argument(
        "--shots",
        default=",".join(map(str, default(EvalConfig, "shots"))),
        help="training images per class for the data-efficiency curve (default %(default)s)",
    )
    p.add_argument(
        "--baseline-rows",
        type=NON_NEGATIVE,
        default=default(EvalConfig, "baseline_rows"),
        help="test photos the baselines are scored on, a seeded sample when there are more (0: all; "
        "default %(default)s)",
    )
    p.add_argument(
        "--baseline-steps",
        type=POSITIVE,
        default=default(EvalConfig, "baseline_steps"),
        help="training steps (of 256 rows) for the probe and Transfer Init at most (default %(default)s)",
    )
    p.add_argument("--group-by", help="class-table columns to report accuracy by (default: supercategory or a rank)")
    p.add_argument("--random-weights", action="store_true", help="open_clip architecture with random weights")
    p.add_argument("--questions", help="vqa models: the questions file ('taxoclip questions') to answer")
    p.add_argument(
        "--per-type", type=NON_NEGATIVE, default=100, help="vqa models: questions scored per type (0: all; default 100)"
    )
    p.add_argument("--force", action="store_true", help="vqa models: score photos the model trained on anyway")
    add_open_set_argument(p)
    p.add_argument(
        "--unknown", help="photos of species the model does not know (cache, shards or source): scored by the open set"
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(handler=cmd_eval)


def add_field_parsers(commands) -> None:
    """predict, serve, export and demo: what a model is used for."""
    p = commands.add_parser("predict", help="identify the species in photos (top-k, lineage, honest rank)")
    p.add_argument("photos", nargs="+", help="photos or folders of photos")
    add_predictor_arguments(p)
    p.add_argument("--top-k", type=POSITIVE, default=5)
    p.add_argument(
        "--rank",
        choices=RANKS,
        help="also answer at this rank (probabilities summed up the tree)",
    )
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(handler=cmd_predict)

    p = commands.add_parser("serve", help="a web page (and JSON API) to identify photos, on localhost")
    add_predictor_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--ask", help="a vqa model directory (taxoclip train vqa): adds a question box and /api/ask")
    p.set_defaults(handler=cmd_serve)

    p = commands.add_parser("export", help="export a model: 'export onnx' or 'export open_clip'")
    formats = p.add_subparsers(dest="target", metavar="FORMAT", required=True)
    q = formats.add_parser("onnx", help="image tower + classifier head as one ONNX graph (checked with onnxruntime)")
    q.add_argument("--model", required=True, help="a model directory, or open_clip:NAME (with --classes)")
    q.add_argument("--classes", help="class CSV, for an open_clip model")
    q.add_argument("--style", help="caption style or 'templates' (default: the model's own)")
    add_scoring_argument(q)
    q.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    add_open_set_argument(q)
    q.set_defaults(handler=cmd_export_onnx)
    q = formats.add_parser(
        "open_clip", help="a LiT model as an open_clip model folder (opens in open_clip and pybioclip as local-dir:OUT)"
    )
    q.add_argument("--model", required=True, help="a LiT model directory (taxoclip train lit)")
    q.add_argument("-o", "--output", required=True, help="a new folder to write")
    q.add_argument(
        "--text-config-from-hub",
        action="store_true",
        help="name the text tower by its hub id (for uploading; opening then reads its config.json from the hub) "
        "instead of by this folder's path (opens offline while the folder stays where it is)",
    )
    q.set_defaults(handler=cmd_export_open_clip)

    p = commands.add_parser("openset", help="fit a model's open-set score (unknown species) from its training cache")
    p.add_argument("--model", required=True, help="a model directory (taxoclip train)")
    p.add_argument("--features", help="the feature cache it trained on (default: the one its training recorded)")
    p.add_argument("--keep", type=probability, default=0.95, help="share of known photos kept (default 0.95)")
    p.set_defaults(handler=cmd_openset)

    p = commands.add_parser("demo", help="the whole path on real flower photos, with a summary")
    p.add_argument("--data", help="flowers102 folder (default: $TAXOCLIP_DATA/flowers102 or ../shared/data/flowers102)")
    p.add_argument(
        "-o", "--output", default="runs/demo", help="folder for everything the demo makes (default runs/demo)"
    )
    p.add_argument("--quick", action="store_true", help="a few classes only, for a smoke test")
    p.set_defaults(handler=cmd_demo)


FOLDER_OUTPUTS = {"shards", "features", "train", "eval", "demo", "export open_clip"}  # -o: a folder; else a file


def writes_folder(args: argparse.Namespace) -> bool:
    return args.command in FOLDER_OUTPUTS or f"{args.command} {getattr(args, 'target', '')}" in FOLDER_OUTPUTS


def check_output(args: argparse.Namespace) -> None:
    """-o must be a folder where a command writes a folder, and a file where it writes a file."""
    output = getattr(args, "output", None)
    if not output:
        return
    path = Path(output)
    if writes_folder(args) and path.is_file():
        raise TaxoclipError(f"-o {output} is a file; this command writes a folder there: give a folder path")
    if not writes_folder(args) and path.is_dir():
        raise TaxoclipError(f"-o {output} is a folder; this command writes a file: give a file path")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("taxoclip")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # "shards verify DIR" reads naturally, but "shards SOURCE" takes a positional too, so verify
    # gets a parser of its own rather than an argparse sub-subcommand.
    if argv[:2] == ["shards", "verify"]:
        parser, argv = build_verify_parser(), argv[2:]
    else:
        parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        configure_allocator()  # TAXOCLIP_MALLOC: how much freed memory a long job hands back
        check_output(args)
        output = getattr(args, "output", None)
        with output_lock(output, folder=writes_folder(args)) if output else nullcontext():
            return handler(args)
    except TaxoclipError as error:
        print(f"taxoclip {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # the file system said no (permissions, a file where a folder goes, space)
        where = f" ({error.filename})" if error.filename else ""
        print(f"taxoclip {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
