"""The text side of a photo question for a causal language model: the chat template with an
explicit system message, and labels that supervise only the answer and its end-of-turn token
(LLaVA's recipe; the question, the system message and the image positions never enter the loss).

The image's K tokens are a prefix before the templated text: the model sees
``[image tokens] <system> <user: question> <assistant:`` and learns ``answer<end>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taxoclip.errors import TaxoclipError

SYSTEM = "You are a field naturalist. Look at the photo and answer the question in a few words."
IGNORE = -100  # torch's cross-entropy skips this label


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE except the answer's tokens and the end-of-turn token


def end_of_turn(tokenizer) -> int:
    """The token that closes the assistant's turn (``<|im_end|>`` for SmolLM2, else EOS)."""
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            return token_id
    if tokenizer.eos_token_id is None:
        raise TaxoclipError("the language model's tokenizer has no end-of-turn or end-of-sequence token")
    return tokenizer.eos_token_id


def prompt_text(tokenizer, question: str, system: str = SYSTEM) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    if not getattr(tokenizer, "chat_template", None):
        raise TaxoclipError("the language model's tokenizer has no chat template; use an instruction-tuned model")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def user_text(question: str, context: str | None = None) -> str:
    """The user's message: the question, after the identifier's answer when the model is grounded."""
    return f"{context}\n{question}" if context else question


def encode(
    tokenizer, question: str, answer: str | None = None, system: str = SYSTEM, context: str | None = None
) -> Encoded:
    """Token ids of the prompt (and, for training, the answer and the end of turn) with labels.
    The prompt and the answer are tokenised apart and joined, so the prompt is exactly what
    answering will see. ``context`` (the identifier's answer) opens the user's message."""
    if answer is None:
        prompt = tokenizer(prompt_text(tokenizer, user_text(question, context), system), add_special_tokens=False)
        return Encoded(prompt["input_ids"], [IGNORE] * len(prompt["input_ids"]))
    return encode_conversation(tokenizer, [(question, answer)], system, context)


def encode_conversation(
    tokenizer, turns: list[tuple[str, str]], system: str = SYSTEM, context: str | None = None
) -> Encoded:
    """One photo's questions as one conversation (the image once, then user/assistant turns), as
    LLaVA and nanoVLM train: every answer and its end-of-turn token is supervised, nothing else
    (the system message, the context and each question are IGNORE). One forward pass then
    supervises every turn's answer instead of one.

    The template is rendered turn by turn and only the new text is tokenised, so the first turn is
    token for token the single-question prompt answering sees."""
    if not turns:
        raise TaxoclipError("a conversation needs at least one question")
    end = end_of_turn(tokenizer)
    end_text = tokenizer.convert_ids_to_tokens(end)
    messages = [{"role": "system", "content": system}]
    ids: list[int] = []
    labels: list[int] = []
    written = ""  # the template text the ids so far stand for
    for i, (question, answer) in enumerate(turns):
        messages.append({"role": "user", "content": user_text(question, context if i == 0 else None)})
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if not rendered.startswith(written):
            raise TaxoclipError("the language model's chat template re-writes earlier turns; use a ChatML model")
        new = tokenizer(rendered[len(written) :], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
        ids += new + answer_ids
        labels += [IGNORE] * len(new) + answer_ids
        messages.append({"role": "assistant", "content": answer})
        written = rendered + answer + end_text
    return Encoded(ids, labels)


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels (padding ignored) and attention mask; refuses a batch with no
    supervised token (it would train on nothing and divide by zero)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        mask[i, :n] = 1
    if not (labels != IGNORE).any():
        raise TaxoclipError("a training batch has no answer token to learn from (empty answers?)")
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
