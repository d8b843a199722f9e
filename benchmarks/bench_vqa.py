"""Species question answering on real flowers (EfficientNet-Lite0 embeddings, SmolLM2-135M-Instruct
from PyPI), side by side in one run:

- training speed: questions per second for stage 1 (the projector, the language model frozen) with
  K = 1 and K = 4 image tokens, and stage 2 (+ LoRA rank 8 on q, k, v, o) with K = 1; interleaved
  steps, medians;
- supervised answers per second: one question a sequence (batch of 32 questions) against all of a
  photo's questions in one conversation (batch of 8 photos, about ten answers each), stage 2, with
  and without the identifier's line, on real flowers questions; interleaved steps, medians;
- answering speed: greedy answers per second with K = 1 and K = 4, and closed (yes/no) answers
  ranked by likelihood per second;
- accuracy: `taxoclip eval`'s report (exact match by type and rank beside the question-only,
  shuffled-image, majority and linear-probe controls) of a stage-1 model trained for a budget of
  steps here (TAXOCLIP_VQA_STEPS, default 100), or of TAXOCLIP_VQA_MODEL, a model directory
  trained on this cache; TAXOCLIP_VQA_PER_TYPE questions per type (default 40). The report lands
  in benchmarks/results/vqa-eval/.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from bench_catlip import HERE, flowers_cache
from common import benchmark, interleaved_step_seconds
from taxoclip.data.chat import collate, encode, encode_conversation
from taxoclip.data.questions import write_questions
from taxoclip.eval.vqa import ANSWERERS, VQAEvalConfig, run_vqa_evaluation
from taxoclip.models.language import load_language_model
from taxoclip.models.vqa import Projector, VQAModel, attach_lora
from taxoclip.train.vqa import VQAConfig, train_vqa

STEPS = int(os.environ.get("TAXOCLIP_VQA_STEPS", 100))
PER_TYPE = int(os.environ.get("TAXOCLIP_VQA_PER_TYPE", 40))
BATCH = 32
QUESTION = "Which family does this plant belong to?"


@benchmark("vqa")
def bench_vqa(args) -> list[dict]:
    cache = flowers_cache()
    rows: list[dict] = []
    lm, tokenizer = load_language_model("smollm2-135m")
    tuned_lm, _ = load_language_model("smollm2-135m")  # a second copy carries the LoRA adapters
    for parameter in [*lm.parameters(), *tuned_lm.parameters()]:
        parameter.requires_grad_(False)
    hidden = lm.get_input_embeddings().embedding_dim
    x, _ = cache.split("train")
    features = torch.from_numpy(np.asarray(x[:BATCH], np.float32))
    batch = collate([encode(tokenizer, QUESTION, "Rosaceae")] * BATCH, tokenizer.pad_token_id or 0)
    models = {f"stage 1, K = {k}": VQAModel(lm, tokenizer, Projector(x.shape[1], hidden, k)) for k in (1, 4)}
    adapters = attach_lora(tuned_lm, 8, 16.0)
    models["stage 2 (LoRA r 8), K = 1"] = VQAModel(tuned_lm, tokenizer, Projector(x.shape[1], hidden, 1), adapters)
    median = interleaved_step_seconds(
        {name: (lambda m=model: m(features, **batch), list(model.parameters())) for name, model in models.items()}, 3
    )
    for name, seconds in median.items():
        rows.append({"what": f"training, {name} (batch {BATCH})", "per_second": BATCH / seconds})
    rows += answers_per_second(cache, tuned_lm, tokenizer, models["stage 2 (LoRA r 8), K = 1"])
    timings: dict[str, list[float]] = {}
    for i in range(6):
        for name in ("stage 1, K = 1", "stage 1, K = 4"):
            for how, run in {
                "greedy answer": lambda m=models[name], f=features[i : i + 1]: m.answer(f, QUESTION),
                "yes/no ranked": lambda m=models[name], f=features[i : i + 1]: m.rank(f, QUESTION, ["yes", "no"]),
            }.items():
                started = time.perf_counter()
                run()
                timings.setdefault(f"ask, {how}, {name.removeprefix('stage 1, ')}", []).append(
                    time.perf_counter() - started
                )
    for name, values in timings.items():
        rows.append({"what": name, "per_second": 1 / statistics.median(values[1:])})
    del models, lm, tuned_lm
    rows += accuracy_rows(cache)
    return rows


def photo_questions(cache, photos: int) -> list[list[dict]]:
    """The questions of the first ``photos`` training photos of the flowers questions file."""
    import json

    path = HERE / "results" / "vqa-eval" / "qa.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        write_questions(cache.path, path)
    grouped: dict[str, list[dict]] = {}
    with open(path) as handle:
        for line in handle:
            record = json.loads(line)
            if record["split"] == "train" and (record["key"] in grouped or len(grouped) < photos):
                grouped.setdefault(record["key"], []).append(record)
            elif len(grouped) >= photos and record["key"] not in grouped:
                break
    return list(grouped.values())


def answers_per_second(cache, lm, tokenizer, model) -> list[dict]:
    """Supervised answers a second: one question a sequence vs one conversation a photo, side by side."""
    from taxoclip.models.grounding import Grounder

    photos = photo_questions(cache, BATCH)
    x, _ = cache.split("train")
    line = Grounder(cache.classes).text(
        Grounder(cache.classes).summarise(torch.full((1, len(cache.classes)), 1.0 / len(cache.classes)).softmax(-1)), 0
    )
    pad = tokenizer.pad_token_id or 0
    singles = [r for group in photos for r in group][:BATCH]
    conversations = photos[:8]
    runs, answers = {}, {}
    for grounded in (False, True):
        context = line if grounded else None
        tag = ", grounded" if grounded else ""
        one = collate([encode(tokenizer, r["question"], r["answer"], context=context) for r in singles], pad)
        many = collate(
            [
                encode_conversation(tokenizer, [(r["question"], r["answer"]) for r in g], context=context)
                for g in conversations
            ],
            pad,
        )
        f_one = torch.from_numpy(np.asarray(x[: len(singles)], np.float32))
        f_many = torch.from_numpy(np.asarray(x[: len(conversations)], np.float32))
        runs[f"one question a sequence{tag}"] = (lambda b=one, f=f_one: model(f, **b), list(model.parameters()))
        runs[f"one conversation a photo{tag}"] = (lambda b=many, f=f_many: model(f, **b), list(model.parameters()))
        answers[f"one question a sequence{tag}"] = len(singles)
        answers[f"one conversation a photo{tag}"] = sum(len(g) for g in conversations)
    median = interleaved_step_seconds(runs, 3)
    base = {
        g: answers[f"one question a sequence{g}"] / median[f"one question a sequence{g}"] for g in ("", ", grounded")
    }
    out = []
    for name, seconds in median.items():
        per_second = answers[name] / seconds
        tag = ", grounded" if name.endswith("grounded") else ""
        out.append(
            {
                "what": f"stage 2 training, {name} ({answers[name]} answers a step)",
                "per_second": per_second,
                "vs one question a sequence": per_second / base[tag],
            }
        )
    return out


def accuracy_rows(cache) -> list[dict]:
    out = HERE / "results" / "vqa-eval"
    questions = out / "qa.jsonl"
    write_questions(cache.path, questions)
    model = os.environ.get("TAXOCLIP_VQA_MODEL")
    trained = f"the model {model}"
    if not model:
        model = str(out / "model")
        config = VQAConfig(
            features=str(cache.path),
            questions=str(questions),
            output=model,
            batch_size=BATCH,
            epochs=1,
            max_steps_per_epoch=STEPS,
            eval_questions=0,
            progress=False,
        )
        train_vqa(config)
        trained = f"stage 1 after {STEPS} steps of {BATCH} questions"
    summary = run_vqa_evaluation(
        VQAEvalConfig(model=model, data=str(cache.path), questions=str(questions), output=str(out), per_type=PER_TYPE)
    )
    rows = []
    for group, values in summary["exact_match"].items():
        if group == "all" or group.startswith("type ") or group.startswith("rank "):
            shown = {who: None if values[who] is None else 100 * values[who] for who in ANSWERERS}
            rows.append({"what": f"exact match %, {group} ({values['questions']} q)", **shown})
    rows.append({"what": f"accuracy rows: {trained}; report in {out}/report.md"})
    return rows
