"""The SLURM profile (config/profiles/slurm), checked statically and then for real against a scheduler.

The real test starts a single-node SLURM cluster on this machine (tests/slurm/start_slurm.sh: munged,
slurmctld, slurmd, partitions `cpu` and `gpu`, a GPU *count* so that GPU requests are scheduled as on a
cluster), runs a small demo cohort through `--executor slurm` with the profile as shipped (plus the options a
cluster without slurmdbd needs), and checks that

- the outputs equal those of a local run of the same configuration (tiles, embeddings, trained model, calls),
- every job went through sbatch: the scheduler's own record (`scontrol show job`, the job-completion log)
  lists one completed job per rule the local run ran, with the profile's resources, GPU jobs on the GPU
  partition, and one job per shard of slides,
- and every daemon it started is stopped afterwards.

It needs root and SLURM (installed with apt-get when missing). Where that is impossible it skips with the
reason, and fails under CI (CI set) so that a machine that can't run it never turns into a green run.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from histoclip.store import read_metadata

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "config" / "profiles" / "slurm"
START = REPO / "tests" / "slurm" / "start_slurm.sh"
STOP = REPO / "tests" / "slurm" / "stop_slurm.sh"
MARK = "# written by histoclip tests/slurm/start_slurm.sh"

# The demo, reduced to keep CI time down: 7 slides (two tiling and two embedding shards), 20 small training steps.
SMALL = """\
demo: {n_patients: 6, extra_slides: 1, slide_px: 2048}
training:
  demo-clip: {steps: 20, batch_size: 16}
embedding: {shard_size: 4, threads: 2}
tiling: {shard_size: 4, threads: 2}
"""
N_SLIDES = 7
# What a cluster without slurmdbd needs (see the profile's SITE SETTINGS), and a fast, bounded test run:
# two cores like the test node, quick status polls, no retries.
TEST_CLUSTER = (
    "--slurm-status-command", "squeue",
    "--slurm-no-account",
    "--slurm-init-seconds-before-status-checks", "1",
    "--latency-wait", "5",
    "--jobs", "4",
    "--cores", "2",
    "--retries", "0",
)  # fmt: skip
SLURM_RUN_TIMEOUT_S = 420


def rule_names() -> set[str]:
    names = set()
    for smk in (REPO / "rules").glob("*.smk"):
        names |= set(re.findall(r"^rule (\w+):", smk.read_text(), flags=re.M))
    return names


def load_profile() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


# --- the profile, statically (fast) ---------------------------------------------------------------------


def test_profile_names_only_rules_that_exist():
    profile = load_profile()
    rules = rule_names()
    assert profile["executor"] == "slurm"
    for rule in profile["set-resources"]:
        assert rule in rules, f"profile refers to rule {rule!r}, which is not in rules/*.smk"
    # tiling and embedding are sharded (one job per shard of slides): grouping would only add a layer
    assert "groups" not in profile and "group-components" not in profile


def resource_at(expression, attempt: int):
    """A profile resource as Snakemake evaluates it: a Python expression in which `attempt` is defined."""
    return eval(str(expression), {"attempt": attempt})


def test_profile_resources_grow_with_the_attempt():
    profile = load_profile()
    entries = {"default": profile["default-resources"], **profile["set-resources"]}
    for where, resources in entries.items():
        for name in ("mem_mb", "runtime"):
            assert name in resources, f"{where}: {name} missing"
            first, second = resource_at(resources[name], 1), resource_at(resources[name], 2)
            assert second == 2 * first > 0, f"{where}: {name} does not grow with the attempt"
    assert profile["retries"] >= 1


def test_partition_file_sends_gpu_jobs_to_a_gpu_partition():
    from snakemake_executor_plugin_slurm.partitions import read_partition_file

    partitions = read_partition_file(PROFILE / "partitions.yaml")
    assert any(p.limits.max_gpu > 0 for p in partitions), "no partition with GPUs"
    assert any(p.limits.max_gpu == 0 for p in partitions), "no CPU-only partition"


# --- a real scheduler -------------------------------------------------------------------------------------


def cannot_run_slurm() -> str | None:
    """Why this machine can't host the test cluster, or None."""
    if os.geteuid() != 0:
        return "the SLURM test needs root (it installs SLURM with apt-get and starts munged, slurmctld, slurmd)"
    have = all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    for conf in (Path("/etc/slurm/slurm.conf"), Path("/etc/slurm/gres.conf")):
        if conf.exists() and MARK not in conf.read_text(errors="replace"):
            return f"{conf} belongs to a real SLURM installation; the test won't replace it"
    return None


def give_up(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"SLURM test can't run under CI: {reason}")
    pytest.skip(reason)


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("Snakefile", "rules", "scripts", "config", "src", "envs"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    (dest / "small.yaml").write_text(SMALL)
    return dest


def snakemake(workdir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *args, "--configfile", "config/demo.yaml", "small.yaml"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed in {workdir}:\n{result.stdout}\n{result.stderr}")
    return result


def scheduler_jobs() -> list[dict[str, str]]:
    """Every job slurmctld remembers (MinJobAge = 1 h), as key=value fields of `scontrol show job -o`."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "JobId" in fields:
            jobs.append(fields)
    return jobs


def daemon_pids(state: Path) -> dict[str, int]:
    return {f.stem: int(f.read_text()) for f in state.glob("*.pid") if f.read_text().strip()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = cannot_run_slurm()
    if reason:
        give_up(reason)
    state = tmp_path_factory.mktemp("slurm-state")
    pids: dict[str, int] = {}
    try:
        started = subprocess.run(["bash", str(START), str(state)], capture_output=True, text=True, timeout=600)
        pids = daemon_pids(state)
        if started.returncode != 0:
            give_up(f"could not start SLURM:\n{started.stdout}\n{started.stderr}")
        assert {"slurmctld", "slurmd"} <= set(pids), pids
        yield {"state": state, "pids": pids}
    finally:
        subprocess.run(["bash", str(STOP), str(state)], capture_output=True, text=True, timeout=120)
        pids = pids or daemon_pids(state)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {name: pid for name, pid in pids.items() if alive(pid)}
        assert not left, f"daemons still running after stop_slurm.sh: {left}"
        assert not Path("/etc/slurm/slurm.conf").exists() or MARK not in Path("/etc/slurm/slurm.conf").read_text()


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory):
    """The same small demo twice: locally, and through SLURM with the profile. The cohort is made once."""
    root = tmp_path_factory.mktemp("slurm-vs-local")
    base = copy_workflow(root / "base")
    snakemake(base, "demo_cohort", "--cores", "2")
    local, cluster = root / "local", root / "cluster"
    shutil.copytree(base, local, symlinks=True)
    shutil.copytree(base, cluster, symlinks=True)

    began = time.monotonic()
    local_run = snakemake(local, "--cores", "2")
    local_s = time.monotonic() - began
    began = time.monotonic()
    try:
        cluster_run = snakemake(
            cluster,
            "--workflow-profile",
            str(cluster / "config/profiles/slurm"),
            *TEST_CLUSTER,
            timeout=SLURM_RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        state = slurm_cluster["state"]
        queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
        raise AssertionError(
            f"the SLURM run did not finish in {SLURM_RUN_TIMEOUT_S} s; queue:\n{queue}\n"
            f"slurmctld log: {state / 'slurmctld.log'}\n{error.stdout}\n{error.stderr}"
        ) from None
    cluster_s = time.monotonic() - began
    print(f"\nlocal run {local_s:.0f} s, SLURM run {cluster_s:.0f} s")
    return {"local": local, "cluster": cluster, "local_log": local_run.stderr, "cluster_log": cluster_run.stderr}


def rules_run(log: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", log, flags=re.M)) - {"all"}


def comparable_metadata(path: Path, workdir: Path) -> dict:
    """Parquet metadata with the run's own folder written as <workdir>; file hashes of such files left out."""
    meta = {}
    for key, value in read_metadata(path).items():
        if key.endswith("sha256") and key != "weights_sha256":
            continue  # the hash of another output, whose metadata holds its absolute path
        meta[key] = str(value).replace(str(workdir), "<workdir>")
    return meta


@pytest.mark.integration
@pytest.mark.slow
def test_slurm_run_equals_local_run(runs):
    local, cluster = runs["local"], runs["cluster"]

    def produced(root: Path) -> set[str]:
        return {
            str(p.relative_to(root))
            for p in (root / "results").rglob("*")
            if p.is_file() and "logs" not in p.relative_to(root).parts
        }

    assert produced(local) == produced(cluster)
    tiles = sorted((local / "results/tiles").glob("*.parquet"))
    embeddings = sorted((local / "results/embeddings/demo").glob("*.parquet"))
    assert len(tiles) == len(embeddings) == N_SLIDES
    for path in [*tiles, *embeddings]:
        twin = cluster / path.relative_to(local)
        assert pq.read_table(path).equals(pq.read_table(twin)), f"{path.relative_to(local)} differs"
        assert comparable_metadata(path, local) == comparable_metadata(twin, cluster), path.relative_to(local)
    for name in (
        "results/models/demo-clip/open_clip_model.safetensors",
        "results/zeroshot/demo/demo/calls.tsv",
        "results/qc/cohort.tsv",
    ):
        assert (local / name).read_bytes() == (cluster / name).read_bytes(), f"{name} differs"
    calls = (local / "results/zeroshot/demo/demo/calls.tsv").read_text().splitlines()
    assert len(calls) == 1 + N_SLIDES


@pytest.mark.integration
@pytest.mark.slow
def test_nothing_left_to_do_after_the_slurm_run(runs):
    """The cluster jobs recorded their outputs' metadata like a local run: a second look plans nothing."""
    cluster = runs["cluster"]
    again = snakemake(cluster, "-n", "--workflow-profile", str(cluster / "config/profiles/slurm"), *TEST_CLUSTER)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout + again.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_every_job_went_through_the_scheduler(runs, slurm_cluster):
    cluster = runs["cluster"]
    jobs = [j for j in scheduler_jobs() if Path(j.get("WorkDir", "")) == cluster]
    assert jobs, "slurmctld has no job from the workflow folder"
    assert all(j["JobState"] == "COMPLETED" for j in jobs), [(j["JobId"], j["JobState"]) for j in jobs]
    # the plugin tags each sbatch with --comment rule_<rule or group>[_wildcards_<...>]
    by_rule: dict[str, list[dict]] = {}
    for job in jobs:
        name = re.fullmatch(r"rule_(\w+?)(?:_wildcards_.*)?", job["Comment"])[1]
        by_rule.setdefault(name, []).append(job)

    expected = rules_run(runs["local_log"])
    assert "train_clip" in expected and {"tile_shard00000", "tile_shard00001"} <= expected
    assert any(r.startswith("embed_") for r in expected)
    # rules declared `localrule: True` (a few lines of bookkeeping) run in the Snakemake process on the login node
    ran_locally = set(re.findall(r"^localrule (\w+):", runs["cluster_log"], flags=re.M)) - {"all"}
    assert ran_locally <= {"versions", "embedding_manifest"}, ran_locally
    assert set(by_rule) == expected - ran_locally
    # one SLURM job per shard of slides: 7 slides, 4 per shard
    tiling = [rule for rule in by_rule if rule.startswith("tile_")]
    assert len(tiling) == math.ceil(N_SLIDES / 4) and all(len(by_rule[rule]) == 1 for rule in tiling)
    # GPU jobs asked for a GPU through the plugin's `gpu` resource and were sent to the GPU partition
    for rule, rule_jobs in by_rule.items():
        wants_gpu = rule.startswith("embed_") or rule in ("train_clip", "mil")  # rules with a `gpu` resource
        for job in rule_jobs:
            assert job["Partition"] == ("gpu" if wants_gpu else "cpu"), (rule, job["Partition"])
            assert ("gres:gpu:1" in job.get("TresPerJob", "")) == wants_gpu, (rule, job.get("TresPerJob"))
    # the profile's resources reached sbatch (attempt 1); a tiling shard asks for its threads (here 2) and
    # 2000 MB per thread (rules/tiling.smk)
    wanted = load_profile()["set-resources"]
    assert by_rule["train_clip"][0]["MinMemoryNode"] == f"{resource_at(wanted['train_clip']['mem_mb'], 1)}M"
    for rule in tiling:
        assert by_rule[rule][0]["MinMemoryNode"] == "4000M" and by_rule[rule][0]["NumCPUs"] == "2", by_rule[rule][0]
    # and slurmctld's job-completion log has every one of them as completed
    completed = (slurm_cluster["state"] / "jobcomp.log").read_text()
    for job in jobs:
        assert re.search(rf"^JobId={job['JobId']} .*JobState=COMPLETED", completed, flags=re.M), job["JobId"]
