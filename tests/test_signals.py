"""SIGTERM and SIGINT at any moment of a run (issue 27), sent as SLURM does (to the whole process group) or to the
main process only: one ERROR line naming the signal and the subjects finished and not, exit 143 / 130, no
traceback, every process of the run gone (workers, fork server, resource tracker), no temporaries or locks left,
and a rerun that finishes with outputs equal to an uninterrupted run's."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
from conftest import OFFLINE_BUILTIN, REPO_DIR, SAMPLE_DIR, SCRIPT, run_cli, same_datasets

import unified_spike_processing_coo as usp

SUBJECTS = ("subject_1", "subject_2")
FAST = ("--no_plots", "--engine", "numpy", *OFFLINE_BUILTIN)  # no TensorFlow start-up where the moment needs none
# attributes that differ between two runs making the same outputs: who and when, how long, how many workers, where
# (coo_file_bytes: the file holds run_id, whose length follows the PID's)
RUN_ATTRS = ("run_id", "created_utc", "timings", "param_output_dir", "param_workers", "coo_file_bytes")
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal masks from /proc")
STOP_LINE = re.compile(r"interrupted by (SIGTERM|SIGINT): finished (.+); not finished: (.+)$")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signals") / "data"
    for name in SUBJECTS:
        shutil.copytree(SAMPLE_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def reference(data):
    out = data.parent / "reference"
    run_cli("--input_dir", data, "--output_dir", out, "--workers", 1, *FAST)
    return out


# --- moments: each waits (polling the process, its log and its output folder) until the run is there ------------


def poll(found, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := found():
            return result
        time.sleep(0.01)
    raise AssertionError(f"the run never reached {what}")


def signals_taken(run) -> bool:
    """The script's first lines ran: SIGTERM is blocked (imports) or caught (main's handler)."""
    status = Path(f"/proc/{run.process.pid}/status").read_text()
    masks = dict(line.split(":\t") for line in status.splitlines() if line.startswith(("SigBlk", "SigCgt")))
    return any(int(masks[key], 16) >> (signal.SIGTERM - 1) & 1 for key in masks)


def started(seconds: float = 0.0):
    """``seconds`` after the script's first line (the interpreter's own start-up comes before it)."""

    def wait(run):
        poll(lambda: signals_taken(run), "its first line")
        time.sleep(seconds)

    return wait


def logged(text: str):
    return lambda run: poll(lambda: text in run.stderr.read_text(), repr(text))


def appears(pattern: str):
    return lambda run: poll(lambda: list(run.out.glob(pattern)), pattern)


def workers_busy(run):
    logged("subject_1: computing")(run)
    main = psutil.Process(run.process.pid)
    # forked by the fork server: the main process's grandchildren
    poll(lambda: len([p for p in main.children(recursive=True) if p.ppid() != main.pid]) >= 2, "two workers")
    time.sleep(0.3)


NONE, FIRST, BOTH = (), ("subject_1",), SUBJECTS
TMP = f".*{usp.TEMPORARY_MARKER}*"
# (name, moment, --workers, signal, whole group?, the subjects that may be reported finished)
MOMENTS = [
    ("first-line", started(), 2, signal.SIGTERM, True, [NONE]),
    ("imports-0.05s", started(0.05), 1, signal.SIGINT, False, [NONE]),
    ("imports-0.3s", started(0.3), 2, signal.SIGTERM, False, [NONE]),
    ("start-up-1s", started(1.0), 2, signal.SIGINT, True, [NONE]),
    ("fork-server-starting", logged("CASCADE engine:"), 2, signal.SIGTERM, True, [NONE]),
    ("reading", logged("subject_1: computing"), 1, signal.SIGTERM, True, [NONE]),
    ("cascade-workers", workers_busy, 2, signal.SIGTERM, True, [NONE]),
    ("cascade-one-process", logged("subject_1: traces treated as"), 1, signal.SIGINT, False, [NONE]),
    ("writing-temporary", appears(f"subject_1/{TMP}"), 2, signal.SIGTERM, True, [NONE, FIRST]),
    ("writing-temporary-pid", appears(f"subject_1/{TMP}"), 1, signal.SIGINT, False, [NONE, FIRST]),
    ("files-just-appeared", appears(f"subject_1/{usp.METADATA_FILENAME}"), 1, signal.SIGTERM, True, [FIRST]),
    ("between-subjects", logged("subject_2: 500 cells"), 2, signal.SIGINT, True, [FIRST]),
    ("second-written-combine", appears(f"subject_2/{usp.METADATA_FILENAME}"), 2, signal.SIGTERM, False, [BOTH]),
    ("summary", logged("Summary:"), 1, signal.SIGTERM, True, [BOTH]),
]


class Run:
    def __init__(self, data: Path, out: Path, workers: int, *extra):
        self.out, self.stderr = out, out.parent / f"{out.name}.stderr"
        self.args = ("--input_dir", data, "--output_dir", out, "--workers", workers, *extra)
        with open(self.stderr, "w") as handle:
            self.process = subprocess.Popen(
                [sys.executable, str(SCRIPT), *map(str, self.args)],
                stdout=subprocess.DEVNULL,
                stderr=handle,
                cwd=REPO_DIR,
                start_new_session=True,  # as a batch job: its own process group and session
            )

    def send(self, signum: int, group: bool) -> None:
        (os.killpg if group else os.kill)(self.process.pid, signum)

    def session(self) -> list:
        """The live processes of the run's session (its workers, fork server and resource tracker included)."""
        alive = []
        for process in psutil.process_iter(["status", "cmdline"]):
            with contextlib.suppress(OSError, psutil.Error):
                if os.getsid(process.pid) == self.process.pid and process.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(process.info["cmdline"])
        return alive


def attrs_of(path: Path) -> dict:
    """Every attribute of every object in an HDF5 file, but those of RUN_ATTRS and timings (*_s)."""
    found = {}

    def collect(name, node):
        for key, value in node.attrs.items():
            if key not in RUN_ATTRS and not key.endswith("_s"):
                found[f"{name}@{key}"] = value

    with h5py.File(path, "r") as h5:
        collect("/", h5)
        h5.visititems(collect)
    return found


def same_outputs(a: Path, b: Path) -> None:
    files = lambda out: sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and p.suffix != ".log" and ".locks" not in p.parts
    )
    assert files(a) == files(b)
    for name in files(a):
        same_datasets(a / name, b / name)
        left, right = attrs_of(a / name), attrs_of(b / name)
        assert sorted(left) == sorted(right), name
        for key, value in left.items():
            np.testing.assert_array_equal(value, right[key], err_msg=f"{name} {key}")


@pytest.mark.parametrize(
    "moment, workers, signum, group, may_finish", [m[1:] for m in MOMENTS], ids=[m[0] for m in MOMENTS]
)
def test_signal_at_any_moment_stops_cleanly_and_rerun_completes(
    data, reference, tmp_path, moment, workers, signum, group, may_finish
):
    run = Run(data, tmp_path / "out", workers, *FAST)
    moment(run)
    run.send(signum, group)
    code = run.process.wait(timeout=60)
    stderr = run.stderr.read_text()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    if code == 0:  # the signal came after the run had ended (its summary written): it changes nothing
        assert may_finish == [BOTH] and not errors and "combined_metadata.h5: 2 subjects" in stderr, stderr
    else:
        assert code == 128 + signum, stderr
        assert len(errors) == 1, stderr
        stop = STOP_LINE.search(errors[0])
        assert stop and stop[1] == signal.Signals(signum).name, errors
        finished = () if stop[2] == "none" else tuple(stop[2].split(", "))
        assert finished in may_finish, errors
        assert finished == tuple(n for n in SUBJECTS if (run.out / n / usp.METADATA_FILENAME).exists()), errors
        assert stop[3] == (", ".join(n for n in SUBJECTS if n not in finished) or "none"), errors
    # every process of the run gone within seconds
    deadline = time.monotonic() + 10
    while (alive := run.session()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"left running: {alive}"
    if run.out.exists():
        assert not list(run.out.rglob(f"*{usp.TEMPORARY_MARKER}*")), "temporaries left"
        assert not list(run.out.rglob("*.lock")), "lock files left"
    run_cli(*run.args)
    same_outputs(reference, run.out)


def test_signal_while_the_fork_server_imports_tensorflow(data, reference, tmp_path):
    """The fork server and the resource tracker never see the group's Ctrl-C (no KeyboardInterrupt traceback
    from their imports); the main process ends the fork server at once."""
    run = Run(data, tmp_path / "out", 2, "--no_plots", *OFFLINE_BUILTIN, "--engine", "tensorflow")
    logged("CASCADE engine:")(run)
    time.sleep(0.5)
    run.send(signal.SIGINT, True)
    assert run.process.wait(timeout=60) == 130
    stderr = run.stderr.read_text()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted by SIGINT: finished none; not finished: subject_1, subject_2" in stderr
    deadline = time.monotonic() + 10
    while (alive := run.session()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"left running: {alive}"
