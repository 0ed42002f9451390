"""One GPU per concurrent embedding job (histoclip.embedding.devices), tested without a GPU: real processes claim
GPU slots through the real lock files and report the CUDA_VISIBLE_DEVICES they were given."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import textwrap
import time

import pytest

from histoclip.embedding.devices import assign_gpu, candidate_devices, claim_gpu

CLAIM = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from histoclip.embedding.devices import assign_gpu
    lock_dir, hold_s, devices = Path(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
    started = time.monotonic()
    slot = assign_gpu("auto", devices, lock_dir=lock_dir)
    print(json.dumps({"gpu": os.environ["CUDA_VISIBLE_DEVICES"], "waited_s": time.monotonic() - started}), flush=True)
    time.sleep(hold_s)
    """
)


def job(lock_dir, hold_s, devices):
    """An embedding job's first step, in a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-c", CLAIM, str(lock_dir), str(hold_s), json.dumps(devices)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_concurrent_jobs_each_get_their_own_gpu_and_a_fifth_waits_for_a_free_one(tmp_path):
    devices = [0, 1, 2, 3]
    first = [job(tmp_path, 6, devices) for _ in range(4)]
    claims = [json.loads(p.stdout.readline()) for p in first]
    assert sorted(c["gpu"] for c in claims) == ["0", "1", "2", "3"]  # never two on one GPU, none left idle

    fifth = job(tmp_path, 0, devices)  # all four held: it waits until a job ends and frees its GPU
    claim = json.loads(fifth.stdout.readline())
    for p in [*first, fifth]:
        p.wait(timeout=60)
    assert claim["gpu"] in {"0", "1", "2", "3"} and claim["waited_s"] > 2


def test_a_killed_job_frees_its_gpu(tmp_path):
    holder = job(tmp_path, 120, ["7", "8"])
    assert json.loads(holder.stdout.readline())["gpu"] == "7"
    second = job(tmp_path, 0, ["7", "8"])
    assert json.loads(second.stdout.readline())["gpu"] == "8"
    second.wait(timeout=60)
    holder.kill()  # SIGKILL: no cleanup code runs; the lock goes with the process
    holder.wait(timeout=60)
    third = job(tmp_path, 0, ["7", "8"])
    assert json.loads(third.stdout.readline())["gpu"] == "7"
    third.wait(timeout=60)


def _claim_in_fork(lock_dir, queue):  # noqa: ANN001 (child process)
    environ = {}
    slot = claim_gpu(["a", "b"], lock_dir, poll_s=0.1, timeout_s=1, environ=environ)
    queue.put(environ["CUDA_VISIBLE_DEVICES"])
    time.sleep(3)
    slot.release()


def test_all_gpus_held_past_the_timeout_is_an_error(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    holders = [context.Process(target=_claim_in_fork, args=(tmp_path, queue)) for _ in range(2)]
    for p in holders:
        p.start()
    assert sorted(queue.get(timeout=30) for _ in holders) == ["a", "b"]
    with pytest.raises(TimeoutError, match=r"every GPU of \['a', 'b'\] stayed held by other jobs for 1 s"):
        claim_gpu(["a", "b"], tmp_path, poll_s=0.1, timeout_s=1, environ={})
    for p in holders:
        p.join()


def test_which_gpus_a_job_chooses_from():
    # the config's list first, then the job's CUDA_VISIBLE_DEVICES (a scheduler's or the user's), then the node's GPUs
    assert candidate_devices([2, 3], {"CUDA_VISIBLE_DEVICES": "0,1"}) == ["2", "3"]
    assert candidate_devices(None, {"CUDA_VISIBLE_DEVICES": "GPU-1a2b, GPU-3c4d"}) == ["GPU-1a2b", "GPU-3c4d"]
    assert candidate_devices(None, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert candidate_devices(None, {}, gpu_count=4) == ["0", "1", "2", "3"]


def test_no_choice_no_claim(tmp_path):
    environ = {}
    # one GPU (as SLURM gives each job), none, cpu, or an explicit device: nothing is claimed, nothing is changed
    assert assign_gpu("auto", None, tmp_path, {"CUDA_VISIBLE_DEVICES": "3"}) is None
    assert assign_gpu("auto", None, tmp_path, environ, gpu_count=0) is None and environ == {}
    assert assign_gpu("cpu", [0, 1], tmp_path, environ) is None and environ == {}
    assert assign_gpu("cuda:1", [0, 1], tmp_path, environ) is None and environ == {}
    # one GPU named in the config: the job is pointed at it
    assert assign_gpu("cuda", [5], tmp_path, environ) is None and environ == {"CUDA_VISIBLE_DEVICES": "5"}
    # several: a lock is held (the file names the holder)
    environ = {}
    slot = assign_gpu("auto", None, tmp_path, environ, gpu_count=2)
    assert slot.device == "0" and environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert slot.lock_path.read_text().strip().isdigit()
    slot.release()
