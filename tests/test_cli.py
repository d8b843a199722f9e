"""The command line takes its choices and defaults from the library, and stays instant to start."""

import subprocess
import sys
from dataclasses import asdict

import pytest

from taxoclip.apps.cli import build_parser
from taxoclip.apps.train_commands import settings_from
from taxoclip.data.captions import STYLE_NAMES
from taxoclip.data.sources import FORMATS
from taxoclip.eval.config import EvalConfig
from taxoclip.taxonomy import Rank
from taxoclip.train.registry import TRAINERS, settings_class
from taxoclip.train.settings import LoopSettings, flagged


def choices_of(parser, dest):
    return next(a for a in parser._actions if a.dest == dest).choices


def subparser(*names):
    parser = build_parser()
    for name in names:
        action = next(a for a in parser._actions if a.dest in ("command", "trainer", "target"))
        parser = action.choices[name]
    return parser


REQUIRED = {"vqa": {"features": "f", "questions": "q"}}  # the others: features (catlip, finetune: optional)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_train_defaults_are_the_librarys(name):
    """Every registered trainer's flags come from its settings: parsing nothing gives the library's
    defaults, whatever the trainer."""
    given = REQUIRED.get(name, {"features": "f"})
    arguments = [a for key, value in given.items() for a in (f"--{key}", value)]
    args = build_parser().parse_args(["train", name, *arguments, "-o", "m"])
    settings = settings_class(name)
    assert asdict(settings_from(args, settings)) == asdict(settings(output="m", **given))


@pytest.mark.parametrize("name", list(TRAINERS))
def test_each_shared_loop_setting_is_declared_once(name):
    """The loop's settings keep the one declaration's flag and type in every trainer (a trainer may
    change only the default and the help)."""
    shared = {f.name: f for f in flagged(LoopSettings)}
    for f in flagged(settings_class(name)):
        if f.name in shared:
            assert f.metadata["flags"] == shared[f.name].metadata["flags"], f.name
            assert f.metadata["argparse"] == shared[f.name].metadata["argparse"], f.name


def test_eval_defaults_and_choices_are_the_librarys():
    args = build_parser().parse_args(["eval", "--model", "m", "--data", "d", "-o", "r"])
    assert args.split == EvalConfig.split
    assert tuple(int(s) for s in args.shots.split(",")) == EvalConfig.shots
    assert choices_of(subparser("predict"), "rank") == [rank.column for rank in Rank]
    assert tuple(choices_of(subparser("captions"), "style")) == STYLE_NAMES
    assert tuple(choices_of(subparser("classes"), "format")) == FORMATS


def test_the_parser_imports_no_torch():
    code = "import sys; from taxoclip.apps.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # torch alone takes seconds to import
