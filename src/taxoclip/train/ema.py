"""An exponential moving average of a model's weights (``--ema DECAY``), evaluated and saved in
place of the raw weights. timm's ModelEmaV3 keeps a second copy of the whole module; ours averages
the trainer module's floating tensors by name and swaps them in for evaluation, so a trainer's
own evaluation code needs no second model, and the average checkpoints with the run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay, self.updates = module, decay, 0
        self.average = {
            name: tensor.detach().clone().float()
            for name, tensor in module.state_dict().items()
            if tensor.is_floating_point()
        }

    @torch.no_grad()
    def update(self) -> None:
        """After each optimiser step. The decay warms up (1 + n) / (10 + n), as in TensorFlow's
        ExponentialMovingAverage, so early averages are not dominated by the initial weights."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = self.module.state_dict()
        for name, average in self.average.items():
            average.lerp_(current[name].detach().float(), 1 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the averaged weights inside the block, its own weights after."""
        own = {name: tensor.detach().clone() for name, tensor in self.module.state_dict().items()}
        self.copy_to_module()
        try:
            yield
        finally:
            self.module.load_state_dict(own, strict=False)

    @torch.no_grad()
    def copy_to_module(self) -> None:
        state = self.module.state_dict()
        for name, average in self.average.items():
            state[name].copy_(average.to(state[name].dtype))

    def state(self) -> dict[str, torch.Tensor]:
        return {name: tensor.contiguous() for name, tensor in self.average.items()}

    def load(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        for name, average in self.average.items():
            average.copy_(tensors[name])
        self.updates = updates
