"""Shared fixtures: the repository root, ../shared (real CASCADE material) and quiet TensorFlow."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))


def shared_dir() -> Path:
    return Path(os.environ.get("SPIKE_SHARED_DIR", REPO_DIR.parent / "shared"))


@pytest.fixture(scope="session")
def shared_cascade() -> Path:
    """../shared/cascade, or skip: it exists in CI and on developer machines, not for users."""
    folder = shared_dir() / "cascade"
    if not folder.is_dir():
        pytest.skip(f"real CASCADE material not found at {folder} (set SPIKE_SHARED_DIR)")
    return folder


@pytest.fixture(scope="session")
def official_model(shared_cascade):
    import unified_spike_processing_coo as usp

    return usp.read_model_folder(shared_cascade / "Pretrained_models" / "OGB_zf_pDp_7.5Hz_smoothing200ms")


SAMPLE_DIR = REPO_DIR / "sample_data"
SCRIPT = REPO_DIR / "unified_spike_processing_coo.py"
OFFLINE_BUILTIN = ("--cascade_model", "builtin", "--offline")


def run_cli(*args, check: bool = True, timeout: float = 600, env: dict | None = None):
    """Run the pipeline's command line in a subprocess (as a user or a scheduler does)."""
    import subprocess

    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_DIR,
        env=None if env is None else {**os.environ, **env},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-4000:]}")
    return result


# --- Chen-layout fish with stimulus and behaviour, written as the real files hold them ----------------------------
CHEN_CONDITIONS = (("Spontaneous", 100, 1), ("PT", 30, 3), ("OMR", 25, 4))  # name, period (frames), repetitions


def chen_fish_fields(num_frames: int = 320, conditions=CHEN_CONDITIONS, seed: int = 0) -> dict:
    """data_full.mat's stimulus and behaviour fields for a fish of ``num_frames`` frames: the conditions one after
    the other from frame 1 (a few frames in no list between them), stim_full codes per condition, stimset,
    Behavior_full (5 x T) and Eye_full (2 x T)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    timelists, stim, start = [], np.zeros(num_frames), 0
    for index, (_, period, repetitions) in enumerate(conditions):
        frames = np.arange(start, start + period * repetitions)
        stim[frames] = 3 + index * 2 + (np.arange(len(frames)) % period >= period // 2)
        timelists.append(frames + 1.0)  # 1-based
        start += period * repetitions + 4
    assert start - 4 <= num_frames, "the conditions need more frames"
    return {
        "stim_full": stim,
        "timelists": timelists,
        "timelists_names": [name for name, _, _ in conditions],
        "periods": np.array([float(period) for _, period, _ in conditions]),
        "stimset": [(name, np.array([3.0 + i * 2, 4.0 + i * 2])) for i, (name, _, _) in enumerate(conditions)],
        "Behavior_full": rng.normal(0, 1, (5, num_frames)),
        "Eye_full": rng.normal(0, 1, (2, num_frames)),
    }


def write_chen_fish(folder, positions_norm, num_frames: int = 320, fields: dict | None = None, v73: bool = False,
                    seed: int = 0, fpsec: float = 2.0):  # fmt: skip
    """A fish in the Chen 2018 layout: TimeSeries.h5 (CellResp (T, N) dF/F-like, absIX) and data_full.mat
    (MATLAB v5 by scipy, or v7.3 as MATLAB writes it) with CellXYZ, CellXYZ_norm (the given registered
    positions), fpsec and ``fields`` (chen_fish_fields() by default; a value None leaves the field out)."""
    from pathlib import Path

    import h5py
    import numpy as np

    folder, rng = Path(folder), np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    positions_norm = np.asarray(positions_norm, dtype=float)
    num_cells = len(positions_norm)
    traces = rng.gamma(0.3, 0.2, (num_frames, num_cells)).astype(np.float32)
    with h5py.File(folder / "TimeSeries.h5", "w") as h5:
        h5["CellResp"] = traces
        h5["absIX"] = np.arange(1, num_cells + 1, dtype=float)[None, :]
    raw = np.column_stack(
        [rng.uniform(1, 800, num_cells), rng.uniform(1, 400, num_cells), np.arange(num_cells) % 5 + 1]
    )
    data = {"CellXYZ": raw, "CellXYZ_norm": positions_norm, "fpsec": fpsec}
    fields = chen_fish_fields(num_frames, seed=seed) if fields is None else fields
    data.update({key: value for key, value in fields.items() if value is not None})
    (write_mat_v73 if v73 else write_mat_v5)(folder / "data_full.mat", data)
    return folder


def write_mat_v5(path, data: dict) -> None:
    """data_full.mat as scipy writes MATLAB v5: lists become cell arrays (1 x n), stimset a struct array."""
    import numpy as np
    import scipy.io

    converted = {}
    for key, value in data.items():
        if key == "stimset":
            struct = np.zeros((1, len(value)), dtype=[("name", object), ("pattern", object)])
            for i, (name, pattern) in enumerate(value):
                struct[0, i] = (name, np.atleast_2d(pattern))
            converted[key] = struct
        elif isinstance(value, list):
            cell = np.empty((1, len(value)), dtype=object)
            for i, item in enumerate(value):
                cell[0, i] = item if isinstance(item, str) else np.atleast_2d(item)
            converted[key] = cell
        else:
            converted[key] = value
    scipy.io.savemat(path, {"data": converted}, do_compression=True)


def write_mat_v73(path, data: dict) -> None:
    """data_full.mat as MATLAB v7.3 writes it: HDF5 after a 512-byte header, matrices transposed, char as uint16
    codes, a cell array as a dataset of object references into #refs#, a struct array as a group whose fields are
    such cells."""
    import h5py
    import numpy as np

    with h5py.File(path, "w", userblock_size=512) as h5:
        refs, group = h5.create_group("#refs#"), h5.create_group("data")

        def put(parent, name, value):
            if isinstance(value, str):
                parent[name] = np.array([[ord(c)] for c in value], np.uint16)
                parent[name].attrs["MATLAB_class"] = np.bytes_(b"char")
            elif isinstance(value, list):  # a 1 x n cell: stored n x 1 (transposed)
                references = []
                for item in value:
                    put(refs, f"r{len(refs)}", item)
                    references.append(refs[f"r{len(refs) - 1}"].ref)
                parent.create_dataset(name, data=np.array(references, dtype=h5py.ref_dtype)[:, None])
                parent[name].attrs["MATLAB_class"] = np.bytes_(b"cell")
            else:
                parent[name] = np.atleast_2d(np.asarray(value, dtype=float)).T
                parent[name].attrs["MATLAB_class"] = np.bytes_(b"double")

        for key, value in data.items():
            if key == "stimset":
                struct = group.create_group(key)
                struct.attrs["MATLAB_class"] = np.bytes_(b"struct")
                for field, items in (
                    ("name", [n for n, _ in value]),
                    ("pattern", [np.atleast_2d(p) for _, p in value]),
                ):
                    put(struct, field, items)
                    del struct[field].attrs["MATLAB_class"]  # a struct array's fields are bare references
            else:
                put(group, key, value)
    with open(path, "r+b") as handle:
        handle.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")


def same_datasets(a, b, skip: tuple = ()) -> None:
    """Two HDF5 files hold the same datasets (names, dtypes, shapes, values; NaN equal to NaN), ``skip`` aside."""
    import h5py
    import numpy as np

    def datasets(h5):
        found = {}
        h5.visititems(lambda name, node: found.setdefault(name, node[()]) if isinstance(node, h5py.Dataset) else None)
        return {name: value for name, value in found.items() if name not in skip}

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        left, right = datasets(fa), datasets(fb)
    assert sorted(left) == sorted(right), f"{a} and {b} hold different datasets"
    for name, value in left.items():
        other = right[name]
        assert value.dtype == other.dtype and value.shape == other.shape, f"{name}: {value.dtype} {other.dtype}"
        np.testing.assert_array_equal(value, other, err_msg=f"{a} {name}")


VOLATILE_ATTRS = (
    "run_id",
    "created_utc",
    "timings",
    "object_id",
    "param_output_dir",
    "param_input_dir",
    "param_log_file",
)
# (the first three differ between any two runs, by design; the paths between runs in two folders)
VOLATILE_NWB_DATASETS = ("identifier", "session_start_time", "file_create_date", "timestamps_reference_time")


def same_outputs(a, b) -> None:
    """Two output folders hold the same files with the same datasets and attributes (values, dtypes, shapes),
    apart from what differs between any two runs (run ids, creation times, timings; a PDF's bytes)."""
    import h5py
    import numpy as np

    def files(folder):
        return sorted(p.relative_to(folder) for p in Path(folder).rglob("*") if p.is_file() and p.suffix != ".log")

    def attrs(node) -> dict:
        return {
            key: value
            for key, value in node.attrs.items()
            if key not in VOLATILE_ATTRS and not key.endswith("_s") and not isinstance(value, h5py.Reference)
        }

    def contents(path) -> dict:
        found = {}

        def visit(name, node):
            if isinstance(node, h5py.Dataset) and name.split("/")[-1] not in VOLATILE_NWB_DATASETS:
                value = node[()]
                if node.dtype.kind == "O" and node.dtype.metadata and "ref" in node.dtype.metadata:
                    value = None  # object references: their targets are compared by name
                found[name] = (value, node.dtype, attrs(node))
            elif isinstance(node, h5py.Group):
                found[name + "/"] = (None, None, attrs(node))

        with h5py.File(path, "r") as h5:
            h5.visititems(visit)
            found["/"] = (None, None, attrs(h5))
        return found

    assert files(a) == files(b), f"{a} and {b} hold different files"
    for relative in files(a):
        if relative.suffix not in (".h5", ".nwb"):
            continue
        left, right = contents(Path(a) / relative), contents(Path(b) / relative)
        assert sorted(left) == sorted(right), f"{relative}: different datasets or groups"
        for name, (value, dtype, node_attrs) in left.items():
            other, other_dtype, other_attrs = right[name]
            assert dtype == other_dtype, f"{relative} {name}: {dtype} != {other_dtype}"
            if value is not None or other is not None:
                np.testing.assert_array_equal(value, other, err_msg=f"{relative} {name}")
            assert sorted(node_attrs) == sorted(other_attrs), f"{relative} {name}: attributes differ"
            for key in node_attrs:
                if key == "fingerprint" or key == "cascade_fingerprint":
                    continue  # input files' modification times differ between copies of the inputs
                np.testing.assert_array_equal(node_attrs[key], other_attrs[key], err_msg=f"{relative} {name} {key}")
