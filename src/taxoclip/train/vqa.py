"""Species question answering on the shared loop. Stage 1: the projector learns to turn cached
image embeddings into tokens the frozen language model answers from (``--stage captions``: through
the language model's loss on class captions, as LLaVA; ``--stage names``: regressed onto the
language model's own embeddings of the class line, `models/name_alignment.py`). Stage 2 (``lora_rank > 0``,
optionally starting from a stage-1 directory's projector): LoRA adapters on the language model
train with it. Questions come from 'taxoclip questions' (keys of the same feature cache); training
uses the train split's photos, evaluation answers valid photos' questions (closed ones by the most
likely candidate, open ones greedily; normalised exact match, by type). `taxoclip eval` gives the
full report with its controls (`eval/vqa.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from taxoclip.data.chat import collate, encode, encode_conversation
from taxoclip.data.features import load_features
from taxoclip.data.keyset import KeySet
from taxoclip.data.question_file import QuestionFile
from taxoclip.data.questions import normalise_answer, stable
from taxoclip.errors import TaxoclipError
from taxoclip.models.language import load_language_model
from taxoclip.models.vqa import Projector, VQAModel, answer_record, attach_lora, read_seen_photos, save_vqa
from taxoclip.runtime import Runtime
from taxoclip.train.loop import Batch, Trainer, run_training
from taxoclip.train.vqa_config import VQAConfig

__all__ = ["VQAConfig", "VQATrainer", "train_vqa"]
CAPTION_PROMPT = "Describe this photo."
NAME_EVAL_PHOTOS = 512  # held-out photos whose decoded class lines each evaluation checks


class VQATrainer(Trainer):
    def __init__(self, config: VQAConfig, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.cache = load_features(config.features)
        # Indexed, not read: at iNat2021's size the file holds ~27M questions.
        self.questions = QuestionFile(config.questions, self.cache)
        if self.questions.missing:
            runtime.print(
                f"note: {self.questions.missing} of the questions are about photos {config.features} does not hold "
                f"(left out; {len(self.questions)} kept)"
            )
        self.train_positions = self.questions.in_split("train")
        if not len(self.train_positions):
            raise TaxoclipError(f"{config.questions}: no question about a training photo")
        self.eval_records = self.questions.smallest(
            self.questions.in_split("train", keep=False),
            config.eval_questions,
            key=lambda r: stable(config.seed, "eval", r["key"], r["question"]),
        )
        lm, self.tokenizer = load_language_model(config.language_model)
        for parameter in lm.parameters():
            parameter.requires_grad_(False)
        self.train_photo_rows = np.unique(self.questions.rows[self.train_positions])
        rows = self.train_photo_rows[:: max(1, len(self.train_photo_rows) // 4096)]
        sample = torch.from_numpy(np.asarray(self.cache.features[rows], np.float32))
        hidden = lm.get_input_embeddings().embedding_dim
        projector = Projector(sample.shape[1], hidden, config.image_tokens, sample.mean(0), sample.std(0))
        self.earlier_photos = KeySet.of([])
        if config.init_from:
            self.earlier_photos = self.start_from(projector, Path(config.init_from))
        adapters = attach_lora(lm, config.lora_rank, config.lora_alpha, config.targets) if config.lora_rank else None
        lm.to(runtime.device)
        self.module = VQAModel(lm, self.tokenizer, projector.to(runtime.device), adapters)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # training questions grouped by photo (once: a conversation takes one photo's slice)
        self.by_photo = self.train_positions[np.argsort(self.questions.rows[self.train_positions], kind="stable")]
        starts = np.searchsorted(self.questions.rows[self.by_photo], self.train_photo_rows)
        self.photo_bounds = np.append(starts, len(self.by_photo))  # photo p: by_photo[bounds[p]:bounds[p + 1]]
        self.grounder = None
        if config.grounding:
            self.ground(config)
        if config.stage == "names":
            self.align_names(config)

    def align_names(self, config: VQAConfig) -> None:
        """Stage 1 by name alignment: each class's line as K target token ids, and the photos
        whose decoded lines evaluation checks (never training photos)."""
        from taxoclip.models.name_alignment import filler_id, name_token_ids

        self.name_ids, longest = name_token_ids(self.tokenizer, self.cache.classes, config.image_tokens)
        self.filler = filler_id(self.tokenizer)
        if longest > config.image_tokens:
            self.runtime.print(
                f"note: the longest class line is {longest} tokens; --image-tokens {config.image_tokens} keeps the "
                f"first {config.image_tokens} of each (give --image-tokens {longest} for whole lines)"
            )
        held = np.flatnonzero(~self.cache.split_mask("train"))
        order = sorted(held, key=lambda row: stable(config.seed, "names eval", self.cache.keys[int(row)]))
        self.name_eval_rows = np.sort(np.asarray(order[:NAME_EVAL_PHOTOS], dtype=np.int64))

    def ground(self, config: VQAConfig) -> None:
        """Each photo's identifier line: cross-fitted for the training photos (from probes that
        never saw them), the grounding model's own for the photos evaluation asks about."""
        from taxoclip.models.grounding import cross_fitted, open_grounding, summarise_with

        self.identifier, self.grounder = open_grounding(config.grounding, self.cache)
        self.runtime.print(
            f"grounding: {self.identifier.kind} identifier {config.grounding}; cross-fitting {config.grounding_folds} "
            f"probes for the {len(self.train_photo_rows)} training photos' lines"
        )
        self.train_summaries = cross_fitted(
            self.cache, self.grounder, self.train_photo_rows, config.grounding_folds, config.seed
        )
        self.eval_rows = np.unique([r["row"] for r in self.eval_records]).astype(np.int64)
        self.eval_summaries = summarise_with(self.identifier, self.grounder, self.cache, self.eval_rows)

    def training_line(self, row: int) -> tuple[str | None, int]:
        """(the identifier's line, the photo's place in the training summaries) for a training row."""
        if self.grounder is None:
            return None, -1
        i = int(np.searchsorted(self.train_photo_rows, row))
        return self.grounder.text(self.train_summaries, i), i

    def eval_line(self, row: int) -> str | None:
        if self.grounder is None:
            return None
        return self.grounder.text(self.eval_summaries, int(np.searchsorted(self.eval_rows, row)))

    def target(self, record: dict, place: int) -> str:
        return record["answer"] if self.grounder is None else self.grounder.target(record, self.train_summaries, place)

    def start_from(self, projector: Projector, folder: Path) -> KeySet:
        """Load a stage-1 directory's projector (LLaVA's stage 2 starts there); the photos it saw."""
        from taxoclip.models.bundle import read_config
        from taxoclip.tensor_files import load_tensors, load_weights_into

        if not (folder / "config.json").is_file():
            raise TaxoclipError(
                f"--init-from {folder}: not a model directory; give a stage-1 one from 'taxoclip train vqa'"
            )
        earlier = read_config(folder)
        shape = earlier.get("projector", {})
        mine = {"width": int(projector.mean.shape[0]), "hidden": projector.hidden, "tokens": projector.tokens}
        if earlier.get("kind") != "vqa" or shape != mine:
            raise TaxoclipError(
                f"--init-from {folder}: not a vqa model with this projector's shape {mine} "
                f"(it has {shape or 'none'}); use the same features, language model and --image-tokens"
            )
        if earlier.get("image_tower", {}).get("id") != self.cache.meta["tower"]["id"]:
            raise TaxoclipError(
                f"--init-from {folder}: trained on another image tower's embeddings than {self.config.features}"
            )
        weights, fix = folder / "projector.safetensors", "give --init-from a whole stage-1 model directory"
        load_weights_into(projector, load_tensors(weights, fix), weights, fix)
        return read_seen_photos(folder)

    def param_groups(self) -> list[dict]:
        groups = []
        if self.config.lr > 0:
            groups.append(
                {
                    "params": list(self.module.projector.parameters()),
                    "lr": self.config.lr,
                    "weight_decay": self.config.weight_decay,
                }
            )
        else:  # --lr 0: the projector stays as --init-from left it (no gradient, no optimiser state)
            self.module.projector.requires_grad_(False)
        if len(self.module.adapters):
            groups.append(
                {"params": list(self.module.adapters.parameters()), "lr": self.config.lora_lr, "weight_decay": 0.0}
            )
        return groups

    def conversation_mode(self) -> bool:
        return self.config.stage in ("captions", "names") or self.config.turns != 1

    def steps_per_epoch(self) -> int:
        units = len(self.train_photo_rows) if self.conversation_mode() else len(self.train_positions)
        steps = max(1, units // self.config.batch_size)
        return min(steps, self.config.max_steps_per_epoch or steps)

    def batches(self, epoch: int) -> Iterator[Batch]:
        """This rank's share of each global batch of training questions, with their photos' embeddings."""
        config, runtime, device = self.config, self.runtime, self.runtime.device
        rng = np.random.default_rng([config.seed, epoch])
        units = np.arange(len(self.train_photo_rows)) if self.conversation_mode() else self.train_positions
        order = rng.permutation(units)
        size = min(config.batch_size, len(order))
        for step in range(min(len(order) // size, self.steps_per_epoch())):
            mine = runtime.share(order[step * size : (step + 1) * size])
            if config.stage == "names":
                rows = np.sort(self.train_photo_rows[mine])
                features = torch.from_numpy(np.asarray(self.cache.features[rows], np.float32))
                ids = torch.from_numpy(self.name_ids[self.cache.labels[rows].astype(np.int64)])
                yield Batch({"features": features.to(device), "name_ids": ids.to(device)}, len(rows))
                continue
            if config.stage == "captions":
                rows, encoded = self.caption_examples(mine, epoch)
            elif self.conversation_mode():
                rows, encoded = self.conversations(mine, rng)
            else:
                chosen = self.questions.records(mine)  # read from disk, a batch at a time
                rows, encoded = [r["row"] for r in chosen], []
                for r in chosen:
                    context, place = self.training_line(r["row"])
                    encoded.append(encode(self.tokenizer, r["question"], self.target(r, place), context=context))
            text = collate(encoded, self.pad_id)
            features = torch.from_numpy(np.asarray(self.cache.features[rows], np.float32))
            inputs = {"features": features.to(device)} | {k: v.to(device) for k, v in text.items()}
            yield Batch(inputs, len(rows))

    def conversations(self, photos: np.ndarray, rng) -> tuple[list[int], list]:
        """Each photo's questions (at most --turns, in a fresh order each epoch) as one conversation."""
        rows, encoded = [], []
        for photo in photos:
            positions = rng.permutation(self.by_photo[self.photo_bounds[photo] : self.photo_bounds[photo + 1]])
            if self.config.turns:
                positions = positions[: self.config.turns]
            records = self.questions.records(positions)
            row = int(self.train_photo_rows[photo])
            context, place = self.training_line(row)
            turns = [(r["question"], self.target(r, place)) for r in records]
            rows.append(row)
            encoded.append(encode_conversation(self.tokenizer, turns, context=context))
        return rows, encoded

    def caption_examples(self, photos: np.ndarray, epoch: int) -> tuple[list[int], list]:
        """LLaVA's stage 1 on our data: "Describe this photo." answered by the photo's class
        caption, in a caption style drawn per photo and epoch."""
        by_class = self.cache.meta["captions"]["by_class"]
        rows, encoded = [], []
        for photo in photos:
            row = int(self.train_photo_rows[photo])
            styles = sorted(by_class[int(self.cache.labels[row])].items())
            _, caption = styles[stable(self.config.seed, "caption", row, epoch) % len(styles)]
            rows.append(row)
            encoded.append(encode(self.tokenizer, CAPTION_PROMPT, caption))
        return rows, encoded

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Normalised exact match on valid questions, overall and by type: closed questions
        (yes/no, multiple choice) answered by the most likely candidate, open ones greedily."""
        if self.config.stage == "names":
            return self.evaluate_names()
        if not self.eval_records:
            return {}
        self.module.eval()
        right: dict[str, list[bool]] = {}
        for record in self.eval_records:
            features = torch.from_numpy(np.asarray(self.cache.features[[record["row"]]], np.float32))
            answer = answer_record(self.module, features.to(self.runtime.device), record, self.eval_line(record["row"]))
            right.setdefault(record["type"], []).append(normalise_answer(answer) == normalise_answer(record["answer"]))
        self.module.train()
        every = [x for values in right.values() for x in values]
        return {"exact_match": float(np.mean(every))} | {f"exact_{t}": float(np.mean(v)) for t, v in right.items()}

    @torch.no_grad()
    def evaluate_names(self) -> dict:
        """Held-out photos' image tokens decoded to the nearest vocabulary token: the share of
        their class lines' tokens that come out right, and of whole lines."""
        from taxoclip.models.name_alignment import nearest_lines, tokens_right

        if not len(self.name_eval_rows):
            return {}
        rows = self.name_eval_rows
        features = torch.from_numpy(np.asarray(self.cache.features[rows], np.float32)).to(self.runtime.device)
        ids = torch.from_numpy(self.name_ids[self.cache.labels[rows].astype(np.int64)])
        self.module.eval()
        projected = self.module.projector(features).cpu()
        self.module.train()
        embeddings = self.module.lm.get_input_embeddings().weight.cpu()
        tokens, lines = tokens_right(projected, embeddings, ids, self.filler)
        named = nearest_lines(projected, embeddings, torch.from_numpy(self.name_ids)).numpy()
        right_class = float(np.mean(named == self.cache.labels[rows]))
        return {"name_tokens_right": tokens, "name_lines_right": lines, "name_class_right": right_class}


def train_vqa(config: VQAConfig) -> dict:
    """Stage 1 on the shared loop, then the model directory (kind ``vqa``)."""
    trainer, history, runtime = run_training(config, VQATrainer, lambda t: t.cache.meta["cache_key"])
    if runtime.is_main:
        # the leakage guard: every photo whose embedding trained the projector or the adapters,
        # in this run and in the stage-1 run it started from
        seen = KeySet(np.unique(trainer.cache.keys.array[trainer.train_photo_rows])).union(trainer.earlier_photos)
        training = asdict(config) | {
            "world_size": runtime.world_size,
            "saw": {"cache_key": trainer.cache.meta["cache_key"], "split": "train", "photos": len(seen)},
        }
        if config.grounding:
            training["grounding"] = {
                "model": str(Path(config.grounding).resolve()) if Path(config.grounding).exists() else config.grounding,
                "kind": trainer.identifier.kind,
                "training_lines": f"cross-fitted softmax probes, {config.grounding_folds} folds",
                "threshold": trainer.grounder.threshold,
            }
        lora = (
            {"rank": config.lora_rank, "alpha": config.lora_alpha, "targets": list(config.targets)}
            if config.lora_rank
            else None
        )
        save_vqa(
            Path(config.output),
            trainer.module,
            trainer.cache.classes,
            trainer.cache.meta["tower"],
            config.language_model,
            training,
            seen,
            lora,
        )
    runtime.barrier()
    return history[-1] if history else {}
