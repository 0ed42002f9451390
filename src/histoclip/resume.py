"""Resuming a shard job: each slide's finished outputs are kept beside them with a reuse key.

Why: a shard job makes many slides' outputs (tile files and thumbnails, embedding files), and Snakemake deletes
every output of a job before re-running it, so a shard killed (walltime, node failure) or failed on one bad slide
would lose every slide already done. A slide's outputs are therefore kept, once finished, as hard links under
``.finished/`` beside them (:func:`finished_path`), together with a reuse key: what decides them (the inputs'
identity, the settings, the model). A re-run puts a kept slide back only when its key is unchanged; anything
else is made again. A slide that failed is never kept, so a re-run retries it.

Where the key is kept: in ``.finished/{name}.key`` beside the first kept output, written after the links, so a
crash half-way leaves no key and the slide is simply made again; or, for an output that records its own key
(an embedding file's footer names its tile file's and its weights' sha256), read from the output itself, so
nothing else is stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histoclip import store

#: Folder beside a stage's outputs where finished per-slide files are kept as hard links (see finished_path).
FINISHED_DIR = ".finished"


def finished_path(out_path: str | os.PathLike[str]) -> Path:
    """Where a finished output is kept beside itself: ``{folder}/.finished/{name}``."""
    out = Path(out_path)
    return out.parent / FINISHED_DIR / out.name


def reuse_key(what: Mapping[str, Any]) -> str:
    """The key of a description of what decides a slide's outputs: sha256 of its JSON (keys sorted)."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class FinishedSlide:
    """One slide's outputs of a shard job and the key they must match to be reused.

    ``key`` None: the slide can't be described (e.g. its file can't be read), so it is never kept or reused.
    ``key_inside`` reads the key the first output records in itself (None when it can't be read); without it the
    key is kept in a ``.key`` file.
    """

    outputs: tuple[Path, ...]
    key: str | None
    key_inside: Callable[[Path], str | None] | None = None

    @classmethod
    def of(
        cls,
        outputs: Sequence[str | os.PathLike[str]],
        key: str | None,
        key_inside: Callable[[Path], str | None] | None = None,
    ) -> FinishedSlide:
        return cls(tuple(Path(out) for out in outputs), key, key_inside)

    @property
    def key_file(self) -> Path:
        return finished_path(self.outputs[0]).with_suffix(".key")

    def keep(self) -> None:
        """Keep the finished outputs under ``.finished/``; a key file is written last (see the module docstring)."""
        if self.key_inside is None:
            self.key_file.unlink(missing_ok=True)
        if self.key is None:
            return
        for out in self.outputs:
            store.link_atomic(out, finished_path(out))
        if self.key_inside is None:
            store.write_text_atomic(self.key_file, self.key + "\n")

    def restore(self) -> bool:
        """Whether the slide's outputs are (now) at their paths, matching the key: those that record their key
        are reused where they stand, otherwise the kept ones are linked back."""
        if self.key is None:
            return False
        if self.key_inside is not None and self._matches(self.outputs):
            return True
        kept = tuple(finished_path(out) for out in self.outputs)
        if not self._matches(kept):
            return False
        for source, out in zip(kept, self.outputs, strict=True):
            store.link_atomic(source, out)
        return True

    def _matches(self, paths: tuple[Path, ...]) -> bool:
        if not all(path.is_file() for path in paths):
            return False
        if self.key_inside is not None:
            return self.key_inside(paths[0]) == self.key
        try:
            return self.key_file.read_text().strip() == self.key
        except OSError:
            return False
