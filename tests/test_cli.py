"""The command line takes its choices and defaults from the library, and stays instant to start."""

import subprocess
import sys
from dataclasses import asdict

from taxoclip.apps.cli import build_parser, train_config_from
from taxoclip.data.captions import STYLE_NAMES
from taxoclip.data.sources import FORMATS
from taxoclip.eval.config import EvalConfig
from taxoclip.taxonomy import Rank
from taxoclip.train.lit_config import TrainConfig


def choices_of(parser, dest):
    return next(a for a in parser._actions if a.dest == dest).choices


def subparser(*names):
    parser = build_parser()
    for name in names:
        action = next(a for a in parser._actions if a.dest in ("command", "trainer", "target"))
        parser = action.choices[name]
    return parser


def test_train_defaults_are_the_librarys():
    args = build_parser().parse_args(["train", "lit", "--features", "f", "-o", "m"])
    from_cli = asdict(train_config_from(args))
    library = asdict(TrainConfig(features="f", output="m"))
    assert from_cli == library


def test_catlip_defaults_are_the_librarys():
    from taxoclip.apps.cli import catlip_config_from
    from taxoclip.train.catlip_config import CatLIPConfig

    args = build_parser().parse_args(["train", "catlip", "--features", "f", "-o", "m"])
    assert asdict(catlip_config_from(args)) == asdict(CatLIPConfig(output="m", features="f"))


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
