"""Every model directory's ``README.md``: a model card in the Hugging Face format (a YAML header
with ``library_name``, ``tags``, ``datasets``, ``base_model`` and the measured ``model-index``
results; then prose), so the folder is ready for ``huggingface-cli upload``.

It is made from what the directory records, and made again whenever that grows: its config.json
(kind, towers, training settings, held-out classes), its training log's last row (the run's valid
numbers), the feature cache it trained on (which data, how many photos), its open-set record
(`novelty.json`) and what `eval` measured on it (``evaluations.json``, one entry per data and split).
"""

from __future__ import annotations

import json
from pathlib import Path

from taxoclip.taxonomy import Rank

CARD, EVALUATIONS = "README.md", "evaluations.json"
TASK = {"type": "image-classification", "name": "Species identification"}
# the towers' names on the Hugging Face hub, where they have one
HUB_NAMES = {
    "efficientnet-lite0": "timm/tf_efficientnet_lite0.in1k",
    "efficientnet-lite1": "timm/tf_efficientnet_lite1.in1k",
    "efficientnet-lite2": "timm/tf_efficientnet_lite2.in1k",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
KIND_TAGS = {
    "lit": ["zero-shot-image-classification", "lit", "clip"],
    "catlip": ["catlip", "multi-label"],
    "finetune": ["fine-tuned"],
    "vqa": ["visual-question-answering", "llava"],
}
METRIC_NAMES = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "balanced": "balanced accuracy"}


def hub_name(tower: str | None) -> str | None:
    """A tower's hub id (``timm:NAME`` -> timm/NAME, ``open_clip:hf-hub:ORG/NAME`` -> ORG/NAME)."""
    if not tower:
        return None
    if tower in HUB_NAMES:
        return HUB_NAMES[tower]
    for prefix, hub in (("timm:", "timm/"), ("open_clip:hf-hub:", ""), ("hf:", "")):
        if tower.startswith(prefix):
            name = tower[len(prefix) :]
            return hub + name if "/" in hub + name and not Path(name).exists() else None
    return None


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def last_log_row(folder: Path) -> dict:
    rows = [line for line in read_json_lines(folder / "metrics.jsonl")]
    return rows[-1] if rows else {}


def read_json_lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def record_evaluation(folder: Path, data: str, split: str, metrics: dict) -> None:
    """Keep an `eval` result beside the model (one entry per data and split) and remake its card."""
    evaluations = [e for e in read_json(folder / EVALUATIONS, []) if (e["data"], e["split"]) != (data, split)]
    evaluations.append({"data": data, "split": split, "metrics": metrics})
    (folder / EVALUATIONS).write_text(json.dumps(evaluations, indent=1))
    write_model_card(folder)


def write_model_card(folder: str | Path) -> Path:
    """(Re)write the model card of the model directory ``folder`` from what it records."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = read_json(folder / "config.json", {})
    kind, training = config.get("kind", "model"), config.get("training") or {}
    cache_meta = read_json(Path(training["features"]) / "meta.json", {}) if training.get("features") else {}
    data = cache_meta.get("data") or {}
    dataset = Path(str(data.get("path") or training.get("shards") or "unknown data")).name
    classes = read_classes_rows(folder)
    towers = model_towers(config)
    final = last_log_row(folder)
    evaluations = read_json(folder / EVALUATIONS, [])
    results = measured_results(final, evaluations, dataset)
    header = ModelCardData(
        library_name="taxoclip",
        tags=["taxoclip", "biology", "species-identification", *KIND_TAGS.get(kind, [])],
        datasets=[dataset],
        base_model=[hub for hub in (hub_name(t) for t in towers.values()) if hub] or None,
        model_name=folder.name,
        eval_results=results or None,
        license="mit",  # taxoclip's own licence; the towers' weights keep theirs (see base_model)
    )
    lines = body(folder, kind, config, training, classes, towers, final, evaluations, dataset, cache_meta)
    card = ModelCard(f"---\n{header.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    (folder / CARD).write_text(str(card))
    return folder / CARD


def measured_results(final: dict, evaluations: list[dict], dataset: str) -> list:
    """The model-index entries: the training run's last valid numbers, then each eval's."""
    from huggingface_hub import EvalResult

    def accuracy(data: str, split: str, value: float, name: str) -> EvalResult:
        return EvalResult(
            TASK["type"], data, f"{data} {split}", "accuracy", round(value, 4),
            task_name=TASK["name"], dataset_split=split, metric_name=name,
        )  # fmt: skip

    results = [
        accuracy(dataset, "valid", final[k], title) for k, title in METRIC_NAMES.items() if is_number(final.get(k))
    ]
    if is_number(final.get("exact_match")):
        results.append(
            EvalResult(
                "visual-question-answering",
                dataset,
                f"{dataset} valid questions",
                "exact_match",
                round(final["exact_match"], 4),
                dataset_split="valid",
                metric_name="exact match",
            )
        )
    for entry in evaluations:
        data, split, metrics = Path(entry["data"]).name, entry["split"], entry["metrics"]
        for rank, value in (metrics.get("per_rank") or {}).items():
            results.append(accuracy(data, split, value["rollup"], f"{rank} accuracy (eval)"))
        if is_number(metrics.get("top1")):
            results.append(accuracy(data, split, metrics["top1"], "top-1 accuracy (eval)"))
    return results


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_classes_rows(folder: Path) -> list[dict]:
    import csv

    try:
        with open(folder / "classes.csv", newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def model_towers(config: dict) -> dict[str, str]:
    towers = {"image tower": (config.get("image_tower") or {}).get("name")}
    lit = config.get("lit") or {}
    towers["text tower"] = lit.get("text_tower") or (config.get("training") or {}).get("text_tower")
    towers["language model"] = config.get("language_model")
    towers["identifier (grounding)"] = (config.get("grounding") or {}).get("model")
    return {role: name for role, name in towers.items() if name}


def body(folder, kind, config, training, classes, towers, final, evaluations, dataset, cache_meta) -> list[str]:
    """The card's prose: what it identifies, how it was trained, what it scored, its limits, how
    to load it."""
    ranks = [r.column for r in Rank if any(row.get(r.column) for row in classes)]
    held_out = training.get("held_out") or []
    lines = [
        f"# {folder.name}",
        "",
        f"A **{kind}** species identifier made with [taxoclip](https://github.com/) from the photos of `{dataset}`.",
        "",
        "## What it identifies",
        "",
        f"{len(classes)} classes"
        + (f" ({len(held_out)} of them held out of training)" if held_out else "")
        + (f", with names at these ranks: {', '.join(ranks)}." if ranks else "."),
        f"The class table came with the data (`{dataset}`); it is in `classes.csv` beside this card.",
        "",
        "## How it was trained",
        "",
        *[f"- {role}: `{name}`" for role, name in towers.items()],
    ]
    for key in ("epochs", "batch_size", "lr", "depth", "loss", "holdout", "balance", "lora_rank"):
        if training.get(key) not in (None, 0, False, ""):
            lines.append(f"- {key}: {training[key]}")
    if cache_meta.get("count"):
        lines.append(f"- photos embedded: {cache_meta['count']:,} ({cache_meta.get('split_counts', {})})")
    lines.append(f"- processes: {training.get('world_size', 1)}")
    lines += ["", "## What it scored", ""]
    shown = [f"{title} {100 * final[key]:.1f}%" for key, title in METRIC_NAMES.items() if key in final]
    if "exact_match" in final:
        shown.append(f"exact match {100 * final['exact_match']:.1f}%")
    lines.append(
        f"The training run's last evaluation on valid: {', '.join(shown)}." if shown else "No evaluation was recorded."
    )
    for entry in evaluations:
        metrics = entry["metrics"]
        per_rank = ", ".join(f"{rank} {100 * v['rollup']:.1f}%" for rank, v in (metrics.get("per_rank") or {}).items())
        lines.append(
            f"- `taxoclip eval` on {entry['data']} ({entry['split']}): top-1 {100 * metrics.get('top1', 0):.1f}%"
            + (f"; at each rank: {per_rank}" if per_rank else "")
        )
    novelty = read_json(folder / "novelty.json", {})
    lines += ["", "## Known limits", ""]
    lines.append(
        "- It names only the species in its class table. "
        + (
            f"Photos of other species are flagged by its open-set score (`{novelty['score']}`, threshold "
            f"{novelty['threshold']:.4g}, keeping {100 * novelty.get('keep', 0.95):.0f}% of known photos)."
            if novelty
            else "No open-set score yet: `taxoclip openset --model DIR` adds one (`predict` computes it on first use)."
        )
    )
    if held_out:
        lines.append(f"- {len(held_out)} classes had no training photo; it names them only through what they share.")
    lines.append("- Classes with few training photos are recognised less reliably (see `per_class.csv` where present).")
    lines += [
        "",
        "## How to use it",
        "",
        "```bash",
        f"taxoclip predict photo.jpg --model {folder.name}",
        "```",
        "",
        "```python",
        "import taxoclip",
        "",
        f'model = taxoclip.load("{folder.name}")',
        'taxoclip.predict(model, ["photo.jpg"], rank="genus")',
        "```",
    ]
    return lines


def write_open_clip_card(folder: Path, source: Path, record: dict) -> Path:
    """The card of an open_clip export (``taxoclip export open_clip``): the source model's card
    with open_clip as its library and the ways to open it without taxoclip."""
    from huggingface_hub import ModelCard

    source_card = source / CARD
    card = ModelCard.load(source_card) if source_card.exists() else ModelCard("")  # a model from before cards
    card.data.library_name = "open_clip"
    card.data.tags = sorted({*(card.data.tags or []), "open_clip", "clip", "zero-shot-image-classification"})
    crop = record["taxoclip"]["crop_pct"]
    card.text = (card.text or "").rstrip() + "\n".join(
        [
            "",
            "",
            "## Open it with open_clip or pybioclip (no taxoclip needed)",
            "",
            f"Exported by `taxoclip export open_clip` from `{source.name}`. `classes.txt` lists its "
            f"{len(read_classes_rows(folder))} classes; `class_embeddings.npy` holds the exact classifier "
            "taxoclip scores with (its captions are in `captions.json`).",
            "",
            "```python",
            "import numpy as np, open_clip, torch",
            "from PIL import Image",
            "",
            'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:THIS_FOLDER")',
            "model.eval()  # open_clip returns models in training mode; BatchNorm towers need eval()",
            'classes = torch.from_numpy(np.load("THIS_FOLDER/class_embeddings.npy"))',
            'image = model.encode_image(preprocess(Image.open("photo.jpg")).unsqueeze(0), normalize=True)',
            "probabilities = (model.logit_scale.exp() * image @ classes.T).softmax(-1)",
            "```",
            "",
            "```python",
            "from bioclip import CustomLabelsClassifier",
            "",
            'names = open("THIS_FOLDER/classes.txt").read().splitlines()',
            'classifier = CustomLabelsClassifier(cls_ary=names, model_str="local-dir:THIS_FOLDER")',
            "classifier.model.eval()  # pybioclip 2.1 leaves the model in training mode",
            'classifier.predict(["photo.jpg"], k=5)',
            "```",
            "",
            "```bash",
            "bioclip predict --cls THIS_FOLDER/classes.txt --model local-dir:THIS_FOLDER photo.jpg",
            "```",
            "",
            "pybioclip (2.1) never puts the model in evaluation mode. Its command line is right for image "
            "towers without BatchNorm (ViTs); with a BatchNorm tower such as EfficientNet-Lite, each photo is "
            "normalised by its own batch's statistics and the answers are wrong: use it from Python as above.",
            "",
            "open_clip's transform resizes a photo's shorter side to the input size and crops it; taxoclip "
            f"resizes to size / {crop:g} first. The weights are the same function (checked to 1e-4 on the same "
            "pixels at export); on photos the probabilities differ by what that crop changes. pybioclip builds "
            "class embeddings from its own prompt templates around the names in `--cls`, not from this "
            "model's captions, so its probabilities differ from taxoclip's too.",
        ]
    )
    card.save(folder / CARD)
    return folder / CARD
