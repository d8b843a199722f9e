"""Species question answering's training settings (light: the command line reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from taxoclip.errors import TaxoclipError


@dataclass
class VQAConfig:
    features: str  # the feature cache whose keys the questions name
    questions: str  # JSON lines from 'taxoclip questions'
    output: str
    language_model: str = "smollm2-135m"
    image_tokens: int = 1  # K: image tokens before the question
    batch_size: int = 32
    epochs: int = 2
    lr: float = 1e-3  # the projector's learning rate (stage 1: the language model is frozen)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    eval_questions: int = 100  # valid questions answered (greedy) at each evaluation
    # stage 2: LoRA adapters on the language model (0: stage 1, the projector alone)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_lr: float = 2e-4
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    init_from: str | None = None  # a stage-1 model directory whose projector this run starts from
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    max_steps_per_epoch: int | None = None
    progress: bool = True

    def check(self) -> None:
        if self.image_tokens < 1 or self.batch_size < 1 or self.epochs < 1:
            raise TaxoclipError("--image-tokens, --batch-size and --epochs must be at least 1")
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            raise TaxoclipError("--lora-rank must be 0 (stage 1) or more, --lora-alpha positive")
        if not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise TaxoclipError("--lora-targets names no layer; e.g. q_proj,k_proj,v_proj,o_proj")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
