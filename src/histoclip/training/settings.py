"""How to train (:class:`TrainSettings`, checked when made) and what a run did (:class:`TrainReport`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoclip.errors import InputError

TRAIN_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    """How to train. Defaults: the demo's tiny CLIP from scratch on two CPU cores (see RECIPES)."""

    steps: int | None = None  # stop after this many optimizer steps, or ...
    max_seconds: float | None = 170  # ... after this wall time (whichever first); at least one must be set
    batch_size: int = 128
    lr: float = 1e-3  # AdamW; fine-tuning a pretrained model wants ~1e-5
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1  # linear warm-up over this fraction of the budget, then cosine to 0
    image_size: int | None = 112  # train (and save) at this input size, tiles downsampled; None: the model's
    augment: bool = True  # flips/90° rotations, mild colour jitter
    seed: int = 0
    precision: str = "auto"  # AMP bf16 on CUDA, fp32 on CPU
    num_workers: int | str = "auto"
    bag_size: int = 16  # slide-level pairs: tiles sampled per slide per step, embeddings mean-pooled
    cache_mb: float = 2048  # keep decoded tiles in memory when they fit (tile and image pairs)
    log_every: int = 25  # steps between progress lines

    def __post_init__(self) -> None:
        problems = []
        if self.steps is None and self.max_seconds is None:
            problems.append("neither steps nor max_seconds is set (training would never stop)")
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            problems.append(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0:
            problems.append(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.image_size is not None and self.image_size < 16:
            problems.append(f"image_size must be >= 16 px, got {self.image_size}")
        if self.precision not in TRAIN_PRECISIONS:
            problems.append(f"precision must be one of {TRAIN_PRECISIONS}, got {self.precision!r}")
        if self.num_workers != "auto" and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            problems.append(f"num_workers must be 'auto' or an integer >= 0, got {self.num_workers!r}")
        if self.bag_size < 1:
            problems.append(f"bag_size must be >= 1, got {self.bag_size}")
        if problems:
            raise InputError(
                "; ".join(problems),
                where="training settings",
                fix="set steps and/or max_seconds, and values in the ranges given",
            )


@dataclass
class TrainReport:
    """What a run did. ``last_loss`` is the mean of the last 10 steps' losses."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    n_pairs: int
    out_dir: Path
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    stopped_by: str = ""
    held_in: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
