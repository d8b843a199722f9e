"""The trainers, by name, as `taxoclip.models.registry.KINDS` lists model kinds: each one's settings
class (light, torch-free), its train function and the summary it prints when done. The command line
builds ``train NAME`` and ``train sweep NAME`` from this table, and a sweep finds its trainer here.

Adding a trainer is: its model module (writing a model directory of a kind `KINDS` opens), its
trainer module (a `taxoclip.train.loop.Trainer` and ``train(settings) -> final metrics``), its
settings (a dataclass on `taxoclip.train.settings.LoopSettings`), and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from taxoclip.errors import TaxoclipError


@dataclass(frozen=True)
class TrainerEntry:
    settings: str  # "module:Class": the settings dataclass (imported to build the command line)
    train: str  # "module:function": settings -> final metrics (imported only to train)
    help: str  # one line for `taxoclip train --help`
    summary: str | None = None  # "module:function": (final metrics, settings) -> lines to print


TRAINERS: dict[str, TrainerEntry] = {
    "lit": TrainerEntry(
        "taxoclip.train.lit_config:LiTSettings",
        "taxoclip.train.lit:train_lit",
        "tune a text tower against the locked image tower's cached embeddings",
        "taxoclip.train.lit_config:summary",
    ),
    "catlip": TrainerEntry(
        "taxoclip.train.catlip_config:CatLIPConfig",
        "taxoclip.train.catlip:train_catlip",
        "CatLIP: image features -> label vocabulary, binary cross-entropy",
        "taxoclip.train.catlip_config:summary",
    ),
    "finetune": TrainerEntry(
        "taxoclip.train.finetune_config:FinetuneConfig",
        "taxoclip.train.finetune:train_finetune",
        "supervised fine-tuning: a head (and the tower) on the classes",
        "taxoclip.train.finetune_config:summary",
    ),
    "vqa": TrainerEntry(
        "taxoclip.train.vqa_config:VQAConfig",
        "taxoclip.train.vqa:train_vqa",
        "species question answering: a projector into a language model (stage 2: + LoRA adapters)",
        "taxoclip.train.vqa_config:summary",
    ),
}


def entry(name: str) -> TrainerEntry:
    if name not in TRAINERS:
        raise TaxoclipError(f"unknown trainer {name!r}; use one of {', '.join(TRAINERS)}")
    return TRAINERS[name]


def resolve(target: str):
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def settings_class(name: str) -> type:
    return resolve(entry(name).settings)


def train_function(name: str):
    return resolve(entry(name).train)


def summary_lines(name: str, final: dict, settings) -> list[str]:
    target = entry(name).summary
    return list(resolve(target)(final, settings)) if target else []
