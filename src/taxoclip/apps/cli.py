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

from taxoclip.data.captions import STYLE_NAMES  # the library's own choices and defaults: all light
from taxoclip.data.images import DECODES
from taxoclip.data.labels import EXTRACTORS
from taxoclip.data.questions import TYPES as QUESTION_TYPES
from taxoclip.data.shards import ShardOptions
from taxoclip.data.sources import FORMATS
from taxoclip.errors import TaxoclipError
from taxoclip.eval.config import EvalConfig
from taxoclip.output_lock import output_lock
from taxoclip.taxonomy import Rank
from taxoclip.train.catlip_config import DEPTHS, SCORINGS, CatLIPConfig
from taxoclip.train.finetune_config import HEADS, FinetuneConfig
from taxoclip.train.lit_config import LOSSES, PROJECTION_INITS, TrainConfig
from taxoclip.train.vqa_config import VQAConfig

RANKS = [rank.column for rank in Rank]
LINEAGE_RANKS = RANKS[:-1]  # kingdom ... genus: the species is the answer itself


def at_least(minimum: float, kind: type = int):
    """An argparse type: a finite number of ``kind`` that is at least ``minimum`` (NaN and infinity
    refused)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}"
            ) from None
        if not value >= minimum:  # also false for NaN
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        if value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum}"
    return parse


POSITIVE, NON_NEGATIVE = at_least(1), at_least(0)
POSITIVE_NUMBER = at_least(1e-12, float)
NON_NEGATIVE_NUMBER = at_least(0.0, float)


def probability(text: str) -> float:
    value = NON_NEGATIVE_NUMBER(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def port_number(text: str) -> int:
    value = POSITIVE(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {text}")
    return value


def default(config_class: type, name: str):
    """The library's default for one field of a settings dataclass (what --help shows)."""
    field = next(f for f in fields(config_class) if f.name == name)
    return field.default_factory() if field.default is MISSING else field.default


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


def train_config_from(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the parsed options: fields with an option of the same name, plus the few
    the command line spells differently."""
    same = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    styles = [s.strip() for s in args.styles.split(",")]
    return TrainConfig(
        **same
        | {
            "styles": styles,
            "eval_style": args.eval_style or styles[0],
            "text_layers": None if str(args.text_layers) in ("all", "-1") else int(args.text_layers),
            "progress": not args.quiet,
        }
    )


def cmd_train_lit(args: argparse.Namespace) -> int:
    from taxoclip.runtime import setup
    from taxoclip.train.lit import train_lit

    final = train_lit(train_config_from(args))
    runtime = setup(args.device)  # under torchrun: only rank 0 reports
    if "top1" in final:
        runtime.print(f"final zero-shot on valid: top-1 {100 * final['top1']:.1f}%, top-5 {100 * final['top5']:.1f}%")
    runtime.print(f"model, metrics.csv and plots in {args.output} (open it with taxoclip.load)")
    return 0


def cmd_train_sweep(args: argparse.Namespace) -> int:
    from taxoclip.train.sweep import default_warmups, markdown, parse_values, run_sweep, setting_name

    config = {"lit": train_config_from, "catlip": catlip_config_from, "finetune": finetune_config_from}[
        args.sweep_trainer
    ](args)
    if args.sweep_trainer == "lit" and args.param is None:  # the paper's warm-up study
        param = "warmup_steps"
        given = args.values or args.warmups
        values = parse_values(config, param, given, flag_of(args, param)) if given else None
        values = values or default_warmups(config)
    else:
        if not args.param or not args.values:
            raise TaxoclipError("give the setting to vary and its values: --param lr --values 1e-4,3e-4,1e-3")
        param = setting_name(config, args.param)
        values = parse_values(config, param, args.values, flag_of(args, param))
    result = run_sweep(args.sweep_trainer, config, param, values)
    print(markdown(result["rows"], param, result["chosen"]))
    print(f"table, plot and runs in {args.output} (sweep.md, sweep.png, sweep.csv, sweep.json)")
    return 0


def flag_of(args: argparse.Namespace, name: str):
    """The sweep's view of a setting's own flag (None for a field with no flag)."""
    from taxoclip.train.sweep import FlagParser

    return FlagParser(*args.sweep_flags[name]) if name in args.sweep_flags else None


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--param", help="the setting to vary, by its flag or field name (lr, balance, depth, warmup ...)")
    p.add_argument("--values", help="its values, comma-separated ('none' for an absent value)")
    # Each value goes through its setting's own flag: the same type, range and choices.
    flags = {
        action.dest: (action.option_strings[-1], action.type, action.choices)
        for action in p._actions
        if action.option_strings and action.dest not in ("help", "param", "values")
    }
    p.set_defaults(sweep_flags=flags)


def settings_of(p: argparse.ArgumentParser, config_class: type):
    """``setting(flag, field, help, ...)``: an option stored under the settings field's own name,
    with the field's default, shown in the help."""

    def setting(flag: str, name: str, help: str, **options) -> None:
        value = default(config_class, name)
        shown = ",".join(value) if isinstance(value, list) else value
        p.add_argument(flag, dest=name, default=shown, help=f"{help} (default {shown})", **options)

    return setting


def add_loop_settings(setting, holdout: bool = True) -> None:
    """The options every trainer shares (the training loop's and, with ``holdout``, the held-out
    classes')."""
    setting("--batch-size", "batch_size", "the global batch, shared among processes", type=POSITIVE)
    setting("--epochs", "epochs", "passes over the training photos", type=POSITIVE)
    setting("--weight-decay", "weight_decay", "AdamW weight decay", type=NON_NEGATIVE_NUMBER)
    setting("--warmup", "warmup_steps", "linear warm-up steps before the cosine decay", type=NON_NEGATIVE)
    setting("--grad-clip", "grad_clip", "gradient norm clip", type=POSITIVE_NUMBER)
    if holdout:
        setting("--holdout", "holdout", "classes left out of training, to measure unseen classes", type=NON_NEGATIVE)
        setting("--holdout-seed", "holdout_seed", "which classes are left out", type=int)
    setting("--seed", "seed", "data order, caption styles, dropout", type=int)
    setting("--device", "device", "auto, cpu, cuda, cuda:1 ...")
    setting("--eval-every", "eval_every", "epochs between evaluations on valid (the last always)", type=POSITIVE)
    setting(
        "--steps-per-epoch",
        "max_steps_per_epoch",
        "cap on steps per epoch: a step budget where one pass over every row is too long",
        type=POSITIVE,
    )


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    setting = settings_of(p, TrainConfig)
    add_loop_settings(setting)

    p.add_argument("--features", required=True, help="feature cache from 'taxoclip features' (train + valid)")
    p.add_argument("-o", "--output", required=True, help="model directory to write")
    setting("--text-tower", "text_tower", "minilm-l6, hf:NAME_OR_PATH, open_clip:ARCH")
    setting("--styles", "styles", "caption styles to train on, comma-separated, sampled per step")
    p.add_argument("--eval-style", help="caption style for evaluation (default: the first training style)")
    setting("--loss", "loss", "class: same-class images are positives; clip: standard CLIP loss", choices=LOSSES)
    setting(
        "--rank-weight",
        "rank_weight",
        "hierarchy-aware targets: genus/family/order captions contrasted too and added to each class's embedding",
        type=NON_NEGATIVE_NUMBER,
    )
    setting("--lr", "lr", "learning rate of projections and temperature", type=NON_NEGATIVE_NUMBER)
    setting("--text-lr", "text_lr", "learning rate of the text tower's trainable blocks", type=NON_NEGATIVE_NUMBER)
    setting("--text-layers", "text_layers", "top text blocks that train (0 = projection only, or all)", type=str)
    setting(
        "--image-projection",
        "image_projection",
        "a trainable linear map on the locked image embeddings",
        action=argparse.BooleanOptionalAction,
    )
    p.add_argument("--embed-dim", type=POSITIVE, help="shared embedding width (with --image-projection)")
    setting(
        "--projection-init",
        "projection_init",
        "ridge: start the text projection from a fit to class-mean image embeddings",
        choices=PROJECTION_INITS,
    )
    p.add_argument("--image-in-loop", action="store_true", help="run the image tower every step (the slow baseline)")
    p.add_argument("--unlock-image", action="store_true", help="train the image tower too (needs --shards)")
    p.add_argument("--shards", help="the shards, for --image-in-loop / --unlock-image")
    p.add_argument("-q", "--quiet", action="store_true")


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


def cmd_train_vqa(args: argparse.Namespace) -> int:
    from taxoclip.train.vqa import VQAConfig, train_vqa

    same = {f.name: getattr(args, f.name) for f in fields(VQAConfig) if hasattr(args, f.name)}
    final = train_vqa(VQAConfig(**same | {"progress": not args.quiet}))
    if "exact_match" in final:
        print(f"valid questions answered exactly: {100 * final['exact_match']:.1f}%")
    print(f"model in {args.output} (kind vqa: taxoclip ask PHOTO QUESTION --model {args.output})")
    return 0


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


def depth_settings_from(args: argparse.Namespace, config_class: type):
    """A tower-depth trainer's settings (CatLIP, fine-tuning) from its parsed arguments."""
    same = {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}
    return config_class(**same | {"pretrained": not args.random_weights, "progress": not args.quiet})


def catlip_config_from(args: argparse.Namespace) -> CatLIPConfig:
    return depth_settings_from(args, CatLIPConfig)


def cmd_train_catlip(args: argparse.Namespace) -> int:
    from taxoclip.runtime import setup
    from taxoclip.train.catlip import train_catlip

    final = train_catlip(catlip_config_from(args))
    runtime = setup(args.device)
    if "top1" in final:
        runtime.print(f"final on valid: top-1 {100 * final['top1']:.1f}%, top-5 {100 * final['top5']:.1f}%")
    if "unseen_top1" in final:
        runtime.print(f"held-out classes among themselves: top-1 {100 * final['unseen_top1']:.1f}%")
    runtime.print(f"model in {args.output} (kind catlip: predict, eval, serve and export open it)")
    return 0


def add_catlip_arguments(p: argparse.ArgumentParser) -> None:
    setting = settings_of(p, CatLIPConfig)
    add_loop_settings(setting)
    add_depth_arguments(p, setting)
    p.add_argument("--vocabulary", help="vocabulary.json from 'taxoclip labels' (default: built from the features)")
    setting("--extractor", "extractor", "labels from the taxonomy or from captions' WordNet nouns", choices=EXTRACTORS)
    setting("--style", "style", "caption style the wordnet extractor reads", choices=STYLE_NAMES)
    setting("--min-count", "min_count", "drop labels carried by fewer training photos (V_tau)", type=POSITIVE)
    p.add_argument("--max-size", type=POSITIVE, help="keep at most this many labels, the most frequent")
    setting("--lr", "lr", "learning rate", type=NON_NEGATIVE_NUMBER)
    setting(
        "--scoring",
        "scoring",
        "class scores from label logits: likelihood (their sum), standardised (that sum on one scale for "
        "every class, from the training photos' spread) or transfer (their mean)",
        choices=SCORINGS,
    )
    p.add_argument("-q", "--quiet", action="store_true")


def finetune_config_from(args: argparse.Namespace) -> FinetuneConfig:
    return depth_settings_from(args, FinetuneConfig)


def cmd_train_finetune(args: argparse.Namespace) -> int:
    from taxoclip.runtime import setup
    from taxoclip.train.finetune import train_finetune

    final = train_finetune(finetune_config_from(args))
    runtime = setup(args.device)
    if "top1" in final:
        runtime.print(
            f"valid: top-1 {100 * final['top1']:.1f}%, top-5 {100 * final['top5']:.1f}%, "
            f"balanced {100 * final['balanced']:.1f}%"
        )
    if "select_top1" in final:
        runtime.print(f"selection split: top-1 {100 * final['select_top1']:.1f}%")
    runtime.print(f"model in {args.output} (kind finetune: predict, eval, serve and export open it)")
    return 0


def add_depth_arguments(p: argparse.ArgumentParser, setting) -> None:
    """Where the embeddings come from (train/depths): shared by catlip and finetune."""
    p.add_argument("--features", help="feature cache from 'taxoclip features' (for --depth head)")
    p.add_argument("--shards", help="the photos' shards (--depth upper: lower stages cached once; --depth full)")
    p.add_argument("-o", "--output", required=True, help="model directory to write")
    setting(
        "--depth", "depth", "what trains: the head, the tower's upper stages too, or the whole tower", choices=DEPTHS
    )
    setting("--tower", "tower", "image tower that trains (--depth upper, full): efficientnet-lite0/1/2, timm:NAME")
    setting("--train-blocks", "train_blocks", "final stages of the tower that train, for --depth upper", type=POSITIVE)
    p.add_argument("--activations", help="activation cache folder for --depth upper (default OUTPUT/activations)")
    setting(
        "--tower-lr", "tower_lr", "learning rate of the tower's stages (--depth upper, full)", type=NON_NEGATIVE_NUMBER
    )
    setting("--augment", "augment", "random crops and flips (--depth full)", action=argparse.BooleanOptionalAction)
    p.add_argument(
        "--random-weights", action="store_true", help="the tower's architecture with random weights (from scratch)"
    )
    setting("--select", "select_fraction", "share of train kept out to choose settings on", type=fraction_below_one)
    setting("--select-seed", "select_seed", "which training photos form the selection split", type=int)


def fraction_below_one(text: str) -> float:
    value = probability(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    setting = settings_of(p, FinetuneConfig)
    add_loop_settings(setting)
    add_depth_arguments(p, setting)
    setting("--head", "head", "the classifier on the tower's features", choices=HEADS)
    setting("--hidden", "hidden", "the MLP head's hidden width", type=POSITIVE)
    setting("--lr", "lr", "learning rate of the head", type=NON_NEGATIVE_NUMBER)
    setting("--balance", "balance", "N: every class gets N images per epoch, over/under-sampled", type=POSITIVE)
    setting(
        "--class-weighted",
        "class_weighted",
        "loss weights inversely proportional to class size (instead of --balance)",
        action=argparse.BooleanOptionalAction,
    )
    setting("--label-smoothing", "label_smoothing", "label smoothing of the targets", type=fraction_below_one)
    setting("--mixup", "mixup", "mixup alpha, --depth full (0: off)", type=NON_NEGATIVE_NUMBER)
    setting("--cutmix", "cutmix", "cutmix alpha, --depth full (0: off)", type=NON_NEGATIVE_NUMBER)
    setting("--layer-decay", "layer_decay", "per-stage learning-rate decay down the tower (1: off)", type=probability)
    setting(
        "--ema",
        "ema",
        "decay of a moving average of the weights, used for eval and saving (0: off)",
        type=fraction_below_one,
    )
    setting(
        "--patience", "patience", "stop after this many evaluations without a better selection top-1", type=NON_NEGATIVE
    )
    setting("--accumulate", "accumulate", "batches whose gradients make one optimiser step", type=POSITIVE)
    p.add_argument("-q", "--quiet", action="store_true")


def model_kind(model: str) -> str | None:
    """The kind a model directory's config names (None for open_clip:NAME or no directory)."""
    from taxoclip.models.bundle import read_config

    return read_config(Path(model)).get("kind") if (Path(model) / "config.json").is_file() else None


def cmd_eval_vqa(args: argparse.Namespace) -> int:
    from taxoclip.eval.vqa import ANSWERERS, VQAEvalConfig, run_vqa_evaluation

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
    print(f"  {'group':28s} " + " ".join(f"{w[:14]:>14s}" for w in ANSWERERS))
    for name, row in summary["exact_match"].items():
        shown = ("—" if row[w] is None else f"{100 * row[w]:.1f}" for w in ANSWERERS)
        print(f"  {name:28s} " + " ".join(f"{v:>14s}" for v in shown))
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
        return Predictor(classes, runner.preprocess, runner, subset=subset, threshold=threshold)
    if args.model is None:
        raise TaxoclipError("give --model (a model directory or open_clip:NAME) or --onnx")
    from taxoclip.models.registry import load_classifier

    classifier = load_classifier(args.model, classes=args.classes, style=args.style, scoring=args.scoring)
    return torch_predictor(classifier, subset=subset, threshold=threshold)


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
            "error",
        ]
    )
    for result in results:
        if result.error:
            writer.writerow([result.source, *[""] * 8, *[""] * len(LINEAGE_RANKS), result.error])
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

    path = export_onnx(args.model, args.output, classes=args.classes, style=args.style, scoring=args.scoring)
    print(f"ONNX model -> {path} (preprocessing and classes in {path}.json)")
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


def cmd_demo(args: argparse.Namespace) -> int:
    from taxoclip.apps.demo import run_demo

    return run_demo(data=args.data, out=args.output, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxoclip", description="Turn labelled organism photos into a vision-language species identifier."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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

    p = commands.add_parser(
        "train", help="train a model: 'train lit', 'train catlip', 'train finetune', or 'train sweep' (a study)"
    )
    trainers = p.add_subparsers(dest="trainer", metavar="TRAINER", required=True)
    q = trainers.add_parser("catlip", help="CatLIP: image features -> label vocabulary, binary cross-entropy")
    add_catlip_arguments(q)
    q.set_defaults(handler=cmd_train_catlip)
    q = trainers.add_parser("finetune", help="supervised fine-tuning: a head (and the tower) on the classes")
    add_finetune_arguments(q)
    q.set_defaults(handler=cmd_train_finetune)
    q = trainers.add_parser(
        "vqa", help="species question answering: a projector into a language model (stage 2: + LoRA adapters)"
    )
    setting = settings_of(q, VQAConfig)
    add_loop_settings(setting, holdout=False)
    q.add_argument("--features", required=True, help="feature cache the questions were made from")
    q.add_argument("--questions", required=True, help="JSON lines from 'taxoclip questions'")
    q.add_argument("-o", "--output", required=True, help="model directory to write")
    setting("--language-model", "language_model", "smollm2-135m (offline) or hf:NAME_OR_PATH")
    setting("--image-tokens", "image_tokens", "K: image tokens before the question", type=POSITIVE)
    setting("--lr", "lr", "learning rate of the projector", type=NON_NEGATIVE_NUMBER)
    setting("--eval-questions", "eval_questions", "valid questions answered at each evaluation", type=NON_NEGATIVE)
    setting("--lora-rank", "lora_rank", "stage 2: LoRA rank on the language model (0: stage 1 only)", type=NON_NEGATIVE)
    setting("--lora-alpha", "lora_alpha", "LoRA scale numerator (alpha / rank scales the update)", type=POSITIVE_NUMBER)
    setting("--lora-lr", "lora_lr", "learning rate of the LoRA adapters", type=NON_NEGATIVE_NUMBER)
    setting("--lora-targets", "lora_targets", "the language model's linear layers that get adapters")
    setting("--init-from", "init_from", "a stage-1 vqa model directory whose projector stage 2 starts from")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(handler=cmd_train_vqa)
    q = trainers.add_parser("lit", help="tune a text tower against the locked image tower's cached embeddings")
    add_train_arguments(q)
    q.set_defaults(handler=cmd_train_lit)
    q = trainers.add_parser(
        "sweep", help="a study: one run per value of a setting, compared in one table and plot (chosen on selection)"
    )
    studies = q.add_subparsers(dest="sweep_trainer", metavar="TRAINER", required=True)
    r = studies.add_parser("lit", help="LiT runs (default: the paper's warm-up study)")
    add_train_arguments(r)
    add_sweep_arguments(r)
    r.add_argument("--warmups", help="warm-up steps to compare, comma-separated (default: 0.5, 1, 2 epochs)")
    r = studies.add_parser("catlip", help="CatLIP runs")
    add_catlip_arguments(r)
    add_sweep_arguments(r)
    r = studies.add_parser("finetune", help="fine-tuning runs (lr, balance, depth, head, label smoothing ...)")
    add_finetune_arguments(r)
    add_sweep_arguments(r)
    q.set_defaults(handler=cmd_train_sweep)

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
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(handler=cmd_eval)

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

    p = commands.add_parser("export", help="export a model: 'export onnx'")
    formats = p.add_subparsers(dest="target", metavar="FORMAT", required=True)
    q = formats.add_parser("onnx", help="image tower + classifier head as one ONNX graph (checked with onnxruntime)")
    q.add_argument("--model", required=True, help="a model directory, or open_clip:NAME (with --classes)")
    q.add_argument("--classes", help="class CSV, for an open_clip model")
    q.add_argument("--style", help="caption style or 'templates' (default: the model's own)")
    add_scoring_argument(q)
    q.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    q.set_defaults(handler=cmd_export_onnx)

    p = commands.add_parser("demo", help="the whole path on real flower photos, with a summary")
    p.add_argument("--data", help="flowers102 folder (default: $TAXOCLIP_DATA/flowers102 or ../shared/data/flowers102)")
    p.add_argument(
        "-o", "--output", default="runs/demo", help="folder for everything the demo makes (default runs/demo)"
    )
    p.add_argument("--quick", action="store_true", help="a few classes only, for a smoke test")
    p.set_defaults(handler=cmd_demo)
    return parser


def build_verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxoclip shards verify", description="re-read shards and check them against their manifest"
    )
    parser.add_argument("directory", help="folder written by 'taxoclip shards'")
    parser.add_argument("--decode", action="store_true", help="also decode every image")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=cmd_verify, command="shards verify")
    return parser


FOLDER_OUTPUTS = {"shards", "features", "train", "eval", "demo"}  # -o names a folder; elsewhere a file


def check_output(args: argparse.Namespace) -> None:
    """-o must be a folder where a command writes a folder, and a file where it writes a file."""
    output = getattr(args, "output", None)
    if not output:
        return
    path = Path(output)
    if args.command in FOLDER_OUTPUTS and path.is_file():
        raise TaxoclipError(f"-o {output} is a file; this command writes a folder there: give a folder path")
    if args.command not in FOLDER_OUTPUTS and path.is_dir():
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
        check_output(args)
        output = getattr(args, "output", None)
        with output_lock(output, folder=args.command in FOLDER_OUTPUTS) if output else nullcontext():
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
