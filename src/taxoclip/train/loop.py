"""The one training loop every trainer plugs into.

A trainer (a subclass of `Trainer`) supplies only what is its own:

  module            an nn.Module whose ``forward(**batch.inputs)`` returns the loss; what in it
                    requires grad trains, and all of it is checkpointed
  param_groups()    optimiser groups, each with its learning rate and weight decay
  steps_per_epoch() optimiser steps in one epoch
  batches(epoch)    this rank's share of every global batch, as `Batch` objects on the device
  evaluate(epoch)   metrics on held-out data (empty when there is none)
  epoch_extras()    other numbers worth logging each epoch (e.g. the temperature)

The loop does the rest, the same way for every model: AdamW, linear warm-up then cosine decay,
gradient accumulation, gradient clipping, an optional moving average of the weights, early
stopping on a selection metric (keeping the best weights), bfloat16 autocast on GPUs,
DistributedDataParallel under torchrun (gradients averaged across ranks), evaluation every
``eval_every`` epochs and always after the last, a checkpoint per epoch with exact resume,
metrics.jsonl/metrics.csv and plots, and output from rank 0 only. Each epoch's row records what
every rank trained on (``samples_by_rank``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from taxoclip.allocator import after_step
from taxoclip.errors import TaxoclipError
from taxoclip.runtime import Runtime, seed_everything, setup
from taxoclip.train.checkpoint import load_checkpoint, load_extra, read_state, save_checkpoint
from taxoclip.train.ema import WeightAverage
from taxoclip.train.log import plot_history, write_log

CHECKPOINT = "checkpoint"


@dataclass
class Batch:
    inputs: dict[str, Any]  # keyword arguments of the trainer module's forward
    size: int  # samples this rank holds


class Trainer:
    """What a trainer provides; see the module docstring."""

    module: torch.nn.Module

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def evaluate(self, epoch: int) -> dict:
        return {}

    def epoch_extras(self) -> dict:
        return {}


@dataclass
class LoopConfig:
    """What the loop reads beyond a trainer's settings (a `taxoclip.train.settings.LoopSettings`:
    output, epochs, warm-up, clipping, evaluation cadence, seed, progress, declared there once): the
    run's signature, the progress bar's word, and the loop features only some trainers offer."""

    settings: Any
    signature: dict = field(default_factory=dict)  # the settings a resumed run must share
    description: str = "epoch"
    accumulate: int = 1  # batches whose gradients add up to one optimiser step
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: none)
    patience: int = 0  # stop after this many evaluations without a better `monitor` (0: never)
    monitor: str = "select_top1"  # the metric early stopping and the kept best weights follow


def run_signature(settings: Any, **data: str) -> dict:
    """The settings a resumed run must share with the one that made the checkpoint (all but where
    it writes, which device, and progress), plus what it trained on, by content."""
    ignored = {"progress", "device", "output"}
    return {f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in ignored} | data


def run_training(settings: Any, make_trainer, data_of, **loop_options) -> tuple[Any, list[dict], Runtime]:
    """The start every trainer shares: check the settings, join the process group (or not), seed,
    build the trainer, and fit it on the shared loop under a signature naming its settings and
    ``data_of(trainer)`` (what it trains on, by content: another data folder is another run, never
    resumed). Returns (trainer, per-epoch history, runtime)."""
    settings.check()
    runtime = setup(settings.device)
    seed_everything(settings.seed)
    trainer = make_trainer(settings, runtime)
    signature = run_signature(settings, data=data_of(trainer))
    history = fit(trainer, LoopConfig(settings, signature=signature, **loop_options), runtime)
    return trainer, history, runtime


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear from 0 over ``warmup_steps``, then cosine down to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fit(trainer: Trainer, config: LoopConfig, runtime: Runtime) -> list[dict]:
    """Train ``trainer`` for ``config.settings.epochs`` (resuming a checkpoint in the output folder);
    returns the per-epoch history. With ``patience``, stops once ``monitor`` has not improved for
    that many evaluations and leaves the best evaluation's weights in the module; with ``ema``,
    evaluation and the final weights use the weight average."""
    out = Path(config.settings.output)
    groups = [dict(g, base_lr=g["lr"]) for g in trainer.param_groups() if g["params"]]
    optimizer = torch.optim.AdamW(groups)
    average = WeightAverage(trainer.module, config.ema) if config.ema else None
    history, start_epoch = resume(out / CHECKPOINT, trainer.module, optimizer, config, runtime, average)
    best = load_extra(out / CHECKPOINT, BEST) if config.patience else None
    model = runtime.wrap(trainer.module)
    for epoch in range(start_epoch, config.settings.epochs):
        if stopped_early(history):
            break
        row = train_epoch(model, trainer, optimizer, epoch, config, runtime, average)
        if (epoch + 1) % max(1, config.settings.eval_every) == 0 or epoch + 1 == config.settings.epochs:
            with average.applied() if average else nullcontext():
                row.update(trainer.evaluate(epoch))
                if config.patience and improved(history, row, config.monitor):
                    best = {k: v.detach().cpu().clone() for k, v in trainer.module.state_dict().items()}
        history.append(row)
        if config.patience and evaluations_since_best(history, config.monitor) >= config.patience:
            row["stopped_early"] = True  # recorded, so a resumed run stops here too
        if runtime.is_main:
            if config.settings.progress:
                print(format_row(row))
            write_log(out, history)
            state = {"epoch": epoch + 1, "history": history, "config": config.signature}
            if average:
                state["ema_updates"] = average.updates
            extra = ({"ema": average.state()} if average else {}) | ({BEST: best} if best is not None else {})
            save_checkpoint(out / CHECKPOINT, trainer.module, optimizer, state, extra)
        runtime.barrier()
    if best is not None:  # the weights of the best evaluation (averaged ones when averaging)
        trainer.module.load_state_dict(best)
    elif average:
        average.copy_to_module()
    if runtime.is_main and history:
        plot_history(out, history)
    return history


BEST = "best"


def improved(history: list[dict], row: dict, monitor: str) -> bool:
    """Whether ``row`` beats every earlier evaluation on ``monitor`` (higher is better)."""
    if monitor not in row:
        raise TaxoclipError(
            f"early stopping follows {monitor!r}, which this run's evaluation does not report "
            f"(it reports {', '.join(k for k in row if k.endswith('top1')) or 'nothing'}); "
            "keep a selection split (--select) or leave out --patience"
        )
    return all(row[monitor] > r[monitor] for r in history if monitor in r)


def evaluations_since_best(history: list[dict], monitor: str) -> int:
    scores = [r[monitor] for r in history if monitor in r]
    return len(scores) - 1 - int(np.argmax(scores)) if scores else 0


def stopped_early(history: list[dict]) -> bool:
    return bool(history and history[-1].get("stopped_early"))


def resume(
    folder: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: LoopConfig,
    runtime: Runtime,
    average: WeightAverage | None = None,
) -> tuple[list[dict], int]:
    """(history, first epoch to run): a run killed and restarted ends exactly as one that never stopped."""
    state = read_state(folder)
    if state is None:
        return [], 0
    if state.get("config") != config.signature:  # checked before any weight is loaded
        raise TaxoclipError(f"{folder.parent} holds a run with other settings; use another --output or delete it")
    load_checkpoint(folder, module, optimizer)
    if average is not None:
        average.load(load_extra(folder, "ema"), state["ema_updates"])
    if config.settings.progress:
        runtime.print(f"resuming after epoch {state['epoch']} from {folder}")
    return state["history"], state["epoch"]


def train_epoch(
    model: torch.nn.Module,
    trainer: Trainer,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: LoopConfig,
    runtime: Runtime,
    average: WeightAverage | None = None,
) -> dict:
    started = time.perf_counter()
    trainer.module.train()
    torch.manual_seed(config.settings.seed * 100_003 + epoch)  # dropout masks: reproducible across resumes
    np.random.seed((config.settings.seed * 100_003 + epoch) % 2**32)  # libraries that draw from numpy (timm's mixup)
    accumulate = max(1, config.accumulate)
    steps = max(1, trainer.steps_per_epoch() // accumulate)  # optimiser steps; the trainer counts batches
    total_steps = steps * config.settings.epochs
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    device = runtime.device
    losses, samples = [], 0
    bar = tqdm(
        total=steps,
        desc=f"{config.description} {epoch + 1}/{config.settings.epochs}",
        leave=False,
        disable=not (config.settings.progress and runtime.is_main),
    )
    batches = trainer.batches(epoch)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * warmup_cosine(
                epoch * steps + step, config.settings.warmup_steps, total_steps
            )
        optimizer.zero_grad(set_to_none=True)
        used = 0
        for micro, batch in zip(range(accumulate), batches, strict=False):
            # Gradients of all but the last batch stay local: DDP averages once per optimiser step.
            sync = micro == accumulate - 1 or not hasattr(model, "no_sync")
            with nullcontext() if sync else model.no_sync():
                # bfloat16 on GPUs (no loss scaling needed); full precision on CPU, where it is not faster.
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = model(**batch.inputs)
                if not torch.isfinite(loss):
                    raise TaxoclipError(
                        f"training diverged: the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                        f"lower the learning rate (now {optimizer.param_groups[0]['base_lr']:g}) and start again"
                    )
                (loss / accumulate).backward()
            losses.append(loss.item())
            samples += batch.size
            used += 1
        if used == 0:  # the batches ran out before the planned steps (a stream shorter than expected)
            break
        if config.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, config.settings.grad_clip)
        optimizer.step()
        if average is not None:
            average.update()
        after_step()  # TAXOCLIP_MALLOC=trim gives the step's freed memory back here
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    # An epoch may stop before its batches run out; closing them now stops any decoding workers
    # (a loader left half-read while the next one forks its workers can deadlock them).
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    samples_by_rank = runtime.gather_objects(samples)
    return {
        "epoch": epoch + 1,
        "train_loss": runtime.mean(float(np.mean(losses)) if losses else float("nan")),
        "seconds": round(time.perf_counter() - started, 3),
        "lr": optimizer.param_groups[0]["lr"],
        **trainer.epoch_extras(),
        "samples": sum(samples_by_rank),
        "samples_by_rank": samples_by_rank,
    }


def format_row(row: dict) -> str:
    """One readable line per epoch: loss, then accuracies as percentages."""
    text = f"epoch {row['epoch']}: loss {row['train_loss']:.3f}"
    shown = [(k, v) for k, v in row.items() if ("top1" in k or "top5" in k) and isinstance(v, float)]
    if shown:
        text += ", " + ", ".join(f"{k.replace('_', ' ')} {100 * v:.1f}%" for k, v in shown)
    return text + f" ({row['seconds']:.1f} s)"
