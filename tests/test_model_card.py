"""Every model directory carries a model card in the Hugging Face format, parsed here by
huggingface_hub's own parser, with the numbers its run (and `eval`) measured."""

from __future__ import annotations

import json

import pytest

from taxoclip.apps.cli import main


def card_of(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


@pytest.mark.parametrize("kind", ["finetune", "catlip"])
def test_a_trained_directory_has_a_card_with_its_runs_numbers_and_evals(kind, colour_features, tmp_path):
    model = tmp_path / kind
    assert main(["train", kind, "--features", str(colour_features), "-o", str(model), "--epochs", "2", "-q"]) == 0
    card = card_of(model)
    final = json.loads((model / "metrics.jsonl").read_text().splitlines()[-1])
    top1 = next(r for r in card.data.eval_results if r.metric_name == "top-1 accuracy")
    assert top1.metric_value == round(final["top1"], 4) and top1.dataset_split == "valid"
    assert (card.data.library_name == "taxoclip" and kind in card.data.tags) or kind == "finetune"
    assert "6 classes" in card.text and "## How to use it" in card.text and "timm:test_efficientnet" in card.text
    assert (
        main(
            [
                "eval",
                "--model",
                str(model),
                "--data",
                str(colour_features),
                "-o",
                str(tmp_path / "r"),
                "-q",
                "--no-baselines",
            ]
        )
        == 0
    )
    card = card_of(model)
    assert any(r.metric_name == "family accuracy (eval)" for r in card.data.eval_results)
    assert "`taxoclip eval` on" in card.text


def test_lit_card_names_its_towers_on_the_hub_and_vqa_cards_parse(colour_features, tiny_text_tower, tmp_path):
    from taxoclip.models.model_card import hub_name
    from taxoclip.train.lit import LiTSettings, train_lit

    model = tmp_path / "lit"
    train_lit(
        LiTSettings(
            features=str(colour_features), output=str(model), text_tower=tiny_text_tower, epochs=1, progress=False
        )
    )
    card = card_of(model)
    assert card.data.eval_results and "text tower" in card.text
    assert hub_name("efficientnet-lite0") == "timm/tf_efficientnet_lite0.in1k"
    assert hub_name("open_clip:hf-hub:imageomics/bioclip") == "imageomics/bioclip"
    assert hub_name("timm:vit_base_patch16_224") == "timm/vit_base_patch16_224"
