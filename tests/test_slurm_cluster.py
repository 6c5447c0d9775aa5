"""The SLURM examples in cluster/, run for real on a one-node SLURM cluster on this machine.

The cluster comes from ../shared/slurm/start_local_slurm.sh (found through SPIKE_SHARED_DIR or
../shared; it installs and starts slurmctld, slurmd and munge as root in ~10 s) or is one that is
already up; the test skips with the reason where neither is possible (a user's machine). Only a
cluster this module started is stopped at the end.

Checked: an array of 3 shards of sample_data plus the combine job (afterok) gives, subject by
subject, the grids of one plain unsharded run, per-shard logs and a combined_metadata.h5 of all 3
subjects; cluster/submit.sh does the same in one line, a failing subject fails its shard and
cancels the combine job, and resubmitting the same command after the fix processes only that
subject.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO_DIR, shared_dir

CLUSTER_DIR = REPO_DIR / "cluster"
ARRAY_SCRIPT = CLUSTER_DIR / "spike_grids_array.sbatch"
COMBINE_SCRIPT = CLUSTER_DIR / "spike_grids_combine.sbatch"
SUBJECTS = ("subject_1", "subject_2", "subject_3")
PIPELINE_ARGS = ["--cascade_model", "builtin", "--offline", "--no_plots"]
# The scripts' defaults are sized for a whole fish (8 CPUs, 64G): on the local 2-core node such a
# job would stay pending forever (reason PartitionConfig), so tests ask for little, as a user may.
SMALL_JOB = ["--cpus-per-task=1", "--mem=2G", "--time=10"]
COMPARED = ("spike_coords", "is_train", "timepoint_indices", "grid_shape")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"}
FINISHED |= {"DEADLINE", "PREEMPTED"}


def cluster_ready() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and bool({"idle", "mix", "alloc"} & set(result.stdout.split()))


@pytest.fixture(scope="module")
def slurm():
    """A running SLURM cluster; started here (and stopped at the end) only if none was up."""
    if cluster_ready():
        yield
        return
    slurm_dir = shared_dir() / "slurm"
    start = slurm_dir / "start_local_slurm.sh"
    if not start.is_file():
        pytest.skip(f"no SLURM cluster running and no {start} to start one (set SPIKE_SHARED_DIR)")
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster running, and starting the local one needs root")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no SLURM cluster running, and no apt-get to install the local one")
    result = subprocess.run(["bash", str(start)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not cluster_ready():
        subprocess.run(["bash", str(slurm_dir / "stop_local_slurm.sh")], capture_output=True, timeout=120)
        pytest.skip(f"the local SLURM cluster did not start: {(result.stdout + result.stderr)[-1500:]}")
    try:
        yield
    finally:
        subprocess.run(["bash", str(slurm_dir / "stop_local_slurm.sh")], capture_output=True, timeout=120)


def job_env(**extra) -> dict:
    """The environment sbatch exports to the jobs: this Python, and no pipeline location unless
    given (the scripts must find the checkout themselves, although SLURM runs a spooled copy)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIKE_GRIDS_", "SBATCH_", "SLURM_"))}
    env.update(SPIKE_GRIDS_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def sbatch(*args, cwd: Path) -> str:
    result = subprocess.run(
        ["sbatch", "--parsable", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=job_env()
    )
    assert result.returncode == 0, f"sbatch failed ({result.returncode}): {result.stderr}"
    return result.stdout.strip().split(";")[0]


def wait_for_jobs(*job_ids: str, timeout: float = 300) -> dict:
    """{'<id>' or '<array id>_<task>': (state, exit code)} once every job (every task of an array)
    has finished. Polls scontrol each second (finished jobs stay listed for MinJobAge, 300 s);
    `sbatch --wait` would do, but polls at 2, 10, 42 s, which costs up to half a minute."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = {}
        for job_id in job_ids:
            out = subprocess.run(
                ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30
            ).stdout
            for line in out.splitlines():
                fields = dict(re.findall(r"(\w+)=(\S*)", line))
                task = fields.get("ArrayTaskId")
                key = f"{fields.get('ArrayJobId')}_{task}" if task else fields["JobId"]
                jobs[key] = (fields["JobState"], int(fields["ExitCode"].split(":")[0]))
        if jobs and all(state in FINISHED for state, _ in jobs.values()):
            return jobs
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)
            raise AssertionError(f"jobs not finished after {timeout} s: {jobs}")
        time.sleep(1)


def job_outputs(folder: Path) -> str:
    """The jobs' stdout/stderr files, for assertion messages."""
    return "\n".join(f"== {f.name}\n{f.read_text()[-3000:]}" for f in sorted(folder.glob("*.out")))


def assert_same_grids(out: Path, reference: Path) -> None:
    for subject in SUBJECTS:
        with h5py.File(out / subject / "preaugmented_grids_coo.h5", "r") as got:
            with h5py.File(reference / subject / "preaugmented_grids_coo.h5", "r") as want:
                for name in COMPARED:
                    np.testing.assert_array_equal(got[name][:], want[name][:], err_msg=f"{subject} {name}")


def assert_combined_lists_all(out: Path) -> None:
    with h5py.File(out / "combined_metadata.h5", "r") as h5:
        assert set(SUBJECTS) <= set(h5.keys()), list(h5.keys())
        assert int(h5.attrs["total_subjects"]) == len(SUBJECTS)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """One ordinary unsharded run, without SLURM: the reference."""
    out = tmp_path_factory.mktemp("plain") / "out"
    result = subprocess.run(
        [sys.executable, str(REPO_DIR / "unified_spike_processing_coo.py"), "--input_dir",
         str(REPO_DIR / "sample_data"), "--output_dir", str(out), *PIPELINE_ARGS],
        capture_output=True, text=True, timeout=600, env=job_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def copy_sample_data(tmp_path: Path) -> Path:
    inp = tmp_path / "in"
    shutil.copytree(REPO_DIR / "sample_data", inp)
    return inp


def test_array_of_shards_then_combine(slurm, plain_run, tmp_path):
    inp, out = copy_sample_data(tmp_path), tmp_path / "out"
    args = ["--input_dir", inp, "--output_dir", out, *PIPELINE_ARGS]
    # submitted from a folder that is not the checkout: the script must still find the pipeline
    array = sbatch(*SMALL_JOB, "--array=1-3", f"--output={tmp_path}/%x_%A_%a.out", ARRAY_SCRIPT, *args, cwd=tmp_path)
    combine = sbatch(
        *SMALL_JOB, f"--dependency=afterok:{array}", f"--output={tmp_path}/%x_%j.out", COMBINE_SCRIPT, *args,
        cwd=tmp_path,
    )  # fmt: skip
    jobs = wait_for_jobs(array, combine)

    logs = job_outputs(tmp_path)
    assert sorted(jobs) == sorted([f"{array}_1", f"{array}_2", f"{array}_3", combine]), jobs
    assert all(job == ("COMPLETED", 0) for job in jobs.values()), f"{jobs}\n{logs}"
    for k in (1, 2, 3):
        assert (out / f"processing_shard{k}of3.log").is_file(), f"no log of shard {k}/3\n{logs}"
    assert_same_grids(out, plain_run)
    assert_combined_lists_all(out)


def test_submit_one_liner_failure_and_resubmit(slurm, plain_run, tmp_path):
    inp = copy_sample_data(tmp_path)
    broken = inp / "subject_2" / "TimeSeries.h5"
    intact = broken.read_bytes()
    broken.write_bytes(intact[: len(intact) // 2])  # truncated: subject_2 fails, its shard exits 1

    # relative paths, as a user types them: jobs start in the submission folder
    command = ["bash", str(CLUSTER_DIR / "submit.sh"), "--input_dir", "in", "--output_dir", "out", *PIPELINE_ARGS]
    env = job_env(SPIKE_GRIDS_SBATCH_ARGS=" ".join(SMALL_JOB))

    def submit() -> tuple[str, str, dict]:
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
        assert result.returncode == 0, f"submit.sh failed ({result.returncode}): {result.stderr}"
        found = re.search(r"array job (\d+) .*combine job (\d+)", result.stdout)
        assert found, result.stdout
        array, combine = found.groups()
        return array, combine, wait_for_jobs(array, combine)

    out = tmp_path / "out"
    array, combine, jobs = submit()
    logs = job_outputs(out / "slurm_logs")
    tasks = [jobs[f"{array}_{k}"] for k in (1, 2, 3)]
    assert sorted(tasks) == [("COMPLETED", 0), ("COMPLETED", 0), ("FAILED", 1)], f"{jobs}\n{logs}"
    assert jobs[combine][0] == "CANCELLED", f"combine must not run after a failed shard: {jobs}"
    assert not (out / "combined_metadata.h5").exists()
    shard_logs = [p.read_text() for p in sorted(out.glob("processing_shard*of3.log"))]
    assert len(shard_logs) == 3, sorted(out.iterdir())
    assert any("ERROR" in text and "subject_2" in text for text in shard_logs), "no shard log names subject_2"
    done = {s: (out / s / "preaugmented_grids_coo.h5").stat().st_mtime_ns for s in ("subject_1", "subject_3")}

    broken.write_bytes(intact)  # the fix; then the very same command again
    array, combine, jobs = submit()
    logs = job_outputs(out / "slurm_logs")
    assert all(job == ("COMPLETED", 0) for job in jobs.values()), f"{jobs}\n{logs}"
    for subject, mtime in done.items():  # finished subjects were skipped, not rewritten
        assert (out / subject / "preaugmented_grids_coo.h5").stat().st_mtime_ns == mtime, subject
    assert_same_grids(out, plain_run)
    assert_combined_lists_all(out)
