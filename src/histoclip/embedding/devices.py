"""One GPU per embedding job when several jobs share a node with several GPUs.

Why: Snakemake's ``gpu`` resource only counts: ``--resources gpu=4`` lets four embedding jobs run at once on a
4-GPU workstation, but it tells no job which GPU is its own (Snakemake 9 sets no ``CUDA_VISIBLE_DEVICES``; its issue
#281), so every job's ``cuda`` is GPU 0: four models and four sets of batches on one GPU, three GPUs idle. On SLURM
the scheduler gives each job its GPU (``--gpus``) and sets ``CUDA_VISIBLE_DEVICES`` itself; there is nothing to do.

So an embedding job, before CUDA is touched, claims a GPU slot: the first of the node's GPUs that no other job
holds, held by an exclusive ``flock`` on a lock file per GPU (in ``/tmp/histoclip-gpu-locks``: shared by every
job on the node, whichever workflow started it), and sets ``CUDA_VISIBLE_DEVICES`` to it. The lock goes with the
process: a job that ends, fails or is killed frees its GPU. A job that finds every GPU held waits for one.

The GPUs to choose from, in order: the config's ``embedding.devices`` (ids as ``CUDA_VISIBLE_DEVICES`` takes them:
the node's GPU indices, or GPU/MIG UUIDs); else the entries of ``CUDA_VISIBLE_DEVICES`` when the job was started with
it; else every GPU of the node (counted from ``/proc/driver/nvidia/gpus``, which does not start CUDA: once CUDA has
started in a process, ``CUDA_VISIBLE_DEVICES`` no longer changes what it sees). With one GPU or none there is
nothing to choose; an explicit ``embedding.device: cuda:N`` or ``cpu`` is the user's choice and is kept.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

#: Where the per-GPU lock files live (node-local: every job on the node sees the same files).
LOCK_DIR = Path(tempfile.gettempdir()) / "histoclip-gpu-locks"
#: What the NVIDIA driver lists, one entry per GPU, without starting CUDA.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass
class GpuSlot:
    """A GPU this process holds (until :meth:`release` or the process ends)."""

    device: str  # as CUDA_VISIBLE_DEVICES names it
    lock_path: Path
    _handle: IO[str] | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None


def node_gpu_count(nvidia_gpus: Path = NVIDIA_GPUS) -> int:
    try:
        return sum(1 for _ in nvidia_gpus.iterdir())
    except OSError:
        return 0


def candidate_devices(
    configured: Sequence[int | str] | None, environ: Mapping[str, str] | None = None, gpu_count: int | None = None
) -> list[str]:
    """The GPUs this job may use, in the order they are tried (module docstring)."""
    environ = os.environ if environ is None else environ
    if configured:
        return [str(device) for device in configured]
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry.strip() for entry in visible.split(",") if entry.strip() and entry.strip() != "-1"]
    count = node_gpu_count() if gpu_count is None else gpu_count
    return [str(index) for index in range(count)]


def _lock_name(device: str) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9._-]", "_", device) + ".lock"


def claim_gpu(
    candidates: Sequence[str],
    lock_dir: Path = LOCK_DIR,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> GpuSlot:
    """Hold the first of ``candidates`` no other process holds (waiting while all are held) and point
    ``CUDA_VISIBLE_DEVICES`` at it; raise TimeoutError after ``timeout_s`` (None: wait as long as it takes)."""
    environ = os.environ if environ is None else environ
    lock_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    waited = False
    while True:
        for device in candidates:
            path = lock_dir / _lock_name(device)
            handle = open(path, "a+")  # noqa: SIM115 (held open for the life of the slot)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                handle.close()
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    continue
                raise
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            environ["CUDA_VISIBLE_DEVICES"] = device
            log.info("GPU %s is this job's (CUDA_VISIBLE_DEVICES=%s; lock %s)", device, device, path)
            return GpuSlot(device, path, handle)
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"every GPU of {list(candidates)} stayed held by other jobs for {timeout_s:.0f} s")
        if not waited:
            log.info("every GPU (%s) is held by another job: waiting for one", ", ".join(candidates))
            waited = True
        time.sleep(poll_s)


def assign_gpu(
    device: str,
    configured: Sequence[int | str] | None = None,
    lock_dir: Path = LOCK_DIR,
    environ: MutableMapping[str, str] | None = None,
    gpu_count: int | None = None,
) -> GpuSlot | None:
    """What an embedding job calls first (before CUDA is touched): claim its own GPU when it has several to choose
    from (config ``embedding.device`` ``auto`` or ``cuda``, ``embedding.devices``); None when there is no choice
    to make (one GPU or none, ``cpu``, or an explicit ``cuda:N``)."""
    environ = os.environ if environ is None else environ
    if device not in ("auto", "cuda"):
        return None
    candidates = candidate_devices(configured, environ, gpu_count)
    if len(candidates) == 1 and configured:
        environ["CUDA_VISIBLE_DEVICES"] = candidates[0]  # the one GPU the config names
    if len(candidates) <= 1:
        return None
    return claim_gpu(candidates, lock_dir, environ=environ)
