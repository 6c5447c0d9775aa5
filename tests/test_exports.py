"""The outputs as their consumers read them, unchanged: the seed README's own API calls, the original script's
metadata layout, the seed project's grid loader (FastGridLoader) and per-neuron loader (NeuralDataset), torch_brain's
Dataset with a window sampler, and TensorStore with ZAPBench's split rule. The consumers' code is not copied here:
each test reads exactly what they read (names, kinds, dtypes, shapes, folder layout, scaling), and values are
compared with cell_activity.h5 (float16 -> float32) and the grid."""

import hashlib
import json
import os
import re
import types

import h5py
import numpy as np
import pytest
from conftest import run_cli, write_chen_fish

import unified_spike_processing_coo as usp

EXPORT_ARGS = ("--split", "zapbench", "--val_ratio", "0.1", "--holdout_condition", "PT", "--keep_edge_frames")
ALL_EXPORTS = "dense,gbm,torch_brain,zapbench"
ATLAS = (120, 90, 12)  # a small atlas frame (six grid planes) keeps the dense grids small


def _hashes(folder) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two Chen fish (the seed's folder names) run once without exports, then again adding every export: the
    second run must rerun no CASCADE and leave the finished files byte-identical."""
    root = tmp_path_factory.mktemp("exports")
    rng = np.random.default_rng(5)
    for name in ("subject_1", "subject_2"):
        registered = np.column_stack([rng.uniform(1, 120, 30), rng.uniform(1, 90, 30), rng.uniform(1, 12, 30)])
        write_chen_fish(root / "data" / name, registered, num_frames=320)
    out = root / "out"
    common = ("--input_dir", root / "data", "--output_dir", out, "--offline", "--no_plots", "--coordinates", "registered",
              "--atlas_shape", *map(str, ATLAS), "--z_planes", "6")  # fmt: skip
    first = run_cli(*common, *EXPORT_ARGS)
    before = {name: _hashes(out / name) for name in ("subject_1", "subject_2")}
    second = run_cli(*common, *EXPORT_ARGS, "--export", ALL_EXPORTS)
    return types.SimpleNamespace(out=out, common=common, first=first, second=second, before=before)


def _cell_activity(subject_dir) -> dict:
    with h5py.File(subject_dir / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        return {key: h5[key][()] for key in h5 if isinstance(h5[key], h5py.Dataset)} | {
            "rates": h5["spike_rates"][()].astype(np.float32)
        }


def test_adding_exports_reruns_no_cascade_and_keeps_the_files(run):
    log = run.second.stderr
    assert "CASCADE in" not in log and "computing" not in log
    assert log.count("outputs up to date") == 2 and log.count("(CASCADE not rerun)") == 8
    for name, hashes in run.before.items():
        now = _hashes(run.out / name)
        assert {path: now[path] for path in hashes} == hashes, "a finished file changed"
    # a changed export option redoes that export alone; the same options redo nothing
    exports = _hashes(run.out)
    third = run_cli(*run.common, *EXPORT_ARGS, "--export", ALL_EXPORTS, "--nwb_species", "Danio rerio")
    assert third.stderr.count("from the saved results") == 2 and "export torch_brain from" in third.stderr
    changed = {str(path) for path, digest in _hashes(run.out).items() if exports.get(path) != digest}
    assert changed <= {"torch_brain/subject_1.h5", "torch_brain/subject_2.h5", "combined_metadata.h5", "processing.log"}
    assert {"torch_brain/subject_1.h5", "torch_brain/subject_2.h5"} <= changed
    assert "up to date (" in run_cli(*run.common, *EXPORT_ARGS, "--export", "dense").stderr


def test_the_seed_readme_snippets_run_verbatim(run, monkeypatch):
    """The blocks of the seed project's README (Sam-Fatehmanesh/GBM, the unified_spike_processing_coo README:
    'Loading COO Data' and 'Option 1: Convert to Dense During Loading'), as written there, with its documented
    coo_to_dense_grid(spike_coords, spike_values, grid_shape) and load_coo_as_dense(filepath) from our module."""
    from unified_spike_processing_coo import coo_to_dense_grid, load_coo_as_dense

    monkeypatch.chdir(run.out)
    # --- README, "Loading COO Data" ---
    # Load COO sparse data
    with h5py.File("subject_1/preaugmented_grids_coo.h5", "r") as f:
        spike_coords = f["spike_coords"][:]  # (N_spikes, 4)
        spike_values = f["spike_values"][:]  # (N_spikes,)
        grid_shape = f["grid_shape"][:]  # (4,)
        is_train = f["is_train"][:]  # (T,)

        # Get sparsity info
        total_spikes = f.attrs["total_spikes"]
        sparsity_percent = f.attrs["sparsity_percent"]

        print(f"Total spikes: {total_spikes:,}")
        print(f"Sparsity: {sparsity_percent:.4f}%")
    # --- README, "Convert to Dense During Loading": the documented call ---
    dense = coo_to_dense_grid(spike_coords, spike_values, grid_shape)
    assert dense.shape == tuple(grid_shape) and dense.dtype == np.uint8 and int(dense.sum()) == total_spikes
    np.testing.assert_array_equal(load_coo_as_dense("subject_1/preaugmented_grids_coo.h5"), dense)
    assert len(is_train) == grid_shape[0]
    # the README's own loop-based coo_to_dense_grid gives the same grid
    reference = np.zeros(tuple(grid_shape), dtype=np.uint8)
    for i in range(len(spike_coords)):
        t, z, x, y = spike_coords[i]
        reference[t, z, x, y] = spike_values[i]
    np.testing.assert_array_equal(reference, dense)
    # 1.2's keyword call still works
    np.testing.assert_array_equal(coo_to_dense_grid(spike_coords, grid_shape=grid_shape), dense)


def test_the_original_metadata_layout(run):
    """What the original script's combine step reads from metadata.h5, and what its combined_metadata.h5 held."""
    subject = run.out / "subject_1"
    with h5py.File(subject / usp.METADATA_FILENAME, "r") as f:  # the original combine step's reads
        for key in ("num_timepoints", "num_z_planes"):
            assert f[key].shape == () and f[key].dtype == np.int64
        num_timepoints, num_z = f["num_timepoints"][()], f["num_z_planes"][()]
        assert len(f["z_values"][:]) == num_z and len(f["is_train"][:]) == num_timepoints
        assert f["train_timepoints"][:].tolist() == np.flatnonzero(f["is_train"][:] == 1).tolist()
        assert f.attrs["total_spikes"] > 0 and f.attrs["sparsity_percent"] > 0
        assert f["cells/cell_global_id"].dtype == np.int64
    with h5py.File(run.out / usp.COMBINED_FILENAME, "r") as f:
        for name in ("subject_1", "subject_2"):
            assert f[name]["total_spikes"][()] == f[name].attrs["total_spikes"]
            assert f[name]["num_z_planes"][()] == num_z
    with h5py.File(subject / usp.COO_FILENAME, "r") as f:
        assert f.attrs["sampling_rate"] == 2.0 and f.attrs["window_sec"] == 30.0 and f.attrs["percentile"] == 8.0
        split = f["split"][()]
        assert split.dtype == np.int8 and set(np.unique(split)) <= {-1, 0, 1, 2}
        np.testing.assert_array_equal(f["is_train"][()], (split == 0).astype(np.uint8))
        assert json.loads(f.attrs["split_codes"]) == usp.SPLIT_CODES


def test_ids_units_and_split_in_cell_activity(run):
    first, second = _cell_activity(run.out / "subject_1"), _cell_activity(run.out / "subject_2")
    np.testing.assert_array_equal(first["cell_ids"], second["cell_ids"])  # the cells' own ids collide across fish
    assert not set(first["cell_global_ids"]) & set(second["cell_global_ids"])
    assert len(set(first["cell_global_ids"])) == len(first["cell_ids"]) and first["cell_global_ids"].min() >= 0
    expected = [
        int.from_bytes(hashlib.blake2b(f"subject_1:{c}".encode(), digest_size=8).digest(), "little") & (2**63 - 1)
        for c in first["cell_ids"]
    ]  # groundwork's rule: stable across reruns
    assert first["cell_global_ids"].tolist() == expected
    with h5py.File(run.out / "subject_1" / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        assert h5["spike_rates"].attrs["unit"] == "expected spikes per timepoint"
        assert h5.attrs["timepoint_rate_hz"] == 2.0
        assert h5["split"].dtype == np.int8


def test_dense_export_is_what_the_seed_grid_loader_reads(run):
    """FastGridLoader (GenerativeBrainModel/datasets/fast_dali_spike_dataset.py): <dir>/<subject>/
    preaugmented_grids.h5 opened with libver='latest', swmr=True; attrs num_timepoints, num_z_planes; grids
    (T, Z, 256, 128) uint8 read one plane at a time; timepoint_indices (consecutive where continuous); is_train."""
    found = [
        os.path.join(run.out, d, "preaugmented_grids.h5")
        for d in os.listdir(run.out)
        if os.path.isdir(os.path.join(run.out, d)) and os.path.exists(os.path.join(run.out, d, "preaugmented_grids.h5"))
    ]
    assert sorted(os.path.basename(os.path.dirname(path)) for path in found) == ["subject_1", "subject_2"]
    for path in found:
        coo = usp.load_coo_as_dense(os.path.join(os.path.dirname(path), usp.COO_FILENAME))
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            num_timepoints, num_z = f.attrs["num_timepoints"], f.attrs["num_z_planes"]
            assert f["grids"].shape == (num_timepoints, num_z, 256, 128) and f["grids"].dtype == np.uint8
            for tp, z in ((0, 0), (num_timepoints - 1, num_z - 1), (num_timepoints // 2, 1)):
                np.testing.assert_array_equal(f["grids"][tp, z], coo[tp, z])
            np.testing.assert_array_equal(f["grids"][()], coo)
            indices, is_train = f["timepoint_indices"][:], f["is_train"][:]
            assert len(indices) == len(is_train) == num_timepoints and set(np.unique(is_train)) == {0, 1}
            assert np.all(np.diff(indices) == 1)


def test_gbm_export_is_what_the_successor_loader_reads(run):
    """NeuralDataset (GenerativeBrainModel/dataloaders/neural_dataloader.py): data_dir.glob('*.h5'), each with
    neuron_values (T, N), cell_positions (N, 3), num_neurons, neuron_global_ids int64, stimulus_full (T, K),
    log_activity_mean / log_activity_std (N,); the successor's own scaling and statistics."""
    files = sorted((run.out / usp.GBM_EXPORT_DIR).glob("*.h5"))
    assert [f.name for f in files] == ["subject_1.h5", "subject_2.h5"]
    assert sorted(p.name for p in (run.out / usp.GBM_EXPORT_DIR).iterdir()) == ["subject_1.h5", "subject_2.h5"]
    for path in files:
        activity = _cell_activity(run.out / path.stem)
        with h5py.File(path, "r") as f:
            values = f["neuron_values"][()]
            num_timepoints, num_cells = values.shape
            assert int(f["num_neurons"][()]) == num_cells == len(activity["cell_ids"])
            np.testing.assert_array_equal(values, np.nan_to_num(activity["rates"], nan=0.0))
            np.testing.assert_array_equal(f["neuron_values_valid"][()], np.isfinite(activity["rates"]))
            assert np.isnan(activity["rates"]).any(), "--keep_edge_frames: CASCADE's edges have no prediction"
            assert f["neuron_values"].attrs["unit"] == "expected spikes per timepoint"
            positions = f["cell_positions"][:]
            assert positions.shape == (num_cells, 3) and positions.min() >= 0 and positions.max() <= 1
            scaled = np.clip((activity["positions_registered"] - 1) / (np.array(ATLAS) - 1), 0, 1)  # the atlas frame
            np.testing.assert_allclose(positions, scaled, rtol=1e-6)
            ids = f["neuron_global_ids"][:]
            assert ids.dtype == np.int64 and ids.tolist() == activity["cell_global_ids"].tolist()
            stimulus = f["stimulus_full"][0:num_timepoints]
            assert stimulus.dtype == np.float32 and np.all(stimulus.sum(axis=1) == 1)
            # the successor's add_log_activity_stats: log(max(v, eps)) over time, std from E[x^2] - mean^2
            logs = np.log(np.maximum(values.astype(np.float32), 1e-7))
            np.testing.assert_allclose(f["log_activity_mean"][:], logs.mean(axis=0), rtol=1e-5)
            np.testing.assert_allclose(f["log_activity_std"][:], logs.std(axis=0), rtol=1e-3, atol=1e-4)
            assert f["behavior_full"].shape == (5, num_timepoints) and f["eye_full"].shape == (2, num_timepoints)


def test_torch_brain_dataset_samples_windows(run):
    """torch_brain's Dataset over the export's folder, windows drawn by its RandomFixedWindowSampler from each
    recording's train_domain: the values are cell_activity.h5's at those timepoints."""
    from torch_brain.datasets import Dataset
    from torch_brain.samplers import RandomFixedWindowSampler, SequentialFixedWindowSampler

    dataset = Dataset(run.out / usp.TORCH_BRAIN_EXPORT_DIR)
    assert dataset.recording_ids == ["subject_1", "subject_2"]
    domains = {rid: dataset.get_recording(rid).train_domain for rid in dataset.recording_ids}
    sampler = RandomFixedWindowSampler(sampling_intervals=domains, window_length=5.0, generator=None)
    indices = list(sampler)
    assert indices
    for index in indices[:6]:
        sample = dataset[index]
        activity = _cell_activity(run.out / index.recording_id)
        # the window holds the timepoints whose times (start + row / 2 Hz) fall in [start, end)
        rows = int(np.ceil(index.start * 2.0 - 1e-9)) + np.arange(len(sample.cascade_rates.rates))
        expected = np.nan_to_num(activity["rates"][rows], nan=0.0)
        np.testing.assert_array_equal(np.asarray(sample.cascade_rates.rates), expected)
        assert set(activity["split"][rows]) == {0}
    recording = dataset.get_recording("subject_1")
    activity = _cell_activity(run.out / "subject_1")
    assert recording.rois.id.astype(str).tolist() == [str(v) for v in activity["cell_global_ids"]]
    all_ids = np.concatenate([dataset.get_recording(r).rois.id for r in dataset.recording_ids])
    assert len(np.unique(all_ids)) == len(all_ids)
    assert recording.cascade_rates.sampling_rate == 2.0 and recording.rate_unit == "expected spikes per timepoint"
    for name, code in (("train_domain", 0), ("valid_domain", 1), ("test_domain", 2)):
        domain = getattr(recording, name)
        rows = np.zeros(len(activity["split"]), bool)
        for start, end in zip(domain.start, domain.end):
            rows[int(round(start * 2.0)) : int(round(end * 2.0))] = True
        np.testing.assert_array_equal(rows, activity["split"] == code)
    assert set(recording.stimulus_conditions.name.astype(str)) == {"Spontaneous", "PT", "OMR"}
    valid = SequentialFixedWindowSampler(sampling_intervals={"subject_1": recording.valid_domain}, window_length=1.0)
    assert len(list(valid)) > 0


def _zapbench_parts(constants, condition: int) -> dict:
    """ZAPBench's split rule in our words (its code is not a package: its PyPI name is an empty placeholder, and
    it is not copied here): within a condition's segment of condition_offsets, less condition_padding timepoints at
    each edge, n timepoints remain; the last int(n * test_fraction) are test, the int(n * val_fraction) before them
    validation, the rest, first, train (targets only: a window's context may reach back). A held-out condition's
    padded segment is all test."""
    first = constants["condition_offsets"][condition] + constants["condition_padding"]
    stop = constants["condition_offsets"][condition + 1] - constants["condition_padding"]
    size = stop - first
    val_start = stop - int(size * constants["test_fraction"]) - int(size * constants["val_fraction"])
    test_start = stop - int(size * constants["test_fraction"])
    if condition in constants["conditions_holdout"]:
        return {2: (first, stop)}
    return {0: (first, val_start), 1: (val_start, test_start), 2: (test_start, stop)}


def test_zapbench_export_opens_in_tensorstore_and_its_rule_gives_the_split(run):
    import tensorstore as ts

    folder = run.out / "subject_1" / usp.ZAPBENCH_EXPORT_DIR
    constants = json.loads((folder / usp.ZAPBENCH_JSON).read_text())
    activity = _cell_activity(run.out / "subject_1")
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder / "traces")}}
    traces = ts.open(spec).result()
    assert tuple(traces.domain.labels) == ("t", "f") and traces.dtype == ts.float32
    np.testing.assert_array_equal(traces.read().result(), activity["rates"])
    window = traces[ts.d["t"][10:20]].translate_to[0].read().result()  # as adjust_spec_for_condition_and_split slices
    np.testing.assert_array_equal(window, activity["rates"][10:20])
    attrs = json.loads((folder / "traces" / "zarr.json").read_text())["attributes"]
    assert attrs["unit"] == "expected spikes per timepoint"
    positions = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder / "positions")}}).result()
    assert positions.shape == (len(activity["cell_ids"]), 3)
    covariates = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder / "covariates")}}
    ).result()
    assert covariates.shape[0] == traces.shape[0] and tuple(covariates.domain.labels) == ("t", "k")
    # ZAPBench's rule with the JSON's values gives the run's split codes
    offsets = constants["condition_offsets"]
    assert offsets[0] == 0 and offsets[-1] == traces.shape[0] and len(constants["condition_names"]) == len(offsets) - 1
    rebuilt = np.full(traces.shape[0], -1, np.int8)
    for condition in range(len(offsets) - 1):
        for code, (low, high) in _zapbench_parts(constants, condition).items():
            rebuilt[low:high] = code
    np.testing.assert_array_equal(rebuilt, activity["split"])
    assert [constants["condition_names"][c] for c in constants["conditions_holdout"]] == ["PT"]
    assert (
        constants["val_fraction"] == 0.1 and constants["test_fraction"] == 0.2 and constants["condition_padding"] == 1
    )


@pytest.mark.parametrize(
    "argv, words",
    [
        (("--export", "zapbench"), "--export zapbench needs --split zapbench"),
        (("--export", "gbm", "--no_cell_activity"), "reads cell_activity.h5"),
        (("--export", "parquet"), "unknown format"),
        (("--split", "blocks", "--condition_padding", "2"), "--split zapbench only"),
        (("--split", "zapbench", "--val_ratio", "0.5", "--test_ratio", "0.5"), "leave some training"),
    ],
)
def test_impossible_exports_and_splits_are_refused_at_the_start(tmp_path, argv, words):
    result = run_cli("--input_dir", tmp_path, "--output_dir", tmp_path / "out", *argv, check=False)
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line or "error" in line]
    assert result.returncode == 2 and len(errors) == 1 and words in errors[0], result.stderr


def test_a_missing_package_is_one_line_naming_pip_install(monkeypatch):
    export = usp.EXPORTS["zapbench"]
    monkeypatch.setitem(usp.EXPORTS, "zapbench", usp.dataclasses.replace(export, packages=(("no_such_zarr", "zarr"),)))
    with pytest.raises(usp.PipelineError, match=re.escape("pip install zarr")):
        usp.PipelineConfig(input_dir="in", output_dir="out", export=("zapbench",), split="zapbench")
