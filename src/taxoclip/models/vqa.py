"""Species question answering's model: the locked image tower's embedding, projected by a
two-layer MLP (LLaVA's ``mlp2x_gelu``) into K tokens of a causal language model's input space,
prefixed to the templated question (`data.chat`). Stage 1 trains the projector only; the language
model stays as it came. Stage 2 (optional, LLaVA's second stage made light) adds LoRA adapters to
the language model's attention projections (``peft``) and trains them with the projector.

Model directory (kind ``vqa``):
  config.json              language model name, K, widths, image tower record, training record
                           (which cache and split the projector saw: the leakage guard reads it)
  projector.safetensors    the projector and its input standardisation
  adapters.safetensors     stage 2 only: the LoRA adapters' weights (config "lora" says where)
  seen_photos.txt.gz       the keys of every photo whose embedding trained the projector or the
                           adapters (the leakage guard of ``taxoclip eval``)
  classes.csv              the class table of the training photos
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import nn

from taxoclip.data.chat import IGNORE, collate, encode, end_of_turn
from taxoclip.data.keyset import KeySet
from taxoclip.data.questions import candidates_of
from taxoclip.errors import TaxoclipError
from taxoclip.models.name_alignment import alignment_loss

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Projector(nn.Module):
    """Standardised image embedding (width) -> K tokens of the language model (K, hidden)."""

    def __init__(self, width: int, hidden: int, tokens: int, mean=None, std=None):
        super().__init__()
        self.tokens, self.hidden = tokens, hidden
        self.register_buffer("mean", torch.zeros(width) if mean is None else mean.float())
        self.register_buffer("std", torch.ones(width) if std is None else std.float().clamp(min=1e-6))
        self.layers = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, tokens * hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.float() - self.mean) / self.std
        return self.layers(x).view(len(features), self.tokens, self.hidden)


def attach_lora(language_model, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> nn.ModuleDict:
    """LoRA adapters injected into the language model's ``targets`` linear layers, in place (peft);
    returns them as one ModuleDict (the same modules the language model now calls), everything
    else in the language model frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise TaxoclipError("stage 2 (--lora-rank) needs peft: pip install 'taxoclip[vqa]'") from None
    for parameter in language_model.parameters():
        parameter.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")
    try:
        inject_adapter_in_model(config, language_model)
    except ValueError as error:  # no layer of that name in this architecture
        raise TaxoclipError(f"--lora-targets {','.join(targets)}: {error}") from None
    adapters = nn.ModuleDict()
    for name, layer in language_model.named_modules():
        if isinstance(layer, LoraLayer):
            adapters[name.replace(".", "-")] = nn.ModuleDict(
                {"A": layer.lora_A["default"], "B": layer.lora_B["default"]}
            )
    for parameter in adapters.parameters():
        parameter.requires_grad_(True)
    return adapters


class VQAModel(nn.Module):
    """The projector (and, in stage 2, the LoRA adapters) are this module's only registered parts:
    the frozen language model is held beside it, so checkpoints, DDP and the model directory carry
    what trains and never the 135M frozen weights. The adapters are the very modules the language
    model calls, registered here too."""

    def __init__(self, language_model, tokenizer, projector: Projector, adapters: nn.ModuleDict | None = None):
        super().__init__()
        self.__dict__["lm"] = language_model  # not a submodule: never checkpointed or synchronised
        self.tokenizer, self.projector = tokenizer, projector
        self.adapters = adapters if adapters is not None else nn.ModuleDict()

    def inputs(self, features: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(input embeddings, attention mask): the image's K tokens (when given) before the text."""
        text = self.lm.get_input_embeddings()(input_ids)
        if features is None:
            return text, attention_mask
        image = self.projector(features).to(text.dtype)
        ones = torch.ones(len(input_ids), image.shape[1], dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([image, text], 1), torch.cat([ones, attention_mask], 1)

    def forward(self, features, input_ids=None, attention_mask=None, labels=None, name_ids=None) -> torch.Tensor:
        """The answer tokens' mean cross-entropy (the language model shifts the labels itself);
        with ``name_ids`` (stage 1 by name alignment), the image tokens' distance to the language
        model's embeddings of those ids instead."""
        if name_ids is not None:
            return alignment_loss(self.projector(features), self.lm.get_input_embeddings().weight, name_ids)
        embeddings, mask = self.inputs(features, input_ids, attention_mask)
        if features is not None:
            prefix = torch.full((len(labels), self.projector.tokens), IGNORE, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([prefix, labels], 1)
        return self.lm(inputs_embeds=embeddings, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def answer(
        self, features: torch.Tensor | None, question: str, max_new_tokens: int = 24, context: str | None = None
    ) -> str:
        """Greedy decoding of the answer to one question (``features``: one image's embedding, or
        None for the question alone; ``context``: the identifier's line of a grounded model): a
        batch of one."""
        return self.answer_batch(features, [question], max_new_tokens, [context])[0]

    @torch.no_grad()
    def answer_batch(
        self,
        features: torch.Tensor | None,
        questions: list[str],
        max_new_tokens: int = 24,
        contexts: list[str | None] | None = None,
    ) -> list[str]:
        """Greedy answers to several questions in one batch (``features``: one row per question,
        or None). Prompts are left-padded, padding masked out, so each answer is the one
        `answer` gives alone (generation numbers positions from the mask)."""
        end = end_of_turn(self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else end
        contexts = contexts or [None] * len(questions)
        prompts = [encode(self.tokenizer, q, context=c).input_ids for q, c in zip(questions, contexts, strict=True)]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        device = self.projector.mean.device
        embeddings, attention = self.inputs(features, ids.to(device), mask.to(device))
        out = self.lm.generate(
            inputs_embeds=embeddings,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end,
            pad_token_id=pad,
        )
        answers = []
        for row in out.tolist():
            row = row[: row.index(end)] if end in row else row
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers

    @torch.no_grad()
    def rank(
        self, features: torch.Tensor | None, question: str, candidates: list[str], context: str | None = None
    ) -> list[float]:
        """Each candidate answer's log-likelihood (its tokens and the end of turn) after the
        question: closed questions are answered by the most likely candidate. The candidates go
        through in one right-padded batch (padding after the answer never changes its scores)."""
        encoded = [encode(self.tokenizer, question, c, context=context) for c in candidates]
        batch = collate(encoded, self.tokenizer.pad_token_id or 0)
        batch = {k: v.to(self.projector.mean.device) for k, v in batch.items()}
        if features is not None:
            features = features.expand(len(candidates), -1)
        embeddings, mask = self.inputs(features, batch["input_ids"], batch["attention_mask"])
        logits = self.lm(inputs_embeds=embeddings, attention_mask=mask).logits.float()
        offset = embeddings.shape[1] - batch["input_ids"].shape[1]
        # text token t (t >= 1; t = 0 is the prompt's start) is predicted at position offset + t - 1
        width = batch["input_ids"].shape[1]
        predicted = logits[:, offset : offset + width - 1].log_softmax(-1)
        labels = batch["labels"][:, 1:]
        supervised = labels != IGNORE
        token_scores = predicted.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (token_scores * supervised).sum(1).tolist()


SEEN_PHOTOS = "seen_photos.txt.gz"


def save_vqa(
    out: Path,
    model: VQAModel,
    classes,
    tower: dict,
    language_model: str,
    training: dict,
    seen_photos: KeySet,
    lora: dict | None = None,
) -> None:
    from taxoclip.models.bundle import save_weights, write_config

    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "projector.safetensors", model.projector)
    if lora:
        save_weights(out / "adapters.safetensors", model.adapters)
    with gzip.open(out / SEEN_PHOTOS, "wt") as handle:
        handle.writelines(f"{key}\n" for key in seen_photos)  # sorted
    classes.to_csv(out / "classes.csv")
    projector = model.projector
    fields = {
        "image_tower": tower,
        "language_model": language_model,
        "projector": {"width": int(projector.mean.shape[0]), "hidden": projector.hidden, "tokens": projector.tokens},
        "lora": lora,
        "grounding": training.get("grounding"),  # the identifier each prompt shows (None: not grounded)
        "training": training,
    }
    write_config(out, "vqa", fields)


def read_seen_photos(path: Path) -> KeySet:
    """The keys of the photos a vqa model directory's projector and adapters trained on (a sorted
    array, not a set of strings: iNat2021's 2.7M would take 270 MB)."""
    file = Path(path) / SEEN_PHOTOS
    if not file.exists():
        raise TaxoclipError(
            f"{path}: no {SEEN_PHOTOS}, so nothing says which photos trained it; retrain it with this taxoclip"
        )
    with gzip.open(file, "rt") as handle:
        return KeySet.of(line.rstrip("\n") for line in handle if line.strip())


def load_vqa_model(path) -> tuple[VQAModel, dict]:
    """(VQAModel, its config) from a model directory of kind ``vqa``."""
    from taxoclip.models.bundle import read_config
    from taxoclip.tensor_files import short

    path = Path(path)
    config = read_config(path)
    if config.get("kind") != "vqa":
        raise TaxoclipError(f"{path}: a {config.get('kind')} model, not a question-answering one (train vqa)")
    try:
        return open_vqa_directory(path, config), config
    except TaxoclipError:
        raise
    except Exception as error:  # a missing, truncated, foreign or hand-edited file where ours belongs
        raise TaxoclipError(
            f"{path}: the vqa model directory is damaged ({type(error).__name__}: {short(error)}); "
            "copy the whole directory again or retrain"
        ) from None


def open_vqa_directory(path: Path, config: dict) -> VQAModel:
    from taxoclip.models.language import load_language_model
    from taxoclip.tensor_files import load_tensors, load_weights_into

    fix = "copy the whole directory again or retrain"
    lm, tokenizer = load_language_model(config["language_model"])
    shape = config["projector"]
    projector = Projector(int(shape["width"]), int(shape["hidden"]), int(shape["tokens"]))
    weights = path / "projector.safetensors"
    load_weights_into(projector, load_tensors(weights, fix), weights, fix)
    adapters = None
    if config.get("lora"):
        lora = config["lora"]
        adapters = attach_lora(lm, int(lora["rank"]), float(lora["alpha"]), tuple(lora["targets"]))
        weights = path / "adapters.safetensors"
        load_weights_into(adapters, load_tensors(weights, fix), weights, fix)
    lm.eval()
    return VQAModel(lm, tokenizer, projector.eval(), adapters)


MAX_QUESTION_CHARS = 300
MAX_CHOICES = 12
MAX_CHOICE_CHARS = 100  # the longest species name with its common name fits; each costs a forward pass


def parse_choices(text: str | None) -> list[str] | None:
    """Comma-separated candidate answers; None when none were asked for. Text that was given but
    names no answer (",,,") is refused rather than silently answering without the ranking."""
    if text is None or not text.strip():
        return None
    choices = [c.strip() for c in text.split(",") if c.strip()]
    if not choices:
        raise TaxoclipError(f"choices {text!r} name no answer; give them comma-separated, e.g. Rosaceae,Asteraceae")
    return choices


def check_question(question: str, choices: list[str] | None) -> None:
    """Every field of a question within its bound, whoever asks (the command line, the server, the
    library): the cost of an answer grows with the text, so no field is unbounded."""
    if not question.strip():
        raise TaxoclipError("the question is empty; ask something, e.g. 'Which family does this plant belong to?'")
    if len(question) > MAX_QUESTION_CHARS:
        raise TaxoclipError(f"the question has {len(question)} characters; ask in at most {MAX_QUESTION_CHARS}")
    if choices is None:
        return
    if not choices:
        raise TaxoclipError("the list of choices is empty; give at least one, or none at all")
    if len(choices) > MAX_CHOICES:
        raise TaxoclipError(f"{len(choices)} choices; give at most {MAX_CHOICES}")
    for choice in choices:
        if not choice.strip() or len(choice) > MAX_CHOICE_CHARS:
            raise TaxoclipError(
                f"choice {choice[:40]!r}{'...' if len(choice) > 40 else ''} has {len(choice)} characters; "
                f"each choice is 1 to {MAX_CHOICE_CHARS}"
            )


class Asker:
    """A vqa model directory and its image tower, loaded once (the command line, the server):
    greedy answers, and closed questions' candidates ranked by likelihood."""

    def __init__(self, model_dir):
        from taxoclip.models.towers import create_image_tower

        self.model, self.config = load_vqa_model(model_dir)
        record = self.config["image_tower"]
        self.tower = create_image_tower(record["name"], pretrained=record.get("pretrained", True))
        if record.get("id") and self.tower.id != record["id"]:  # its projector reads this tower's features only
            raise TaxoclipError(
                f"{model_dir}: trained on {record['name']} with weights {record['id']}, but {record['name']} here has "
                f"weights {self.tower.id}; install the version it was trained with, or retrain it on this one"
            )
        self.identifier, self.grounder = None, None
        grounding = self.config.get("grounding")
        if grounding:  # loaded once: every question about a photo rests on its line
            self.identifier, self.grounder = open_identifier(Path(model_dir), grounding["model"], record)

    @torch.no_grad()
    def ask(self, image, question: str, choices: list[str] | None = None) -> dict:
        """The answer about a decoded RGB photo (PIL)."""
        check_question(question, choices)
        features = self.tower.embed(self.tower.preprocess.to_uint8(image).unsqueeze(0))
        context, rested_on = None, {}
        if self.identifier is not None:
            probabilities = self.identifier.probabilities_from_features(features)
            context = self.grounder.text(self.grounder.summarise(probabilities), 0)
            rested_on = {"identifier": {"line": context, "top": self.grounder.top(probabilities[0])}}
        result = {"question": question, "answer": self.model.answer(features, question, context=context)}
        result |= rested_on
        if choices:
            scores = self.model.rank(features, question, choices, context)
            result["ranked"] = [
                {"answer": c, "log_likelihood": round(s, 3)}
                for s, c in sorted(zip(scores, choices, strict=True), reverse=True)
            ]
        return result


def open_identifier(model_dir: Path, spec: str, tower_record: dict):
    """A grounded vqa directory's identifier and its `Grounder`; refused when it is gone or now
    reads another tower's embeddings than the ones the directory trained on."""
    from taxoclip.models.grounding import Grounder
    from taxoclip.models.registry import load_classifier

    try:
        identifier = load_classifier(spec, classes=model_dir / "classes.csv")
    except TaxoclipError as error:
        raise TaxoclipError(
            f"{model_dir} answers from the identifier {spec}, which cannot be opened ({error}); put it back, or "
            "train the vqa model again with --grounding"
        ) from None
    if identifier.image_tower_id and tower_record.get("id") and identifier.image_tower_id != tower_record["id"]:
        raise TaxoclipError(
            f"{model_dir} answers from {spec}, which now reads {identifier.image_tower_id} embeddings, not the "
            f"{tower_record['id']} ones it was trained with; retrain the vqa model with --grounding {spec}"
        )
    return identifier, Grounder(identifier.classes)


def ask(model_dir, photo, question: str, choices: list[str] | None = None) -> dict:
    """Answer ``question`` about the photo at ``photo`` with a vqa model directory."""
    from taxoclip.data.images import BadImage, decode_image, read_photo

    check_question(question, choices)  # before the photo and the model are read

    try:
        image = decode_image(read_photo(photo))
    except (BadImage, OSError) as error:
        raise TaxoclipError(f"{photo}: {error}") from None
    return {"photo": str(photo)} | Asker(model_dir).ask(image, question, choices)


def answer_record(model, features: torch.Tensor | None, record: dict, context: str | None = None) -> str:
    """A question record's answer: the most likely candidate when it is closed, else greedy."""
    candidates = candidates_of(record)
    if candidates:
        scores = model.rank(features, record["question"], candidates, context)
        return candidates[int(np.argmax(scores))]
    return model.answer(features, record["question"], context=context)
