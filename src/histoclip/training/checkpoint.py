"""Saving a trained model as an open_clip ``local-dir`` folder, atomically and checked.

The folder (``open_clip_config.json``, ``open_clip_model.safetensors``, ``loss.tsv``, ``loss.png``,
``train.json``) is written into a temporary folder beside ``out_dir``, reloaded through
:func:`histoclip.embedding.models.load_model` (it must give the same embeddings as the model in memory),
and only then renamed into place: a failed run leaves the previous model as it was.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoclip import store
from histoclip.embedding.models import LoadedModel, ModelSpec, hub_offline, load_model
from histoclip.errors import InputError
from histoclip.training.held_in import encode_images

#: One row of the loss curve: step, loss, learning rate, seconds since training started.
LossRow = tuple[int, float, float, float]


def base_model_cfg(spec: ModelSpec) -> dict[str, Any]:
    """The open_clip model config of the base model (what the saved folder's ``model_cfg`` starts from)."""
    import open_clip

    if spec.model.endswith(".json"):
        cfg = json.loads(Path(spec.model).read_text())
        cfg = cfg.get("model_cfg", cfg)
    else:
        with hub_offline(not spec.allow_download):
            cfg = open_clip.get_model_config(spec.model)
    if not cfg:
        raise InputError(
            f"cannot find the open_clip config of {spec.model!r}",
            where=f"base model {spec.name!r}",
            fix="use a built-in architecture, local-dir:, a cached hf-hub: model or a JSON config",
        )
    return copy.deepcopy(dict(cfg))


def _plot_loss(path: Path, rows: list[tuple[int, float, float, float]], batch_size: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.array([r[0] for r in rows])
    loss = np.array([r[1] for r in rows])
    lr = np.array([r[2] for r in rows])
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="loss")
    window = max(1, len(loss) // 20)
    if len(loss) >= window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", lw=2, label=f"running mean ({window} steps)")
    ax.axhline(math.log(batch_size), color="grey", ls="--", lw=1, label=f"chance, ln({batch_size})")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.legend(loc="upper right", fontsize=8)
    twin = ax.twinx()
    twin.plot(steps, lr, color="tab:orange", lw=1)
    twin.set_ylabel("learning rate", color="tab:orange")
    figure.tight_layout()
    figure.savefig(path, format="png")


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder over ``final`` (a previous output is moved aside, then deleted)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _check_reload(folder: Path, model: LoadedModel, probe: torch.Tensor, bag: bool) -> None:
    """The saved folder must load through histoclip.embedding.models and embed like the model in memory."""
    reloaded = load_model(ModelSpec("reload-check", f"local-dir:{folder}", precision="fp32"), model.device)
    saved_dtype, model.autocast_dtype = model.autocast_dtype, None
    try:
        expected = encode_images(model, probe, bag)
        got = encode_images(reloaded, probe, bag)
    finally:
        model.autocast_dtype = saved_dtype
    if reloaded.image_size != model.image_size or not torch.allclose(expected, got, atol=1e-4):
        raise RuntimeError(
            f"the saved model in {folder} does not reproduce the trained one (image size {reloaded.image_size} vs "
            f"{model.image_size}, max difference {float((expected - got).abs().max()):.3g})"
        )


def _write_model(
    folder: Path, model: LoadedModel, model_cfg: dict[str, Any], rows: list[tuple[int, float, float, float]], batch: int
) -> None:
    """open_clip local-dir files, the loss curve as TSV and PNG."""
    from safetensors.torch import save_file

    preprocess_cfg = {
        **(getattr(model.model.visual, "preprocess_cfg", None) or {}),
        "size": model.image_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "interpolation": model.interpolation,
    }
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n", encoding="utf-8"
    )
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors", metadata={"format": "pt"})
    with open(folder / "loss.tsv", "w", encoding="utf-8") as fh:
        fh.write("step\tloss\tlr\tseconds\n")
        for step, loss, lr, seconds in rows:
            fh.write(f"{step}\t{loss:.6g}\t{lr:.6g}\t{seconds:.3f}\n")
    _plot_loss(folder / "loss.png", rows, batch)


def save_model(
    out_dir: str | os.PathLike[str],
    loaded: LoadedModel,
    model_cfg: dict[str, Any],
    rows: list[LossRow],
    batch_size: int,
    probe: torch.Tensor,
    bag: bool,
    description: dict[str, Any],
) -> Path:
    """Write the model folder to ``out_dir`` (see the module docstring); ``probe``: a few training images (bags
    when ``bag``) to check the reload with; ``description``: the content of ``train.json``."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~store._UMASK)
        _write_model(tmp, loaded, model_cfg, rows, batch_size)
        _check_reload(tmp, loaded, probe, bag)
        (tmp / "train.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        for child in tmp.iterdir():
            os.chmod(child, 0o666 & ~store._UMASK)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
