"""The optimizer (AdamW, open_clip's weight-decay rule) and the learning-rate schedule over a step or time budget."""

from __future__ import annotations

import collections
import math
from typing import Any

import torch

from histoclip.training.settings import TrainSettings


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases, norms and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class Progress:
    """Fraction of the budget used before each step, for the learning-rate schedule.

    With ``steps``: the step count. With ``max_seconds``: the steps done over the steps expected in all, the
    rest estimated from the recent step rate (last 20 steps), and 1 at the deadline. At a steady speed that
    is the elapsed fraction of the time; when the speed changes (another job takes or frees the cores) the
    rest of the schedule is laid over the steps that are actually coming: after a slow start the warm-up and
    peak are not spent on a handful of steps (the schedule may step back, a warm restart), and when steps
    slow down the decay speeds up so as to reach 0 at the deadline. Measured on the demo, cores shared for
    the first minute: a schedule by elapsed time gave 0.65 slide accuracy after 154 steps.
    """

    def __init__(self, steps: int | None, deadline: float | None, started: float) -> None:
        self.steps, self.deadline = steps, deadline
        self.times = collections.deque([started], maxlen=21)

    def before_step(self, step: int, now: float) -> float:
        progress = (step + 1) / self.steps if self.steps is not None else 0.0
        if self.deadline is not None and step > 0:
            rate = (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)
            remaining_steps = max(self.deadline - now, 0.0) * rate
            progress = max(progress, (step + 1) / (step + 1 + remaining_steps))
        return min(1.0, progress)

    def after_step(self, now: float) -> None:
        self.times.append(now)


def adamw(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel: on 2 CPU cores the default per-tensor loop spends 0.1-0.3 s
    per step on the demo model's 7.6 M parameters (most in the token embedding), the fused one 0.01 s."""
    groups = _param_groups(model, settings.weight_decay)
    options = {"lr": settings.lr, "betas": (0.9, 0.98), "eps": 1e-6}
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(_param_groups(model, settings.weight_decay), foreach=True, **options)


def lr_at(progress: float, settings: TrainSettings) -> float:
    """Linear warm-up over ``warmup_fraction`` of the budget, then cosine to 0 (``progress`` in [0, 1])."""
    warm = settings.warmup_fraction
    if warm > 0 and progress < warm:
        return settings.lr * progress / warm
    t = min(1.0, (progress - warm) / (1 - warm)) if warm < 1 else 1.0
    return settings.lr * 0.5 * (1 + math.cos(math.pi * t))
