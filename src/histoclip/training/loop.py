"""The training run: load the base model, feed it batches of pairs, step AdamW on the contrastive loss, save.

Loss: open_clip's ``ClipLoss`` (symmetric InfoNCE with the model's learnt temperature, clamped to a logit
scale of at most 100; ``SigLipLoss`` for models with a logit bias), AdamW, linear warm-up then cosine to 0
over the budget (:mod:`histoclip.training.schedule`). Augmentation and normalisation run on the batch, on
the device, with random numbers from a seeded CPU generator, so batches and augmentations are the same
whatever the number of workers (a step-bounded run repeated with the same threads gives identical weights).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from histoclip import store
from histoclip.embedding.models import LoadedModel, ModelSpec, load_model, resolve_device
from histoclip.errors import InputError
from histoclip.training.augment import augment
from histoclip.training.batches import EpochBatches, TrainImages
from histoclip.training.checkpoint import LossRow, base_model_cfg, save_model
from histoclip.training.held_in import held_in_check
from histoclip.training.pairs import pair_kind, read_pairs
from histoclip.training.schedule import Progress, adamw, lr_at
from histoclip.training.settings import TrainReport, TrainSettings

_log = logging.getLogger(__name__)

#: CLIP's cap on the learnt temperature (logit scale), as in open_clip's training loop.
MAX_LOGIT_SCALE = 100.0


def _train_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32): bf16 on CUDA when ``auto``."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


@dataclass(frozen=True)
class _Captions:
    """Every distinct caption tokenised once (on the device), and each pair's index into them."""

    tokens: torch.Tensor
    index: torch.Tensor
    n_unique: int

    @staticmethod
    def tokenise(loaded: LoadedModel, pairs: pd.DataFrame, device: torch.device, logger: logging.Logger) -> _Captions:
        unique_captions, caption_index = np.unique(pairs["caption"].to_numpy(dtype=str), return_inverse=True)
        tokens = loaded.tokenizer(list(unique_captions))
        truncated = int((tokens[:, -1] != 0).sum())
        if truncated:
            logger.warning("%d distinct caption(s) fill the context length and may be truncated", truncated)
        index = torch.from_numpy(caption_index.astype(np.int64)).to(device)
        return _Captions(tokens.to(device), index, len(unique_captions))

    def of(self, pairs: torch.Tensor) -> torch.Tensor:
        """The tokens of the given pairs' captions."""
        return self.tokens.index_select(0, self.index.index_select(0, pairs.to(self.tokens.device)))


class _Stepper:
    """One optimizer step on a batch: augmentation, encoding under autocast, contrastive loss, AdamW, clamp."""

    def __init__(
        self, loaded: LoadedModel, captions: _Captions, settings: TrainSettings, device: torch.device, bag: bool
    ) -> None:
        import open_clip.loss

        self.loaded, self.captions, self.settings, self.device, self.bag = loaded, captions, settings, device, bag
        self.model = loaded.model
        self.logit_bias = getattr(self.model, "logit_bias", None)
        self.loss_fn = open_clip.loss.SigLipLoss() if self.logit_bias is not None else open_clip.loss.ClipLoss()
        self.optimizer = adamw(self.model, settings)
        self.augment_generator = torch.Generator().manual_seed(settings.seed + 1)
        self.dtype = _train_dtype(settings.precision, device)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, index: torch.Tensor, pixels: torch.Tensor) -> tuple[float, int]:
        """The step's loss and the number of images (tiles, for bags) it saw."""
        dev, model = self.device, self.model
        pixels = pixels.to(dev, non_blocking=True)
        flat = pixels.reshape(-1, *pixels.shape[-3:]) if self.bag else pixels
        if self.settings.augment:
            flat = augment(flat, self.augment_generator)
        x = self.loaded.preprocess_on_device(flat)
        text = self.captions.of(index)
        with torch.autocast(device_type=dev.type, dtype=self.dtype, enabled=self.dtype is not None):
            image_features = model.encode_image(x)
            text_features = model.encode_text(text)
        image_features = F.normalize(image_features.float(), dim=-1)
        if self.bag:  # slide embedding = mean of its tiles' embeddings
            image_features = F.normalize(image_features.view(index.numel(), -1, image_features.shape[-1]).mean(1))
        text_features = F.normalize(text_features.float(), dim=-1)
        extra = (self.logit_bias,) if self.logit_bias is not None else ()
        loss = self.loss_fn(image_features, text_features, model.logit_scale.exp(), *extra)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        return float(loss.item()), int(flat.shape[0])


@dataclass
class _Run:
    """What the optimisation loop did."""

    rows: list[LossRow]
    steps: int
    stopped_by: str
    train_started: float
    train_seconds: float
    images_per_second: float

    @property
    def first_loss(self) -> float:
        return self.rows[0][1]

    @property
    def last_loss(self) -> float:
        """The mean of the last 10 steps' losses."""
        return float(np.mean([r[1] for r in self.rows[-10:]]))


def _optimise(
    stepper: _Stepper,
    images: TrainImages,
    keys: EpochBatches,
    settings: TrainSettings,
    deadline: float | None,
    logger: logging.Logger,
) -> _Run:
    """Step until ``settings.steps`` or the deadline (at least one step), with the CPU threads the readers
    leave free; the learning rate follows the schedule over the budget."""
    model = stepper.model
    rows: list[LossRow] = []
    previous_threads = torch.get_num_threads()
    if stepper.device.type == "cpu":
        torch.set_num_threads(images.torch_threads)
    train_started = time.perf_counter()
    schedule = Progress(settings.steps, deadline, train_started)
    stopped_by, step, images_seen = "steps", 0, 0
    model.train()
    iterator = images.batches(keys)
    try:
        while True:
            now = time.perf_counter()
            if settings.steps is not None and step >= settings.steps:
                break
            if deadline is not None and step > 0 and now >= deadline:
                stopped_by = "max_seconds"
                break
            lr = lr_at(schedule.before_step(step, now), settings)
            stepper.set_lr(lr)
            value, n_images = stepper(*next(iterator))
            if not math.isfinite(value):
                raise RuntimeError(
                    f"the loss became {value} at step {step + 1} (lr {lr:.3g}); lower lr or use precision fp32"
                )
            step += 1
            images_seen += n_images
            done = time.perf_counter()
            schedule.after_step(done)
            rows.append((step, value, lr, done - train_started))
            if settings.log_every and (step == 1 or step % settings.log_every == 0):
                elapsed = time.perf_counter() - train_started
                logger.info("step %d loss %.4f lr %.2e %.0f img/s", step, value, lr, images_seen / max(elapsed, 1e-9))
    finally:
        del iterator
        torch.set_num_threads(previous_threads)
    train_seconds = time.perf_counter() - train_started
    model.eval()
    images_per_second = images_seen / max(train_seconds, 1e-9)
    return _Run(rows, step, stopped_by, train_started, train_seconds, images_per_second)


def _load_base(
    base: ModelSpec, settings: TrainSettings, dev: torch.device, pairs: pd.DataFrame, logger: logging.Logger
) -> tuple[LoadedModel, dict[str, Any]]:
    """The model to train, loaded through the registry (weights, offline rules, provenance) at the training
    size with the run's seed, and the open_clip config the saved folder will carry."""
    torch.manual_seed(settings.seed)
    spec = dataclasses.replace(base, image_size=settings.image_size or base.image_size, seed=settings.seed)
    loaded = load_model(spec, dev)
    model_cfg = base_model_cfg(base)
    model_cfg["vision_cfg"]["image_size"] = loaded.image_size
    logger.info(
        "training %s (%s, %.1f M parameters) at %d px on %s, %d %s pairs",
        base.name,
        loaded.weights,
        sum(p.numel() for p in loaded.model.parameters()) / 1e6,
        loaded.image_size,
        dev.type,
        len(pairs),
        pair_kind(pairs),
    )
    return loaded, model_cfg


def _description(
    out: Path,
    settings: TrainSettings,
    base: ModelSpec,
    loaded: LoadedModel,
    pairs: pd.DataFrame,
    captions: _Captions,
    images: TrainImages,
    stepper: _Stepper,
    batch_size: int,
    run: _Run,
    started: float,
    held_in: dict[str, Any] | None,
) -> dict[str, Any]:
    """The content of ``train.json``: settings, base model, data, how training went, package versions."""
    dev, dtype = stepper.device, stepper.dtype
    labels = pairs["label"][pairs["label"] != ""].value_counts().to_dict()
    table = pairs.attrs.get("table")
    return {
        "what": "open_clip model trained by histoclip.train.train_clip",
        "load_with": {"model": f"local-dir:{out.resolve()}"},
        "settings": dataclasses.asdict(settings),
        "base": {
            "name": base.name,
            "model": base.model,
            "pretrained": base.pretrained,
            "architecture": loaded.architecture,
            "weights": loaded.weights,
            "weights_sha256": loaded.weights_sha256,
            "from_scratch": loaded.weights.startswith("random-init"),
        },
        "data": {
            "kind": pair_kind(pairs),
            "table": table,
            "table_sha256": store.sha256_file(table) if table and Path(table).is_file() else None,
            "sheet": pairs.attrs.get("sheet"),
            "split": pairs.attrs.get("split"),
            "split_applied": pairs.attrs.get("split_applied"),
            "n_pairs": len(pairs),
            "n_slides": int(pairs["slide_id"].nunique()) if "slide_id" in pairs.columns else 0,
            "n_unique_captions": captions.n_unique,
            "labels": {str(k): int(v) for k, v in labels.items()},
            "images_cached": images.cached,
        },
        "training": {
            "device": dev.type,
            "autocast": str(dtype).replace("torch.", "") if dtype else "fp32",
            "torch_threads": images.torch_threads if dev.type == "cpu" else None,
            "workers": images.workers,
            "image_size": loaded.image_size,
            "batch_size": batch_size,
            "loss": type(stepper.loss_fn).__name__,
            "steps": run.steps,
            "stopped_by": run.stopped_by,
            "train_seconds": round(run.train_seconds, 3),
            "seconds_before_training": round(run.train_started - started, 3),
            "images_per_second": round(run.images_per_second, 2),
            "first_loss": run.first_loss,
            "last_loss_mean_of_last_10": run.last_loss,
            "final_logit_scale": float(stepper.model.logit_scale.exp().item()),
        },
        "held_in_zero_shot": held_in,
        "versions": store.package_versions(),
    }


def train_clip(
    pairs: pd.DataFrame | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base: ModelSpec | str | os.PathLike[str],
    settings: TrainSettings = TrainSettings(),
    device: str = "auto",
    tiles_dir: str | os.PathLike[str] | None = None,
    log: logging.Logger | None = None,
    class_prompts: Mapping[str, Sequence[str]] | None = None,
) -> TrainReport:
    """Train (``base`` = a JSON model config: from scratch) or fine-tune (``base`` = a registered model with
    weights) an open_clip model on ``pairs`` and write it to ``out_dir`` (see the module docstring).

    ``pairs``: a frame from :func:`read_pairs`, or the path of a pair table (read with its defaults).
    ``class_prompts`` (class → prompts, e.g. :func:`prompts_from_synonyms`): after training, a zero-shot
    check on up to 2,048 of the training pairs whose ``label`` is a class — *held-in*, so it checks that the
    pipeline learnt its captions, not that it generalises — reported in ``train.json`` and the report.
    """
    started = time.perf_counter()
    started = time.perf_counter()
    logger = log or _log
    if not isinstance(pairs, pd.DataFrame):
        pairs = read_pairs(pairs, tiles_dir=tiles_dir)
    if pairs.empty:
        raise InputError("no pairs to train on", where="train_clip", fix="check the pair table and split")
    if "label" not in pairs.columns:
        pairs = pairs.assign(label="")
    bag = pair_kind(pairs) == "slide"
    if isinstance(base, str | os.PathLike):
        base = ModelSpec(Path(base).stem, str(base))
    dev = resolve_device(device)
    deadline = started + settings.max_seconds if settings.max_seconds is not None else None

    loaded, model_cfg = _load_base(base, settings, dev, pairs, logger)
    captions = _Captions.tokenise(loaded, pairs, dev, logger)
    images = TrainImages(pairs, loaded.image_size, settings, dev, tiles_dir, logger)
    keys = EpochBatches(len(pairs), settings.batch_size, settings.seed, bag)
    if keys.batch_size < settings.batch_size:
        logger.warning("only %d pairs: batches of %d instead of %d", len(pairs), keys.batch_size, settings.batch_size)
    stepper = _Stepper(loaded, captions, settings, dev, bag)
    run = _optimise(stepper, images, keys, settings, deadline, logger)
    logger.info(
        "trained %d steps in %.1f s (%.0f img/s, stopped by %s): loss %.3f -> %.3f",
        run.steps,
        run.train_seconds,
        run.images_per_second,
        run.stopped_by,
        run.first_loss,
        run.last_loss,
    )
    held_in = held_in_check(loaded, images, pairs, class_prompts, settings.seed, logger) if class_prompts else None

    out = Path(out_dir)
    probe = next(iter(images.pixels(list(range(min(4, len(pairs)))))))[1]
    description = _description(
        out, settings, base, loaded, pairs, captions, images, stepper, keys.batch_size, run, started, held_in
    )
    save_model(out, loaded, model_cfg, run.rows, keys.batch_size, probe, bag, description)
    return TrainReport(
        steps=run.steps,
        seconds=time.perf_counter() - started,
        first_loss=run.first_loss,
        last_loss=run.last_loss,
        n_pairs=len(pairs),
        out_dir=out,
        train_seconds=run.train_seconds,
        images_per_second=run.images_per_second,
        stopped_by=run.stopped_by,
        held_in=held_in,
    )
