"""The data commands: ``classes``, ``captions``, ``shards`` (and ``shards verify``), ``features``,
``questions`` and ``labels``: each parses its options and calls the library."""

from __future__ import annotations

import argparse
from pathlib import Path

from taxoclip.data.captions import STYLE_NAMES
from taxoclip.data.images import DECODES
from taxoclip.data.labels import EXTRACTORS
from taxoclip.data.questions import TYPES as QUESTION_TYPES
from taxoclip.data.shards import ShardOptions
from taxoclip.data.sources import FORMATS
from taxoclip.flag_types import NON_NEGATIVE, POSITIVE, POSITIVE_NUMBER


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="iNat JSON, CUB folder, image folder, or CSV of classes/images")
    parser.add_argument("--format", choices=FORMATS, help="override format detection")
    parser.add_argument("--root", help="folder that image paths in a JSON/CSV source are relative to")
    parser.add_argument("--classes", help="CSV of class metadata (for an image folder, or to replace the source's)")
    parser.add_argument("--class-column", help="the CSV column naming the class (default: detected)")
    parser.add_argument("--split", help="keep only this split (train, valid, test)")


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--style",
        default="auto",
        choices=STYLE_NAMES,
        help="caption style for the 'txt' field (default: auto, the columns that best separate classes)",
    )
    parser.add_argument(
        "--max-columns", type=POSITIVE, default=3, help="most metadata columns auto may combine (default 3)"
    )


def load_dataset(args: argparse.Namespace):
    from taxoclip.data.sources import load_source

    return load_source(
        args.source,
        format=args.format,
        root=args.root,
        classes=args.classes,
        class_column=args.class_column,
        split=args.split,
    )


def cmd_classes(args: argparse.Namespace) -> int:
    dataset = load_dataset(args)
    dataset.classes.to_csv(args.output)
    counts = {split: sum(1 for s in dataset.samples if s.split == split) for split in dataset.splits}
    print(f"{len(dataset.classes)} classes -> {args.output}; images per split: {counts or 'none'}")
    return 0


def cmd_captions(args: argparse.Namespace) -> int:
    from taxoclip.data.captions import build_captions, write_caption_config, write_captions_csv

    dataset = load_dataset(args)
    captions = build_captions(dataset.classes, args.style, max_columns=args.max_columns)
    write_captions_csv(dataset.classes, captions, args.output)
    config_path = Path(args.output).with_suffix(".json")
    write_caption_config(captions, config_path)
    print(f"auto chose {captions.choice.describe()}")
    print(f"style {args.style}: {captions.collisions()} classes share a caption")
    print(f"{len(dataset.classes)} captions -> {args.output} (configuration in {config_path})")
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from taxoclip.data.captions import build_captions
    from taxoclip.data.shards import ShardOptions, write_shards

    dataset = load_dataset(args)
    captions = build_captions(dataset.classes, args.style, max_columns=args.max_columns)
    options = ShardOptions(
        seed=args.seed,
        max_count=args.shard_size,
        max_bytes=int(args.shard_mb * 1e6) if args.shard_mb else None,
        resize=args.resize,
        workers=args.workers or ShardOptions().workers,
        progress=not args.quiet,
    )
    manifest = write_shards(dataset, args.output, captions, options, overwrite=args.overwrite)
    print_shard_summary(manifest, args.output)
    return 0


def print_shard_summary(manifest: dict, out: str) -> None:
    totals, run = manifest["totals"], manifest.get("run", {})
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['count']} images in {entry['classes']} classes, {len(entry['shards'])} shards")
    print(
        f"input {totals['input']} = written {totals['written']} + rejected {totals['rejected']}"
        + (f" ({', '.join(f'{n} {r}' for r, n in totals['reject_reasons'].items())})" if totals["rejected"] else "")
    )
    if run:
        print(
            f"{run['shards_written']} shards written, {run['shards_resumed']} kept from an earlier run, "
            f"{run['images_per_second']} images/s"
        )
    for reject in manifest["rejects"][:10]:
        print(f"  rejected {reject['path']}: {reject['reason']}")
    if totals["rejected"] > 10:
        print(f"  ... and {totals['rejected'] - 10} more, listed in {Path(out) / 'manifest.json'}")
    print(f"shards and manifest.json in {out}")


def cmd_verify(args: argparse.Namespace) -> int:
    from taxoclip.data.shards import verify_shards

    report = verify_shards(args.directory, decode=args.decode, progress=not args.quiet)
    for problem in report.problems:
        print(f"problem: {problem}")
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(f"verify {status}: {report.samples} samples in {report.shards} shards")
    return 0 if report.ok else 1


def cmd_features(args: argparse.Namespace) -> int:
    from taxoclip.models.extraction import extract_features

    cache = extract_features(
        args.data,
        args.tower,
        args.output,
        split=args.split,
        **({"batch_size": args.batch_size} if args.batch_size else {}),
        workers=args.workers,
        device=args.device,
        decode=args.decode,
        pretrained=not args.random_weights,
        progress=not args.quiet,
        format=args.format,
        root=args.root,
        classes=args.classes,
        class_column=args.class_column,
    )
    meta = cache.meta
    if cache.computed_now:
        print(
            f"{meta['count']} embeddings of width {meta['tower']['width']} in {meta['seconds']} s "
            f"({meta['count'] / max(meta['seconds'], 1e-9):.1f} images/s)"
        )
    else:
        print(f"served from the cache in {args.output} (same tower and data)")
    print(f"per split: {meta['split_counts']}; rejected: {meta['rejected']}")
    for reject in meta["rejects"][:10]:
        print(f"  rejected {reject.get('path', reject['key'])}: {reject['reason']}")
    print(f"tower {meta['tower']['name']} (id {meta['tower']['id']}) -> {args.output}")
    return 0


def cmd_questions(args: argparse.Namespace) -> int:
    from taxoclip.data.questions import write_questions

    options = {k: getattr(args, k) for k in ("format", "root", "classes", "class_column") if getattr(args, k)}
    types = tuple(t.strip() for t in args.types.split(",") if t.strip()) if args.types else QUESTION_TYPES
    counts = write_questions(args.source, args.output, seed=args.seed, types=types, **options)
    print(f"{counts['questions']} questions about {counts['photos']} photos -> {args.output}")
    if counts["malformed"]:
        print(
            f"skipped {counts['malformed']} malformed shard samples (no key, class or split); "
            "'taxoclip shards verify' lists them"
        )
    print("by type: " + ", ".join(f"{k} {v}" for k, v in counts["by_type"].items()))
    print("by split: " + ", ".join(f"{k} {v}" for k, v in counts["by_split"].items()))
    if counts["yes_no"]:
        print(f"yes/no answers: {counts['yes_no'].get('yes', 0)} yes, {counts['yes_no'].get('no', 0)} no")
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from taxoclip.data.labels import build_vocabulary, class_labels, label_data

    options = {k: getattr(args, k) for k in ("format", "root", "classes", "class_column") if getattr(args, k)}
    classes, captions, images = label_data(args.source, args.split, **options)
    per_class = class_labels(classes, captions, args.extractor, args.style)
    vocabulary = build_vocabulary(
        classes,
        per_class,
        images,
        extractor=args.extractor,
        style=args.style,
        min_count=args.min_count,
        max_size=args.max_size,
    )
    vocabulary.save(args.output)
    coverage = vocabulary.coverage
    print(f"{len(vocabulary)} labels ({args.extractor}) from {len(classes)} classes, counted in {vocabulary.counted}")
    print(
        f"classes without a label: {coverage['classes_without_label']}; deepest rank covered: "
        f"{coverage['deepest_rank_covered']}; {coverage['mean_labels_per_class']} labels per class"
    )
    shared = ", ".join(f"{x['label']} ({x['classes']})" for x in coverage["most_shared_labels"][:5])
    print(f"most shared: {shared}")
    print(f"vocabulary -> {args.output}")
    return 0


def add_data_parsers(commands) -> None:
    """classes, captions, shards."""
    p = commands.add_parser("classes", help="write the class table (one row per class, every rank) as CSV")
    add_source_arguments(p)
    p.add_argument("-o", "--output", required=True, help="CSV to write")
    p.set_defaults(handler=cmd_classes)

    p = commands.add_parser("captions", help="write every class's captions (all styles) as CSV")
    add_source_arguments(p)
    add_caption_arguments(p)
    p.add_argument("-o", "--output", required=True, help="CSV to write (its .json sibling gets the configuration)")
    p.set_defaults(handler=cmd_captions)

    p = commands.add_parser(
        "shards",
        help="pack images and captions as WebDataset shards ('shards verify DIR' checks them)",
        epilog="Check written shards with: taxoclip shards verify DIR",
    )
    add_source_arguments(p)
    add_caption_arguments(p)
    p.add_argument("-o", "--output", required=True, help="folder for the shards and manifest.json")
    p.add_argument(
        "--shard-size",
        type=POSITIVE,
        default=ShardOptions.max_count,
        help=f"most samples per shard (default {ShardOptions.max_count})",
    )
    p.add_argument(
        "--shard-mb", type=POSITIVE_NUMBER, help="most megabytes per shard (with --shard-size, whichever comes first)"
    )
    p.add_argument("--seed", type=int, default=ShardOptions.seed, help=f"shuffle seed (default {ShardOptions.seed})")
    p.add_argument("--resize", type=POSITIVE, help="re-encode as JPEG with the shorter side at most this many pixels")
    p.add_argument("--workers", type=POSITIVE, help="processes writing shards (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards made from other inputs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_shards)
    add_cache_parsers(commands)


def add_cache_parsers(commands) -> None:
    """features, questions, labels."""
    p = commands.add_parser("features", help="embed every image once with a locked image tower (cached, resumable)")
    p.add_argument("data", help="a shard folder (from 'taxoclip shards') or any source")
    p.add_argument(
        "--tower",
        default="efficientnet-lite0",
        help="image tower: efficientnet-lite0, timm:NAME, open_clip:ARCH[/TAG] (default efficientnet-lite0)",
    )
    p.add_argument("-o", "--output", required=True, help="cache folder")
    p.add_argument("--split", help="embed only this split")
    p.add_argument("--batch-size", type=POSITIVE, help="photos per forward pass (default: extract_features's)")
    p.add_argument("--workers", type=NON_NEGATIVE, help="decoding processes (default: half the cores)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--decode",
        choices=DECODES,
        default="auto",
        help="where JPEGs are decoded: workers (CPU processes), device (batched where the tower runs: "
        "nvJPEG on a GPU), auto (device on a GPU, else workers; default)",
    )
    p.add_argument("--random-weights", action="store_true", help="the tower's architecture with random weights")
    p.add_argument("--format", choices=FORMATS, help="source format, when not shards")
    p.add_argument("--root", help="image root of a JSON/CSV source")
    p.add_argument("--classes", help="class CSV for an image folder source")
    p.add_argument("--class-column", help="the CSV column naming the class")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_features)

    p = commands.add_parser(
        "questions", help="questions about every photo from its class row (species QA data), as JSON lines"
    )
    p.add_argument("source", help="a feature cache (keys join its embeddings), shards, or any source")
    p.add_argument("--format", choices=FORMATS, help="source format, when not a cache or shards")
    p.add_argument("--root", help="image root of a JSON/CSV source")
    p.add_argument("--classes", help="class CSV for an image folder source")
    p.add_argument("--class-column", help="the CSV column naming the class")
    p.add_argument("-o", "--output", required=True, help="the JSON-lines file to write")
    p.add_argument("--types", help=f"question types, comma-separated (default all: {', '.join(QUESTION_TYPES)})")
    p.add_argument("--seed", type=int, default=0, help="phrasings, distractors, yes/no order (default 0)")
    p.set_defaults(handler=cmd_questions)

    p = commands.add_parser("labels", help="CatLIP's label vocabulary from a class table's taxonomy or its captions")
    add_source_arguments(p)
    p.add_argument("-o", "--output", required=True, help="vocabulary JSON to write")
    p.add_argument("--extractor", default="taxonomy", choices=EXTRACTORS, help="taxonomy (default) or wordnet")
    p.add_argument("--style", default="paper", choices=STYLE_NAMES, help="caption style wordnet reads (default paper)")
    p.add_argument("--min-count", type=POSITIVE, default=1, help="drop labels carried by fewer training photos (V_tau)")
    p.add_argument("--max-size", type=POSITIVE, help="keep at most this many labels, the most frequent")
    p.set_defaults(handler=cmd_labels, split="train")


def build_verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxoclip shards verify", description="re-read shards and check them against their manifest"
    )
    parser.add_argument("directory", help="folder written by 'taxoclip shards'")
    parser.add_argument("--decode", action="store_true", help="also decode every image")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=cmd_verify, command="shards verify")
    return parser
