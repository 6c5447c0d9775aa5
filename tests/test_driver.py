"""The driver as a scheduler uses it: resume, shards, locks, signals, dead workers, full disks,
exit codes, progress without a terminal (issue 7)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import h5py
import numpy as np
import psutil
import pytest
from conftest import OFFLINE_BUILTIN, SAMPLE_DIR, SCRIPT, run_cli, same_datasets

import unified_spike_processing_coo as usp

COMPARED = ("spike_coords", "is_train", "timepoint_indices", "timepoint_offsets")


def copy_sample(tmp_path, names=("subject_1", "subject_2")):
    data = tmp_path / "data"
    for name in names:
        shutil.copytree(SAMPLE_DIR / name, data / name)
    return data


def snapshot(out):
    """{relative path: (size, mtime_ns)} of every file under out except logs."""
    return {
        str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in out.rglob("*")
        if p.is_file() and not p.name.endswith(".log")
    }


def same_grids(a, b, subject):
    for key in COMPARED:
        with h5py.File(a / subject / usp.COO_FILENAME) as fa, h5py.File(b / subject / usp.COO_FILENAME) as fb:
            np.testing.assert_array_equal(fa[key][()], fb[key][()], err_msg=f"{subject} {key}")


def make_big_subject(folder, num_cells=24000, num_frames=600, seed=0):
    """A generic-layout subject whose inference takes several seconds (to act on a run in flight)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with h5py.File(folder / "traces.h5", "w") as h5:
        h5["traces"] = (
            rng.normal(0, 0.05, (num_cells, num_frames)) + (rng.random((num_cells, num_frames)) > 0.98)
        ).astype(np.float32)
        h5["positions"] = rng.random((num_cells, 3)) * [100, 50, 1] + [0, 0, 0]
        h5["positions"][:, 2] = rng.integers(0, 5, num_cells)
        h5.attrs["frame_rate_hz"] = 2.0
        h5.attrs["trace_type"] = "dff"


def start_cli(*args, log_path):
    handle = open(log_path, "w")
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args)], stdout=handle, stderr=subprocess.STDOUT, text=True
    )


def wait_for_line(path, text, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}:\n{path.read_text() if path.exists() else ''}")


# --- resume ------------------------------------------------------------------------------------


def test_rerun_skips_up_to_date_and_leaves_files_untouched(tmp_path):
    data, out = copy_sample(tmp_path), tmp_path / "out"
    run_cli("--input_dir", data, "--output_dir", out, *OFFLINE_BUILTIN)
    before = snapshot(out)
    second = run_cli("--input_dir", data, "--output_dir", out, *OFFLINE_BUILTIN, "--workers", 2, "--batch_size", 100)
    assert second.stderr.count("outputs up to date") == 2
    assert "CASCADE in" not in second.stderr
    after = snapshot(out)
    for name, stat in before.items():
        if name != usp.COMBINED_FILENAME:
            assert after[name] == stat, f"{name} was rewritten"
    assert "2 done (2 already up to date)" in second.stderr


def test_changed_parameter_or_input_recomputes_and_says_why(tmp_path):
    data, out = copy_sample(tmp_path), tmp_path / "out"
    run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *OFFLINE_BUILTIN)
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    changed = run_cli("--input_dir", data, "--output_dir", out, "--no_plots", "--seed", 7, *OFFLINE_BUILTIN)
    assert changed.stderr.count("parameters changed (--seed)") == 2
    with (
        h5py.File(out / "subject_1" / usp.COO_FILENAME) as new,
        h5py.File(reference / "subject_1" / usp.COO_FILENAME) as old,
    ):
        assert not np.array_equal(new["spike_coords"][()], old["spike_coords"][()])
    os.utime(data / "subject_2" / "TimeSeries.h5")  # touched: counts as changed input
    touched = run_cli("--input_dir", data, "--output_dir", out, "--no_plots", "--seed", 7, *OFFLINE_BUILTIN)
    assert "subject_2: computing (input files changed (TimeSeries.h5))" in touched.stderr
    assert "subject_1: outputs up to date" in touched.stderr
    forced = run_cli(
        "--input_dir", data, "--output_dir", out, "--no_plots", "--seed", 42, "--overwrite", *OFFLINE_BUILTIN
    )
    assert forced.stderr.count("computing (--overwrite)") == 2
    for subject in ("subject_1", "subject_2"):
        same_grids(out, reference, subject)


def test_plots_switched_on_later_recomputes_and_no_stale_pdf(tmp_path):
    data, out = copy_sample(tmp_path, ("subject_2",)), tmp_path / "out"
    run_cli("--input_dir", data, "--output_dir", out, *OFFLINE_BUILTIN)
    assert (out / "subject_2" / "subject_2_visualization.pdf").is_file()
    run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *OFFLINE_BUILTIN)
    assert not (out / "subject_2" / "subject_2_visualization.pdf").exists(), "a PDF from another run stayed"


# --- shards and combine ------------------------------------------------------------------------


def test_select_shard_partitions_and_balances_by_size(tmp_path):
    folders = []
    for i, cells in enumerate([100, 900, 300, 300, 50], start=1):
        folder = tmp_path / f"subject_{i}"
        folder.mkdir()
        with h5py.File(folder / "traces.h5", "w") as h5:
            h5.create_dataset("traces", shape=(cells, 10), dtype=np.float32)
        folders.append(folder)
    parts = [usp.select_shard(folders, (k, 3)) for k in (1, 2, 3)]
    assert sorted(f.name for part in parts for f in part) == sorted(f.name for f in folders)
    assert [f.name for f in parts[0]] == ["subject_2"]  # the largest alone
    assert usp.select_shard(folders, None) == folders
    assert parts == [usp.select_shard(folders, (k, 3)) for k in (1, 2, 3)], "deterministic"


def test_shard_from_slurm_array_variables():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert usp.resolve_shard(None, env) == (3, 4)
    assert usp.resolve_shard((1, 2), env) == (1, 2)
    assert usp.resolve_shard(None, {}) is None


def test_shards_then_combine_equal_one_plain_run(tmp_path):
    data = copy_sample(tmp_path, ("subject_1", "subject_2", "subject_3"))
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    run_cli("--input_dir", data, "--output_dir", plain, "--no_plots", *OFFLINE_BUILTIN)
    for k in (1, 2):
        env = {"SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
        result = run_cli("--input_dir", data, "--output_dir", sharded, "--no_plots", *OFFLINE_BUILTIN, env=env)
        assert f"(shard {k}/2)" in result.stderr
        assert (sharded / f"processing_shard{k}of2.log").is_file()
    assert not (sharded / usp.COMBINED_FILENAME).exists(), "shards must not race on the combined file"
    run_cli("--input_dir", data, "--output_dir", sharded, "--no_plots", *OFFLINE_BUILTIN, "--combine_only")
    for subject in ("subject_1", "subject_2", "subject_3"):
        same_grids(plain, sharded, subject)
    with h5py.File(sharded / usp.COMBINED_FILENAME) as combined:
        assert set(combined) == {"subject_1", "subject_2", "subject_3"}


def test_combined_leaves_out_subjects_made_with_other_parameters(tmp_path):
    data, out = copy_sample(tmp_path), tmp_path / "out"
    run_cli(
        "--input_dir", data, "--output_dir", out, "--no_plots", "--subjects", "subject_1", "--seed", 3, *OFFLINE_BUILTIN
    )
    result = run_cli(
        "--input_dir", data, "--output_dir", out, "--no_plots", "--subjects", "subject_2", *OFFLINE_BUILTIN
    )
    assert "leaves out subject_1 (other parameters: --seed)" in result.stderr
    with h5py.File(out / usp.COMBINED_FILENAME) as combined:
        assert set(combined) == {"subject_2"}
        assert "subject_1" in combined.attrs["excluded"]


# --- locks and leftovers of dead runs --------------------------------------------------------------


def test_live_lock_skips_subject_and_stale_leftovers_are_cleaned(tmp_path):
    data, out = copy_sample(tmp_path), tmp_path / "out"
    locks = out / usp.LOCK_DIRNAME
    locks.mkdir(parents=True)
    host = socket.gethostname()
    live = {"host": host, "pid": os.getpid(), "run_id": "test-run", "started_utc": "now"}
    (locks / "subject_1.lock").write_text(usp.json.dumps(live))
    dead_pid = 2**22 + 12345  # above pid_max: never alive
    (locks / "subject_2.lock").write_text(usp.json.dumps(dict(live, pid=dead_pid)))
    (out / "subject_2").mkdir()
    leftover = out / "subject_2" / f".metadata.h5.tmp-{host}-{dead_pid}-0123abcd"
    leftover.write_bytes(b"half a file")
    result = run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *OFFLINE_BUILTIN, check=False)
    assert result.returncode == 1
    assert "subject_1: skipped, locked by run test-run" in result.stderr
    assert not leftover.exists() and (out / "subject_2" / usp.COO_FILENAME).is_file()
    assert (locks / "subject_1.lock").exists(), "another run's live lock must stay"
    assert not (locks / "subject_2.lock").exists()


def test_two_concurrent_runs_with_different_seeds_never_mix_files(tmp_path):
    data = copy_sample(tmp_path, ("subject_1", "subject_2", "subject_3"))
    make_big_subject(data / "subject_4", num_cells=6000)
    out = tmp_path / "out"
    args = ("--input_dir", data, "--output_dir", out, *OFFLINE_BUILTIN)
    first = start_cli(*args, "--seed", 1, log_path=tmp_path / "a.txt")
    second = start_cli(*args, "--seed", 2, log_path=tmp_path / "b.txt")
    codes = (first.wait(timeout=600), second.wait(timeout=600))
    assert set(codes) <= {0, 1}, codes
    for subject in ("subject_1", "subject_2", "subject_3", "subject_4"):
        coo, meta = (usp.read_attrs(out / subject / name) for name in (usp.COO_FILENAME, usp.METADATA_FILENAME))
        assert coo["run_id"] == meta["run_id"] and coo["param_seed"] == meta["param_seed"], subject
    assert not list(out.rglob("*.lock")) and not list(out.rglob(f"*{usp.TEMPORARY_MARKER}*"))
    with h5py.File(out / usp.COMBINED_FILENAME) as combined:
        seeds = {int(combined[s].attrs["param_seed"]) for s in combined}
        assert len(seeds) == 1, "combined_metadata.h5 mixes parameters"


# --- faults: dead worker, SIGTERM, full disk -------------------------------------------------------


def test_killed_worker_fails_its_subject_and_the_run_goes_on(tmp_path):
    data = copy_sample(tmp_path, ("subject_2",))
    make_big_subject(data / "subject_1")
    out, log = tmp_path / "out", tmp_path / "run.txt"
    process = start_cli(
        "--input_dir", data, "--output_dir", out, "--workers", 2, "--no_plots", *OFFLINE_BUILTIN, log_path=log
    )
    wait_for_line(log, "subject_1: computing")
    time.sleep(3)
    children = psutil.Process(process.pid).children(recursive=True)
    # forked by the fork server (grandchildren), or spawned (children running spawn_main)
    workers = [p for p in children if p.ppid() != process.pid or "spawn_main" in " ".join(p.cmdline())]
    assert workers, "no worker processes found"
    workers[-1].kill()
    assert process.wait(timeout=300) == 1
    text = log.read_text()
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "subject_1" in errors[0] and "killed by SIGKILL" in errors[0], errors
    assert "--workers" in errors[0] and "Traceback" not in text
    assert (out / "subject_2" / usp.COO_FILENAME).is_file(), "the next subject must run on a rebuilt pool"


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_cleanly_and_rerun_resumes(tmp_path, signum, code):
    data = copy_sample(tmp_path, ("subject_1",))
    make_big_subject(data / "subject_2")
    out, log = tmp_path / "out", tmp_path / "run.txt"
    args = ("--input_dir", data, "--output_dir", out, "--workers", 2, "--no_plots", *OFFLINE_BUILTIN)
    process = start_cli(*args, log_path=log)
    wait_for_line(log, "subject_2: computing")
    time.sleep(2)
    process.send_signal(signum)
    assert process.wait(timeout=60) == code
    text = log.read_text()
    assert f"interrupted by {signal.Signals(signum).name}: finished subject_1; not finished: subject_2" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert not list(out.rglob(f"*{usp.TEMPORARY_MARKER}*")) and not list(out.rglob("*.lock"))
    assert not (out / "subject_2" / usp.METADATA_FILENAME).exists()
    resumed = run_cli(*args)
    assert "subject_1: outputs up to date" in resumed.stderr and "subject_2: computing" in resumed.stderr


@pytest.fixture
def small_filesystem(tmp_path):
    # room for the first sample subject's files (about 3.5 MB with cell_activity.h5 and the COO file's spike_zxy, and
    # 1.2 MB more while it runs: the scratch of its rates) but not for the second's too (2.9 MB more, and its 1 MB of
    # scratch)
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5600k", "tmpfs", str(mount_point)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_stops_cleanly_keeping_earlier_outputs(tmp_path, small_filesystem):
    data = copy_sample(tmp_path, ("subject_1", "subject_2", "subject_3"))
    out = small_filesystem / "out"
    result = run_cli(
        "--input_dir", data, "--output_dir", out, "--log_file", tmp_path / "run.log", *OFFLINE_BUILTIN, check=False
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no space left on device" in errors[0], errors
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert "NOT PROCESSED" in result.stderr or "subject_3" in errors[0]
    assert not list(out.rglob(f"*{usp.TEMPORARY_MARKER}*"))
    finished = [s for s in ("subject_1", "subject_2", "subject_3") if (out / s / usp.METADATA_FILENAME).exists()]
    assert finished, "the first subject fits and must be kept"
    for subject in finished:
        assert (
            usp.read_attrs(out / subject / usp.COO_FILENAME)["run_id"]
            == usp.read_attrs(out / subject / usp.METADATA_FILENAME)["run_id"]
        )


# --- command line, exit codes, progress -----------------------------------------------------------


def test_rejected_command_line_creates_nothing(tmp_path):
    out = tmp_path / "never"
    result = run_cli("--input_dir", SAMPLE_DIR, "--output_dir", out, "--workers", 0, check=False)
    assert result.returncode == 2 and "--workers" in result.stderr and not out.exists()
    result = run_cli("--input_dir", SAMPLE_DIR, "--output_dir", out, "--shard", "3/2", check=False)
    assert result.returncode == 2 and not out.exists()


def test_unwritable_output_or_log_is_exit_2_without_traceback(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli("--input_dir", SAMPLE_DIR, "--output_dir", blocker / "out", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_cli(
        "--input_dir", SAMPLE_DIR, "--output_dir", tmp_path / "out", "--log_file", blocker / "x.log", check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_progress_lines_when_not_on_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(usp, "PROGRESS_LOG_INTERVAL_S", 0.0)
    progress = usp.Progress("subject_9", num_batches=4, num_frames=1000, workers=2)
    batch = SimpleNamespace(num_cells=100, seconds=600.0)  # a batch result: its cells and its worker's time
    with caplog.at_level("INFO", logger="spike_grids"):
        for _ in range(4):
            progress.advance(batch)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("subject_9: CASCADE" in line and "neuron-frames/s" in line for line in lines)
    assert "1/4 batches" in lines[0] and "RSS" in lines[0]
    # 4 batches of 10 min, 2 at a time, take 20 min in all: time left counts them side by side, not one by one
    assert "about 20 min left" in lines[0]


def test_help_shows_true_defaults():
    text = " ".join(run_cli("--help").stdout.split())
    assert "(default: True)" not in text and "(default: None)" not in text
    assert "(default: 256 128)" in text and "(default: 30000)" in text and "--shard K/N" in text
    assert "130" in text and "143" in text


# --- CASCADE's results saved once: re-gridding without CASCADE (issue 9) -----------------------


def test_grid_parameters_regrid_saved_cascade_results_equal_to_a_full_run(tmp_path):
    data, out, full = copy_sample(tmp_path, ("subject_2",)), tmp_path / "out", tmp_path / "full"
    run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *OFFLINE_BUILTIN)
    changed = ("--grid_shape", 128, 64, "--no_z_markers", "--keep_edge_frames", "--split_block", 100)
    regrid = run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *changed, *OFFLINE_BUILTIN)
    assert "re-gridding CASCADE's saved results" in regrid.stderr and "CASCADE in" not in regrid.stderr
    run_cli("--input_dir", data, "--output_dir", full, "--no_plots", *changed, *OFFLINE_BUILTIN)
    same_grids(out, full, "subject_2")
    for name in (usp.CELL_ACTIVITY_FILENAME, usp.METADATA_FILENAME):  # the re-gridded file equals a full run's
        same_datasets(out / "subject_2" / name, full / "subject_2" / name)
    with h5py.File(out / "subject_2" / usp.CELL_ACTIVITY_FILENAME) as saved:
        offsets, frames = saved["cascade/cell_offsets"][()], saved["cascade/spike_frames"][()]
        rates = saved["spike_rates"][()]
    with h5py.File(full / "subject_2" / usp.METADATA_FILENAME) as meta:
        np.testing.assert_array_equal(np.diff(offsets), meta["cells/spike_count"][()])
    assert rates.dtype == np.float16 and rates.shape[1] == len(offsets) - 1
    assert np.all(frames[offsets[0] : offsets[1]][:-1] <= frames[offsets[0] : offsets[1]][1:])
    # a CASCADE parameter (the threshold) must run CASCADE again
    rerun = run_cli(
        "--input_dir", data, "--output_dir", out, "--no_plots", *changed, "--cascade_threshold", 0, *OFFLINE_BUILTIN
    )
    assert "CASCADE in" in rerun.stderr and "re-gridding" not in rerun.stderr


def test_worker_that_dies_while_the_pool_is_idle_does_not_hang_the_end_of_the_run(tmp_path):
    """The others ignore SIGTERM, so the executor's own shutdown would wait for them forever."""
    script = tmp_path / "idle_death.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(usp.REPO_DIR)!r})\n"
        "import unified_spike_processing_coo as usp\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "if __name__ == '__main__':\n"
        "    pool = usp.WorkerPool(2)\n"
        "    pool._executor = ProcessPoolExecutor(2, mp_context=usp._worker_context(), initializer=usp._init_worker,\n"
        "                                         initargs=(30,))\n"
        "    [f.result() for f in [pool._executor.submit(os.getpid) for _ in range(8)]]\n"
        "    next(iter(pool._executor._processes.values())).kill()\n"
        "    time.sleep(1)\n"
        "    pool.close()\n"
        "    print('closed')\n"
    )
    env = {**os.environ, usp.PRELOAD_TENSORFLOW_ENV: "0"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and "closed" in result.stdout, result.stderr[-2000:]


def test_a_large_file_written_in_place_fails_once_on_a_full_disk(small_filesystem, capfd):
    """cell_activity.h5 is too large to build in memory for a whole fish: written through h5py in place, a full disk
    is still one plain OSError after HDF5 let go of the file, and HDF5 prints nothing at garbage collection."""
    import errno
    import gc

    path = small_filesystem / "big.h5"
    with pytest.raises(OSError) as failed:
        with usp.new_h5_file(path, in_memory=False) as h5:
            h5.create_dataset("rates", data=np.ones((4000, 1000), np.float16), chunks=(16, 1000))
    assert failed.value.errno == errno.ENOSPC
    gc.collect()
    assert "Exception ignored" not in capfd.readouterr().err
