"""Species question answering's model: the locked image tower's embedding, projected by a
two-layer MLP (LLaVA's ``mlp2x_gelu``) into K tokens of a causal language model's input space,
prefixed to the templated question (`data.chat`). Stage 1 trains the projector only; the language
model stays as it came.

Model directory (kind ``vqa``):
  config.json              language model name, K, widths, image tower record, training record
                           (which cache and split the projector saw: the leakage guard reads it)
  projector.safetensors    the projector and its input standardisation
  classes.csv              the class table of the training photos
"""

from __future__ import annotations

import torch
from torch import nn

from taxoclip.data.chat import IGNORE, encode, end_of_turn


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


class VQAModel(nn.Module):
    """The projector is this module's only registered part: the (frozen) language model is held
    beside it, so checkpoints, DDP and the model directory carry the projector alone."""

    def __init__(self, language_model, tokenizer, projector: Projector):
        super().__init__()
        self.__dict__["lm"] = language_model  # not a submodule: never checkpointed or synchronised
        self.tokenizer, self.projector = tokenizer, projector

    def inputs(self, features: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(input embeddings, attention mask): the image's K tokens (when given) before the text."""
        text = self.lm.get_input_embeddings()(input_ids)
        if features is None:
            return text, attention_mask
        image = self.projector(features).to(text.dtype)
        ones = torch.ones(len(input_ids), image.shape[1], dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([image, text], 1), torch.cat([ones, attention_mask], 1)

    def forward(self, features, input_ids, attention_mask, labels) -> torch.Tensor:
        """The answer tokens' mean cross-entropy (the language model shifts the labels itself)."""
        embeddings, mask = self.inputs(features, input_ids, attention_mask)
        if features is not None:
            prefix = torch.full((len(labels), self.projector.tokens), IGNORE, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([prefix, labels], 1)
        return self.lm(inputs_embeds=embeddings, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def answer(self, features: torch.Tensor | None, question: str, max_new_tokens: int = 16) -> str:
        """Greedy decoding of the answer to one question (``features``: one image's embedding, or
        None for the question alone)."""
        prompt = torch.tensor([encode(self.tokenizer, question).input_ids])
        embeddings, mask = self.inputs(features, prompt, torch.ones_like(prompt))
        out = self.lm.generate(
            inputs_embeds=embeddings,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_of_turn(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id or end_of_turn(self.tokenizer),
        )
        return self.tokenizer.decode(out[0], skip_special_tokens=True).strip()

    @torch.no_grad()
    def rank(self, features: torch.Tensor | None, question: str, candidates: list[str]) -> list[float]:
        """Each candidate answer's log-likelihood (its tokens and the end of turn) after the
        question: closed questions are answered by the most likely candidate."""
        scores = []
        for candidate in candidates:
            example = encode(self.tokenizer, question, candidate)
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor([example.labels])
            embeddings, mask = self.inputs(features, ids, torch.ones_like(ids))
            logits = self.lm(inputs_embeds=embeddings, attention_mask=mask).logits[0, :-1]
            offset = embeddings.shape[1] - ids.shape[1]
            targets = labels[0]
            positions = torch.nonzero(targets != IGNORE).flatten()
            log_probs = logits.log_softmax(-1)[offset + positions - 1, targets[positions]]
            scores.append(float(log_probs.sum()))
        return scores


def save_vqa(out, model: VQAModel, classes, tower: dict, language_model: str, training: dict) -> None:
    from taxoclip.models.bundle import save_weights, write_config

    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "projector.safetensors", model.projector)
    classes.to_csv(out / "classes.csv")
    projector = model.projector
    fields = {
        "image_tower": tower,
        "language_model": language_model,
        "projector": {"width": int(projector.mean.shape[0]), "hidden": projector.hidden, "tokens": projector.tokens},
        "training": training,
    }
    write_config(out, "vqa", fields)


def load_vqa_model(path):
    """(VQAModel, its config) from a model directory of kind ``vqa``."""
    from pathlib import Path

    from safetensors.torch import load_file

    from taxoclip.errors import TaxoclipError
    from taxoclip.models.bundle import read_config
    from taxoclip.models.language import load_language_model

    path = Path(path)
    config = read_config(path)
    if config.get("kind") != "vqa":
        raise TaxoclipError(f"{path}: a {config.get('kind')} model, not a question-answering one (train vqa)")
    lm, tokenizer = load_language_model(config["language_model"])
    shape = config["projector"]
    projector = Projector(shape["width"], shape["hidden"], shape["tokens"])
    projector.load_state_dict(load_file(str(path / "projector.safetensors")))
    return VQAModel(lm, tokenizer, projector.eval()), config


@torch.no_grad()
def ask(model_dir, photo, question: str, choices: list[str] | None = None) -> dict:
    """Answer ``question`` about the photo at ``photo`` with a vqa model directory: greedy decoding,
    and with ``choices`` the candidates ranked by likelihood too."""
    from taxoclip.data.images import BadImage, decode_image, read_photo
    from taxoclip.errors import TaxoclipError
    from taxoclip.models.towers import create_image_tower

    model, config = load_vqa_model(model_dir)
    record = config["image_tower"]
    tower = create_image_tower(record["name"], pretrained=record.get("pretrained", True))
    try:
        image = decode_image(read_photo(photo))
    except (BadImage, OSError) as error:
        raise TaxoclipError(f"{photo}: {error}") from None
    features = tower.embed(tower.preprocess.to_uint8(image).unsqueeze(0))
    result = {"photo": str(photo), "question": question, "answer": model.answer(features, question)}
    if choices:
        scores = model.rank(features, question, choices)
        result["ranked"] = [
            {"answer": c, "log_likelihood": round(s, 3)}
            for s, c in sorted(zip(scores, choices, strict=True), reverse=True)
        ]
    return result
