"""Species question answering's training settings (light: the command line reads them)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass

from taxoclip.errors import TaxoclipError
from taxoclip.flag_types import NON_NEGATIVE, NON_NEGATIVE_NUMBER, POSITIVE, POSITIVE_NUMBER
from taxoclip.train.settings import LoopSettings, option, redefault


@dataclass(kw_only=True)
class VQAConfig(LoopSettings):
    features: str = option(MISSING, "--features", help="feature cache the questions were made from")
    questions: str = option(MISSING, "--questions", help="JSON lines from 'taxoclip questions'")
    language_model: str = option("smollm2-135m", "--language-model", help="smollm2-135m (offline) or hf:NAME_OR_PATH")
    image_tokens: int = option(1, "--image-tokens", help="K: image tokens before the question", type=POSITIVE)
    batch_size: int = redefault(
        LoopSettings, "batch_size", 8, help="photos a step: each one conversation of its questions (see --turns)"
    )
    epochs: int = redefault(LoopSettings, "epochs", 2)
    lr: float = redefault(
        LoopSettings,
        "lr",
        1e-3,
        help="learning rate of the projector (0: keep --init-from's projector as it is, e.g. after --stage names)",
    )
    weight_decay: float = redefault(LoopSettings, "weight_decay", 0.0)
    eval_questions: int = option(
        100, "--eval-questions", help="valid questions answered at each evaluation", type=NON_NEGATIVE
    )
    # stage 2: LoRA adapters on the language model (0: stage 1, the projector alone)
    lora_rank: int = option(
        0, "--lora-rank", help="stage 2: LoRA rank on the language model (0: stage 1 only)", type=NON_NEGATIVE
    )
    lora_alpha: float = option(
        16.0, "--lora-alpha", help="LoRA scale numerator (alpha / rank scales the update)", type=POSITIVE_NUMBER
    )
    lora_lr: float = option(2e-4, "--lora-lr", help="learning rate of the LoRA adapters", type=NON_NEGATIVE_NUMBER)
    lora_targets: str = option(
        "q_proj,k_proj,v_proj,o_proj", "--lora-targets", help="the language model's linear layers that get adapters"
    )
    stage: str = option(
        "questions",
        "--stage",
        help="questions; captions: LLaVA's stage 1, the projector aligned on each photo's class captions; names: "
        "the projector's tokens regressed onto the language model's embeddings of the class's names (seconds a pass)",
        choices=("questions", "captions", "names"),
    )
    turns: int = option(
        0,
        "--turns",
        help="questions of one photo asked in one conversation (0: all of them; 1: one question a sequence)",
        type=NON_NEGATIVE,
    )
    grounding: str | None = option(
        None,
        "--grounding",
        help="an identifier (lit, catlip or finetune directory, or open_clip:NAME) whose answer each prompt shows",
    )
    grounding_folds: int = option(
        5, "--grounding-folds", help="cross-fitting folds for the training photos' identifier lines", type=POSITIVE
    )
    init_from: str | None = option(
        None, "--init-from", help="a stage-1 vqa model directory whose projector stage 2 starts from"
    )

    def check(self) -> None:
        if self.image_tokens < 1 or self.batch_size < 1 or self.epochs < 1:
            raise TaxoclipError("--image-tokens, --batch-size and --epochs must be at least 1")
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            raise TaxoclipError("--lora-rank must be 0 (stage 1) or more, --lora-alpha positive")
        if self.grounding and self.grounding_folds < 2:
            raise TaxoclipError("--grounding-folds must be at least 2: each fold's line comes from the others' probe")
        if self.stage == "names" and (self.lora_rank or self.grounding):
            raise TaxoclipError(
                "--stage names trains the projector alone, without the language model's pass: drop --lora-rank "
                "and --grounding, and give its directory to stage 2's --init-from"
            )
        if self.lr == 0 and not self.lora_rank:
            raise TaxoclipError("--lr 0 keeps the projector fixed: with no --lora-rank nothing would train")
        if not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise TaxoclipError("--lora-targets names no layer; e.g. q_proj,k_proj,v_proj,o_proj")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


def summary(final: dict, settings: VQAConfig) -> list[str]:
    """What `taxoclip train vqa` prints when done."""
    lines = []
    if "exact_match" in final:
        lines.append(f"valid questions answered exactly: {100 * final['exact_match']:.1f}%")
    if "name_tokens_right" in final:
        lines.append(
            f"held-out photos' class lines read from their image tokens: {100 * final['name_tokens_right']:.1f}% "
            f"of tokens, {100 * final['name_lines_right']:.1f}% of whole lines; the nearest line is their class's for "
            f"{100 * final['name_class_right']:.1f}%"
        )
    return [*lines, f"model in {settings.output} (kind vqa: taxoclip ask PHOTO QUESTION --model {settings.output})"]
