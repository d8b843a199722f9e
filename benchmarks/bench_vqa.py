"""Species question answering on real flowers (EfficientNet-Lite0 embeddings, SmolLM2-135M-Instruct
from PyPI), one short run, side by side:

- training speed (stage 1: the projector, the language model frozen): questions per second with
  K = 1 and K = 4 image tokens, interleaved steps, medians;
- answering speed: greedy answers per second with K = 1 and K = 4;
- a short stage-1 run (a budget of steps, not convergence on 2 cores) and its normalised exact
  match on valid questions, by type, against the language model answering the question alone
  (no image): the blind control.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_catlip import flowers_cache
from common import benchmark, interleaved_step_seconds
from taxoclip.data.chat import collate, encode
from taxoclip.data.questions import write_questions
from taxoclip.models.language import load_language_model
from taxoclip.models.vqa import Projector, VQAModel
from taxoclip.train.vqa import VQAConfig, VQATrainer, answer_record, normalise, train_vqa

STEPS, BATCH, ANSWERS = 100, 32, 100


@benchmark("vqa")
def bench_vqa(args) -> list[dict]:
    from taxoclip.runtime import setup

    cache = flowers_cache()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        questions = tmp / "qa.jsonl"
        write_questions(cache.path, questions)
        lm, tokenizer = load_language_model("smollm2-135m")
        for parameter in lm.parameters():
            parameter.requires_grad_(False)
        hidden = lm.get_input_embeddings().embedding_dim
        x, _ = cache.split("train")
        features = torch.from_numpy(np.asarray(x[:BATCH], np.float32))
        texts = [encode(tokenizer, "Which family does this plant belong to?", "Rosaceae")] * BATCH
        batch = collate(texts, tokenizer.pad_token_id or 0)
        models = {k: VQAModel(lm, tokenizer, Projector(x.shape[1], hidden, k)) for k in (1, 4)}
        median = interleaved_step_seconds(
            {
                k: (lambda m=model: m(features, **batch), list(model.projector.parameters()))
                for k, model in models.items()
            },
            3,
        )
        for k, seconds in median.items():
            rows.append({"what": f"stage-1 training, K = {k} (batch {BATCH})", "per_second": BATCH / seconds})
        answer_times = {k: [] for k in models}
        for i in range(6):
            for k, model in models.items():
                started = time.perf_counter()
                model.answer(features[i : i + 1], "Which family does this plant belong to?")
                answer_times[k].append(time.perf_counter() - started)
        for k, values in answer_times.items():
            rows.append({"what": f"ask, greedy answer, K = {k}", "per_second": 1 / statistics.median(values[1:])})

        config = VQAConfig(
            features=str(cache.path),
            questions=str(questions),
            output=str(tmp / "vqa"),
            batch_size=BATCH,
            epochs=1,
            max_steps_per_epoch=STEPS,
            eval_questions=ANSWERS,
            progress=False,
        )
        final = train_vqa(config)
        trainer = VQATrainer(config, setup("cpu"))  # the same evaluation questions, asked blind
        blind: dict[str, list[bool]] = {}
        for record in trainer.eval_records:
            answer = answer_record(trainer.module, None, record)
            blind.setdefault(record["type"], []).append(normalise(answer) == normalise(record["answer"]))
        rows.append(
            {
                "what": f"stage 1 after {STEPS} steps of {BATCH}: valid exact match, all types",
                "percent": 100 * final["exact_match"],
            }
        )
        for key in sorted(k for k in final if k.startswith("exact_") and k != "exact_match"):
            kind = key.removeprefix("exact_")
            rows.append(
                {
                    "what": f"  {kind}: with the image / the question alone",
                    "percent": 100 * final[key],
                    "blind_percent": 100 * float(np.mean(blind.get(kind, [0]))),
                }
            )
        every = [x for v in blind.values() for x in v]
        rows.append({"what": "the question alone (blind control), all types", "percent": 100 * float(np.mean(every))})
    return rows
