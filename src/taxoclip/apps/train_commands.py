"""``taxoclip train NAME`` and ``taxoclip train sweep NAME``, built from the trainer table
(`taxoclip.train.registry.TRAINERS`): each trainer's flags come from its settings' field metadata
(`taxoclip.train.settings.option`), so a new trainer needs no line here."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field

from taxoclip.errors import TaxoclipError
from taxoclip.train.registry import TRAINERS, entry, settings_class, summary_lines, train_function
from taxoclip.train.settings import flagged


def field_default(f: Field):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def add_settings(parser: argparse.ArgumentParser, settings: type) -> None:
    """One option per flagged field of ``settings``, stored under the field's name, with its
    default shown in the help."""
    for f in flagged(settings):
        options = dict(f.metadata["argparse"])
        default = field_default(f)
        required = default is MISSING
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if default not in (MISSING, None) and options.get("action") not in ("store_true", "store_false"):
            shown = ",".join(default) if isinstance(default, list) else default
            help_text = f"{help_text} (default {shown})"
        parser.add_argument(
            *f.metadata["flags"],
            dest=f.name,
            required=required,
            default=None if required else default,
            help=help_text,
            **options,
        )


def settings_from(args: argparse.Namespace, settings: type):
    """The settings dataclass from parsed options: every flagged field, by name."""
    return settings(**{f.name: getattr(args, f.name) for f in flagged(settings) if hasattr(args, f.name)})


def cmd_train(args: argparse.Namespace) -> int:
    from taxoclip.runtime import setup

    settings = settings_from(args, settings_class(args.trainer))
    final = train_function(args.trainer)(settings)
    runtime = setup(settings.device)  # under torchrun: only rank 0 reports
    for line in summary_lines(args.trainer, final, settings):
        runtime.print(line)
    return 0


def cmd_train_sweep(args: argparse.Namespace) -> int:
    from taxoclip.train.sweep import default_warmups, markdown, parse_values, run_sweep, setting_name

    settings = settings_from(args, settings_class(args.sweep_trainer))
    if args.sweep_trainer == "lit" and args.param is None:  # the paper's warm-up study
        param = "warmup_steps"
        given = args.values or args.warmups
        values = parse_values(settings, param, given, flag_of(args, param)) if given else None
        values = values or default_warmups(settings)
    else:
        if not args.param or not args.values:
            raise TaxoclipError("give the setting to vary and its values: --param lr --values 1e-4,3e-4,1e-3")
        param = setting_name(settings, args.param)
        values = parse_values(settings, param, args.values, flag_of(args, param))
    result = run_sweep(args.sweep_trainer, settings, param, values)
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


def add_train_parser(commands) -> None:
    """``train NAME`` for every registered trainer, and ``train sweep NAME``."""
    p = commands.add_parser("train", help=f"train a model: {', '.join(f'train {n}' for n in TRAINERS)}, or train sweep")
    trainers = p.add_subparsers(dest="trainer", metavar="TRAINER", required=True)
    for name in TRAINERS:
        q = trainers.add_parser(name, help=entry(name).help)
        add_settings(q, settings_class(name))
        q.set_defaults(handler=cmd_train)
    q = trainers.add_parser(
        "sweep", help="a study: one run per value of a setting, compared in one table and plot (chosen on selection)"
    )
    studies = q.add_subparsers(dest="sweep_trainer", metavar="TRAINER", required=True)
    for name in TRAINERS:
        r = studies.add_parser(
            name, help=f"{name} runs" + (" (default: the paper's warm-up study)" if name == "lit" else "")
        )
        add_settings(r, settings_class(name))
        if name == "lit":
            r.add_argument("--warmups", help="warm-up steps to compare, comma-separated (default: 0.5, 1, 2 epochs)")
        add_sweep_arguments(r)
    q.set_defaults(handler=cmd_train_sweep)
