"""Species question answering on real flowers (EfficientNet-Lite0 embeddings, SmolLM2-135M-Instruct
from PyPI), side by side in one run:

- training speed: questions per second for stage 1 (the projector, the language model frozen) with
  K = 1 and K = 4 image tokens, and stage 2 (+ LoRA rank 8 on q, k, v, o) with K = 1; interleaved
  steps, medians;
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
from taxoclip.data.chat import collate, encode
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
