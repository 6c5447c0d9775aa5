"""The files of a run on sample_data: schema, contents, split, markers, combined metadata."""

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import OFFLINE_BUILTIN, SAMPLE_DIR, run_cli, same_datasets

import unified_spike_processing_coo as usp

SAMPLE = SAMPLE_DIR


def model_args() -> list:
    """The builtin model (shipped, offline); it must load for the product to work."""
    usp.read_model_folder(usp.BUILTIN_MODEL_DIR)
    return list(OFFLINE_BUILTIN)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = run_cli("--input_dir", SAMPLE, "--output_dir", out, *model_args())
    return out, result


def coo(out, subject):
    return usp.load_coo_grid(out / subject / usp.COO_FILENAME)


def test_outputs_schema_and_dtypes(sample_run):
    out, result = sample_run
    assert (out / usp.COMBINED_FILENAME).is_file() and (out / "processing.log").is_file()
    for subject in ("subject_1", "subject_2", "subject_3"):
        folder = out / subject
        assert (folder / f"{subject}_visualization.pdf").stat().st_size > 10_000
        with h5py.File(folder / usp.COO_FILENAME, "r") as h5:
            assert h5["spike_coords"].dtype == np.int32 and h5["spike_coords"].shape[1] == 4
            assert h5["spike_values"].dtype == np.uint8
            assert h5["grid_shape"].dtype == np.int32 and h5["grid_shape"].shape == (4,)
            assert h5["timepoint_indices"].dtype == np.int32 and h5["is_train"].dtype == np.uint8
            assert h5["spike_coords"].compression == "gzip"
            attrs = dict(h5.attrs)
        for key in (
            "total_spikes",
            "sparsity_percent",
            "format",
            "subject",
            "cascade_model",
            "frame_rate_hz",
            "num_timepoints",
            "num_z_planes",
            "grid_height",
            "grid_width",
            "model_source",
            "software_version",
            "param_seed",
            "param_spike_mode",
        ):
            assert key in attrs, key
        assert attrs["format"] == "COO_sparse" and attrs["subject"] == subject
        assert attrs["model_source"] == "builtin"
    assert "Summary:" in result.stderr and "→ Sparsity:" in result.stderr
    assert "→ Memory savings vs dense:" in result.stderr


def test_coords_sorted_unique_in_range_and_counts(sample_run):
    out, _ = sample_run
    for subject in ("subject_1", "subject_2", "subject_3"):
        grid = coo(out, subject)
        coords, shape = grid["spike_coords"].astype(np.int64), tuple(grid["grid_shape"])
        assert len(coords) == grid["attrs"]["total_spikes"] == len(grid["spike_values"])
        assert np.all(grid["spike_values"] == 1)
        assert np.all(coords >= 0) and np.all(coords < np.array(shape))
        linear = np.ravel_multi_index(tuple(coords.T), shape)
        assert np.all(np.diff(linear) > 0), "coordinates must be sorted and unique"
        total = int(np.prod(shape, dtype=np.int64))
        assert grid["attrs"]["sparsity_percent"] == pytest.approx(100 * len(coords) / total)
        assert shape[0] == grid["attrs"]["num_timepoints"] == len(grid["timepoint_indices"])
        assert grid["attrs"]["spike_pixels"] + grid["attrs"]["marker_pixels"] - grid["attrs"][
            "marker_spike_overlap"
        ] == len(coords)


def test_dense_round_trip(sample_run):
    out, _ = sample_run
    grid = coo(out, "subject_2")
    coords, shape = grid["spike_coords"], tuple(grid["grid_shape"])
    dense = usp.coo_to_dense_grid(coords, grid_shape=shape)
    assert dense.dtype == np.uint8 and dense.shape == shape and int(dense.sum()) == len(coords)
    back = np.argwhere(dense)  # argwhere is row-major sorted, like the file
    np.testing.assert_array_equal(back, coords)


def test_z_markers_and_edge_frames(sample_run):
    out, _ = sample_run
    grid = coo(out, "subject_1")
    T, Z, H, W = grid["grid_shape"]
    coords = grid["spike_coords"]
    for z in (0, Z - 1):
        plane = coords[(coords[:, 0] == 5) & (coords[:, 1] == z)]
        marker = plane[(plane[:, 2] < 2) & (plane[:, 3] >= W - (z + 2))]
        assert len(marker) == 2 * (z + 2)
    assert grid["attrs"]["marker_pixels"] == T * sum(2 * (z + 2) for z in range(Z))
    # 2 Hz model: 64-frame window, the first 32 and last 32 frames have no prediction
    np.testing.assert_array_equal(grid["timepoint_indices"], np.arange(32, 1100 - 32))


def original_split(num_timepoints: int, block_frames: int, split_ratio: float, seed: int) -> tuple:
    """The original script's split, written out independently of the pipeline: whole blocks of
    block_frames timepoints, shuffled with RandomState(seed).permutation(num_blocks); the first
    max(1, int(num_blocks * (1 - split_ratio))) shuffled blocks are test; the other blocks and the
    leftover frames after the last whole block are train. Returns (is_train, sorted test blocks)."""
    num_blocks = num_timepoints // block_frames
    shuffled = np.random.RandomState(seed).permutation(num_blocks)
    test = set(shuffled[: max(1, int(num_blocks * (1 - split_ratio)))].tolist())
    is_train = np.array([0 if t // block_frames in test else 1 for t in range(num_timepoints)], dtype=np.uint8)
    return is_train, sorted(test)


def test_split_function_matches_original_rule():
    # lengths of at least one whole block (the rule says nothing about shorter recordings), with and
    # without leftover frames; blocks of 1 frame up to the default; ratios up to 1 (still one test block)
    for num_timepoints in (330, 331, 416, 659, 660, 1000, 4000, 10_007):
        for block_frames in (1, 7, 50, 330):
            for split_ratio in (0.3, 0.5, 0.8, 0.95, 1.0):
                for seed in (0, 42, 2024):
                    args = (num_timepoints, block_frames, split_ratio, seed)
                    want_train, want_blocks = original_split(*args)
                    is_train, test_blocks = usp.train_test_split(*args)
                    assert is_train.dtype == np.uint8 and is_train.shape == (num_timepoints,), args
                    np.testing.assert_array_equal(is_train, want_train, err_msg=str(args))
                    assert list(test_blocks) == want_blocks, args


def check_written_split(folder, block_frames: int, split_ratio: float, seed: int) -> np.ndarray:
    """The run's is_train (COO file and metadata.h5) against the original rule; returns it."""
    grid = usp.load_coo_grid(folder / usp.COO_FILENAME)
    num_timepoints = int(grid["grid_shape"][0])
    want_train, want_blocks = original_split(num_timepoints, block_frames, split_ratio, seed)
    np.testing.assert_array_equal(grid["is_train"], want_train)
    with h5py.File(folder / usp.METADATA_FILENAME, "r") as meta:
        np.testing.assert_array_equal(meta["is_train"][()], want_train)
        np.testing.assert_array_equal(meta["train_timepoints"][()], np.flatnonzero(want_train == 1))
        np.testing.assert_array_equal(meta["test_timepoints"][()], np.flatnonzero(want_train == 0))
        np.testing.assert_array_equal(meta["test_blocks"][()], want_blocks)
    return want_train


def test_split_matches_original_rule(sample_run, tmp_path):
    out, _ = sample_run
    grid = coo(out, "subject_3")
    T = int(grid["grid_shape"][0])
    is_train, test_blocks = usp.train_test_split(T, 330, 0.95, 42)
    np.testing.assert_array_equal(grid["is_train"], is_train)
    with h5py.File(out / "subject_3" / usp.METADATA_FILENAME, "r") as meta:
        np.testing.assert_array_equal(meta["test_timepoints"][()], np.flatnonzero(is_train == 0))
        np.testing.assert_array_equal(meta["is_train"][()], is_train)
    # by hand: 1136 frames -> 3 blocks of 330; permutation(3) of RandomState(42) starts with block 0, the test
    # block; the other blocks and the 146 leftover frames train
    assert T == 1136 and is_train[:330].sum() == 0 and is_train[330:].all()
    assert grid["attrs"]["split_rule"].startswith("blocks: 330-frame blocks shuffled with RandomState(42)")
    big, blocks = usp.train_test_split(4000, 330, 0.95, 42)
    order = np.random.RandomState(42).permutation(12)
    assert list(blocks) == sorted(order[: max(1, int(12 * 0.05))]) and big.sum() == 4000 - 330


def test_split_shorter_than_one_block_is_one_test_block_and_warned(sample_run):
    """Shorter than one block, the original rule has no whole block; the pipeline keeps its
    max(1, T // block_frames) blocks, so the recording is one test block, and the run warns with a fix."""
    for num_timepoints, block_frames in ((1, 330), (296, 330), (329, 330), (6, 7)):
        is_train, test_blocks = usp.train_test_split(num_timepoints, block_frames, 0.95, 42)
        assert not is_train.any() and list(test_blocks) == [0]
    out, _ = sample_run
    with h5py.File(out / "subject_2" / usp.METADATA_FILENAME, "r") as h5:
        num_timepoints, warnings, is_train = (
            int(h5.attrs["num_timepoints"]),
            str(h5.attrs["warnings"]),
            h5["is_train"][()],
        )
    if num_timepoints < 330:  # the sample subject shorter than one block
        assert not is_train.any() and "--split_block" in warnings


def test_absix_mapping_gives_true_positions(sample_run):
    out, _ = sample_run
    with h5py.File(SAMPLE / "subject_1" / "ground_truth_spikes.h5", "r") as truth:
        true_xyz = truth["cells/CellXYZ"][()]
    with h5py.File(out / "subject_1" / usp.METADATA_FILENAME, "r") as meta:
        np.testing.assert_array_equal(meta["cells/position"][()], true_xyz)
        with h5py.File(SAMPLE / "subject_1" / "TimeSeries.h5", "r") as series:
            np.testing.assert_array_equal(meta["cells/cell_id"][()], series["absIX"][0].astype(int))


def test_metadata_and_combined(sample_run):
    out, _ = sample_run
    with h5py.File(out / "subject_1" / usp.METADATA_FILENAME, "r") as meta:
        for key in (
            "num_timepoints",
            "num_z_planes",
            "total_spikes",
            "sparsity_percent",
            "trace_type",
            "collisions",
            "marker_pixels",
            "model_source",
            "inference_s",
        ):
            assert key in meta.attrs, key
        assert meta.attrs["trace_type"] == "fluorescence"
        for key in ("z_values", "train_timepoints", "test_timepoints", "is_train", "per_plane_sparsity_percent"):
            assert key in meta, key
        n = meta.attrs["num_cells"]
        for key in ("cell_id", "position", "voxel_zxy", "noise_level", "model_noise_level", "spike_count", "valid"):
            assert len(meta["cells"][key]) == n, key
    with h5py.File(out / usp.COMBINED_FILENAME, "r") as combined:
        assert set(combined) == {"subject_1", "subject_2", "subject_3"}
        spikes = [coo(out, s)["attrs"]["total_spikes"] for s in combined]
        assert combined.attrs["total_subjects"] == 3 and combined.attrs["total_spikes"] == sum(spikes)
        assert combined.attrs["format"] == "COO_sparse"
        assert combined.attrs["overall_sparsity_percent"] == pytest.approx(
            100 * combined.attrs["total_spikes"] / combined.attrs["total_pixels"]
        )


def test_identical_outputs_whatever_workers_and_batch_size(sample_run, tmp_path):
    out, _ = sample_run
    other = tmp_path / "other"
    run_cli(
        "--input_dir",
        SAMPLE,
        "--output_dir",
        other,
        "--subjects",
        "subject_1,subject_3",
        "--workers",
        2,
        "--batch_size",
        500,
        "--no_plots",
        *model_args(),
    )
    for subject in ("subject_1", "subject_3"):
        a, b = coo(out, subject), coo(other, subject)
        for key in ("spike_coords", "grid_shape", "timepoint_indices", "is_train"):
            np.testing.assert_array_equal(a[key], b[key])


def test_numpy_engine_runs_without_tensorflow_and_agrees(sample_run, tmp_path):
    """--engine numpy never imports TensorFlow (a stand-in that refuses to import is first on the path), gives
    the same grid whatever --workers, and rates that match the TensorFlow engine's to float16 precision."""
    blocker = tmp_path / "no_tensorflow" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('TensorFlow imported with --engine numpy')\n")
    env = {"PYTHONPATH": str(blocker.parent)}
    common = ("--input_dir", SAMPLE, "--subjects", "subject_1", "--no_plots", "--engine", "numpy", *model_args())
    runs = [tmp_path / "one", tmp_path / "two"]
    result = run_cli(*common, "--output_dir", runs[0], env=env)
    run_cli(*common, "--output_dir", runs[1], "--workers", 2, "--batch_size", 300, env=env)
    assert "CASCADE engine: numpy" in result.stderr
    one, two = coo(runs[0], "subject_1"), coo(runs[1], "subject_1")
    np.testing.assert_array_equal(one["spike_coords"], two["spike_coords"])
    with h5py.File(runs[0] / "subject_1" / usp.METADATA_FILENAME) as h5:
        assert h5.attrs["cascade_engine"] == "numpy" and h5.attrs["param_engine"] == "numpy"
    out, _ = sample_run  # --engine auto
    with h5py.File(out / "subject_1" / usp.CELL_ACTIVITY_FILENAME) as auto:
        with h5py.File(runs[0] / "subject_1" / usp.CELL_ACTIVITY_FILENAME) as numpy_engine:
            a, b = auto["spike_rates"][()].astype(float), numpy_engine["spike_rates"][()].astype(float)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    # float16 keeps ~3 digits; CASCADE's threshold 1 (the default) zeroes frames far from a rate above a cut, so
    # a rate within 1e-6 of the cut may flip a stretch of frames: allow that on a few frames in ten thousand
    close = np.isclose(b, a, rtol=2e-3, atol=1e-4) | np.isnan(a)
    assert close.mean() > 0.9995, f"{(~close).sum()} of {close.size} rates differ"


def test_discrete_mode_edges_registered_coordinates_no_markers(tmp_path):
    run_cli(
        "--input_dir",
        SAMPLE,
        "--output_dir",
        tmp_path,
        "--subjects",
        "subject_2",
        "--no_plots",
        "--spike_mode",
        "discrete",
        "--keep_edge_frames",
        "--coordinates",
        "registered",
        "--no_z_markers",
        "--cascade_threshold",
        "0",
        *model_args(),
    )
    grid = coo(tmp_path, "subject_2")
    np.testing.assert_array_equal(grid["timepoint_indices"], np.arange(1000))
    assert grid["attrs"]["marker_pixels"] == 0 and grid["attrs"]["param_spike_mode"] == "discrete"
    assert grid["attrs"]["param_cascade_threshold"] == "0"
    coords = grid["spike_coords"]
    # no spikes where CASCADE has no prediction (first/last 32 frames are kept but empty)
    assert coords[:, 0].min() >= 32 and coords[:, 0].max() < 1000 - 32
    with h5py.File(SAMPLE / "subject_2" / "ground_truth_spikes.h5", "r") as truth:
        registered = truth["cells/CellXYZ_norm"][()]
    with h5py.File(tmp_path / "subject_2" / usp.METADATA_FILENAME, "r") as meta:
        np.testing.assert_array_equal(meta["cells/position"][()], registered)
        spike_count = meta["cells/spike_count"][()]
        # the atlas frame: 1-based Z-Brain voxel v -> floor((v - 1) * size / extent), x -> H, y -> W, z -> 46 slabs
        atlas = np.floor((registered - 1) * [256, 128, 46] / [1406, 621, 138]).astype(int)
        np.testing.assert_array_equal(meta["cells/voxel_zxy"][()], atlas[:, [2, 0, 1]])
    # discrete mode: a cell's binary spikes are the frames with inferred spikes
    subject = usp.load_subject(SAMPLE / "subject_2")
    model = usp.resolve_model("builtin")
    rates = usp.predict_spike_rates(usp.compute_dff(subject.read_traces(), subject.frame_rate_hz), model, threshold=0)
    np.testing.assert_array_equal(spike_count, (usp.infer_discrete_spikes(rates, model) > 0).sum(axis=1))


def test_a_cell_field_is_one_table_entry(tmp_path, monkeypatch):
    """One CellField entry reaches the workers' results, cell_activity.h5, metadata.h5 cells/ and re-gridding."""
    peak = usp.CellField("peak_rate", "float32", lambda chunk: np.nanmax(np.nan_to_num(chunk.rates), axis=1), True)
    monkeypatch.setattr(usp, "CELL_FIELDS", (*usp.CELL_FIELDS, peak))
    out, subject = tmp_path / "out", "subject_2"
    args = ["--input_dir", str(SAMPLE), "--output_dir", str(out), "--subjects", subject, "--no_plots"]
    assert usp.main([*args, *OFFLINE_BUILTIN]) == 0
    with h5py.File(out / subject / usp.METADATA_FILENAME, "r") as h5:
        written, spike_count = h5["cells/peak_rate"][()], h5["cells/spike_count"][()]
    with h5py.File(out / subject / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        np.testing.assert_array_equal(h5["cascade/peak_rate"][()], written)
    assert written.dtype == np.float32 and len(written) == len(spike_count)
    assert np.all(written >= 0) and np.all(written[spike_count > 0] > 0)  # sampled spikes need a positive rate
    assert usp.main([*args, "--grid_shape", "64", "32", *OFFLINE_BUILTIN]) == 0  # re-grids the saved results
    with h5py.File(out / subject / usp.METADATA_FILENAME, "r") as h5:
        np.testing.assert_array_equal(h5["cells/peak_rate"][()], written)
        assert tuple(h5.attrs["grid_shape"][2:]) == (64, 32)


def test_covariates_at_timepoint_indices_in_coo_and_metadata(tmp_path):
    from conftest import chen_fish_fields, write_chen_fish

    fields = chen_fish_fields(320)
    positions = np.column_stack([np.arange(1, 13) * 100, np.arange(1, 13) * 50, np.arange(1, 13) * 10])
    write_chen_fish(tmp_path / "in" / "subject_1", positions, 320, fields, v73=True)
    run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--no_plots", *model_args())
    expected_condition = np.full(320, -1)
    for index, frames in enumerate(fields["timelists"]):
        expected_condition[frames.astype(int) - 1] = index
    for name in (usp.COO_FILENAME, usp.METADATA_FILENAME, usp.CELL_ACTIVITY_FILENAME):
        with h5py.File(tmp_path / "out" / "subject_1" / name, "r") as h5:
            frames = h5["timepoint_indices"][()]
            group = h5["covariates"]
            assert set(group) == {"stimulus", "condition", "behavior", "eye"}
            np.testing.assert_array_equal(group["stimulus"][()], fields["stim_full"][frames])
            np.testing.assert_array_equal(group["condition"][()], expected_condition[frames])
            np.testing.assert_array_equal(group["behavior"][()], fields["Behavior_full"].T[frames].astype(np.float32))
            np.testing.assert_array_equal(group["eye"][()], fields["Eye_full"].T[frames].astype(np.float32))
            names = list(group["condition"].attrs["condition_names"])
            assert names == ["Spontaneous", "PT", "OMR"]
            np.testing.assert_array_equal(group["condition"].attrs["condition_periods"], [100, 30, 25])
    window = usp.read_covariates(tmp_path / "out" / "subject_1" / usp.COO_FILENAME, 10, 20)
    assert window["behavior"].shape == (10, 5) and window["condition_names"] == names


# --- cell_activity.h5: per-cell rates on the grid's timepoints (issue 18) ---------------------------------------

NAN_CELL, NAN_FRAMES = 3, slice(150, 153)  # a cell with a few NaN frames in the middle of the recording


def write_activity_fish(folder, num_cells: int = 60, num_frames: int = 400, fpsec: float = 2.5, seed: int = 0):
    """A Chen fish with covariates, registered positions and one cell with NaN frames."""
    from conftest import chen_fish_fields, write_chen_fish

    rng = np.random.default_rng(seed)
    positions = np.column_stack([rng.integers(1, 1406, num_cells), rng.integers(1, 621, num_cells),
                                 rng.integers(1, 138, num_cells)]).astype(float)  # fmt: skip
    write_chen_fish(folder, positions, num_frames, chen_fish_fields(num_frames, seed=seed), seed=seed, fpsec=fpsec)
    with h5py.File(folder / "TimeSeries.h5", "r+") as h5:
        h5["CellResp"][NAN_FRAMES, NAN_CELL] = np.nan
    return folder


@pytest.fixture(scope="module")
def activity_run(tmp_path_factory):
    data, out = tmp_path_factory.mktemp("activity_in"), tmp_path_factory.mktemp("activity_out")
    write_activity_fish(data / "subject_1")
    write_activity_fish(data / "subject_2", num_cells=45, num_frames=330, fpsec=2.0, seed=1)
    run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *model_args())
    return data, out


def test_cell_activity_schema_dtypes_and_columns_match_metadata_cells(activity_run):
    data, out = activity_run
    with (
        h5py.File(out / "subject_1" / usp.CELL_ACTIVITY_FILENAME, "r") as h5,
        h5py.File(out / "subject_1" / usp.METADATA_FILENAME, "r") as meta,
        h5py.File(out / "subject_1" / usp.COO_FILENAME, "r") as grid,
        h5py.File(data / "subject_1" / "TimeSeries.h5", "r") as series,
    ):
        rates, num_cells = h5["spike_rates"], len(meta["cells/cell_id"])
        assert rates.dtype == np.float16 and rates.shape == (grid["grid_shape"][0], num_cells)
        assert rates.chunks[0] <= usp.CELL_RATE_CHUNK_TIMEPOINTS and rates.compression is None  # read raw (issue 26)
        np.testing.assert_array_equal(h5["cell_ids"][()], meta["cells/cell_id"][()])
        np.testing.assert_array_equal(h5["cell_ids"][()], series["absIX"][0].astype(int))
        np.testing.assert_array_equal(h5["positions"][()], meta["cells/position"][()])  # --coordinates raw
        assert h5["positions"].shape == h5["positions_registered"].shape == (num_cells, 3)
        for name in ("timepoint_indices", "is_train", "timepoint_times_s"):
            np.testing.assert_array_equal(h5[name][()], grid[name][()])
            np.testing.assert_array_equal(h5[name][()], meta[name][()])
        np.testing.assert_allclose(h5["timepoint_times_s"][()], h5["timepoint_indices"][()] / 2.5)
        assert h5.attrs["run_id"] == meta.attrs["run_id"] and h5.attrs["timepoint_rate_hz"] == 2.5
        # spike counts per cell in the file's CASCADE results are the metadata's
        np.testing.assert_array_equal(np.diff(h5["cascade/cell_offsets"][()]), meta["cells/spike_count"][()])


def test_registered_positions_are_cellxyz_norm(activity_run):
    import scipy.io

    data, out = activity_run
    norm = scipy.io.loadmat(data / "subject_1" / "data_full.mat", squeeze_me=True)["data"]["CellXYZ_norm"].item()
    with h5py.File(out / "subject_1" / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        ids = h5["cell_ids"][()]
        np.testing.assert_array_equal(h5["positions_registered"][()], norm[ids - 1])


def test_cell_activity_is_nan_exactly_where_there_is_no_prediction(activity_run, tmp_path):
    data, out = activity_run
    with h5py.File(out / "subject_1" / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        kept_rates, kept_frames = h5["spike_rates"][()], h5["timepoint_indices"][()]
    model = usp.read_model_folder(usp.BUILTIN_MODEL_DIR)
    missing = np.isnan(kept_rates)
    assert not np.delete(missing, NAN_CELL, axis=1).any()  # every other cell has a prediction at every timepoint
    window_start = kept_frames - model.window_offset  # frame t is predicted from window_start + [0, W)
    touched = (window_start < NAN_FRAMES.stop) & (window_start + model.window_size > NAN_FRAMES.start)
    np.testing.assert_array_equal(missing[:, NAN_CELL], touched)
    # with the edges kept (re-gridded from the same file): their rows are NaN for every cell
    shutil.copytree(out / "subject_1", tmp_path / "out" / "subject_1")
    run_cli("--input_dir", data, "--output_dir", tmp_path / "out", "--subjects", "subject_1", "--no_plots",
            "--keep_edge_frames", *model_args())  # fmt: skip
    with h5py.File(tmp_path / "out" / "subject_1" / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        all_rates, frames = h5["spike_rates"][()], h5["timepoint_indices"][()]
    np.testing.assert_array_equal(frames, np.arange(len(frames)))
    assert np.isnan(all_rates[np.setdiff1d(frames, kept_frames)]).all()
    np.testing.assert_array_equal(all_rates[kept_frames], kept_rates)


def test_no_cell_activity_skips_the_file_and_removes_an_earlier_one(activity_run, tmp_path):
    data, out = activity_run
    shutil.copytree(out / "subject_2", tmp_path / "out" / "subject_2")
    run_cli("--input_dir", data, "--output_dir", tmp_path / "out", "--subjects", "subject_2", "--no_plots",
            "--no_cell_activity", *model_args())  # fmt: skip
    assert not (tmp_path / "out" / "subject_2" / usp.CELL_ACTIVITY_FILENAME).exists()
    assert (tmp_path / "out" / "subject_2" / usp.METADATA_FILENAME).is_file()
    same_datasets(out / "subject_2" / usp.COO_FILENAME, tmp_path / "out" / "subject_2" / usp.COO_FILENAME)


def test_cell_activity_identical_whatever_workers_batch_size_and_shards(activity_run, tmp_path):
    data, out = activity_run
    args = ("--input_dir", data, "--no_plots", *model_args())
    run_cli(*args, "--output_dir", tmp_path / "w2", "--workers", 2, "--batch_size", 7)
    for shard in ("1/2", "2/2"):
        run_cli(*args, "--output_dir", tmp_path / "shards", "--shard", shard, "--batch_size", 20)
    for other in ("w2", "shards"):
        for subject in ("subject_1", "subject_2"):
            for name in (usp.CELL_ACTIVITY_FILENAME, usp.COO_FILENAME, usp.METADATA_FILENAME):
                same_datasets(out / subject / name, tmp_path / other / subject / name)


def test_target_rate_conserves_expected_spikes_and_sets_one_time_base(activity_run, tmp_path):
    """Bins of 2 frames (2.5 Hz -> 1.25 Hz): each kept bin's rate is the sum of its two frames' rates."""
    data, out = activity_run
    run_cli("--input_dir", data, "--output_dir", tmp_path / "out", "--subjects", "subject_1", "--no_plots",
            "--target_rate_hz", 1.25, "--keep_edge_frames", *model_args())  # fmt: skip
    folder = tmp_path / "out" / "subject_1"
    with h5py.File(folder / usp.CELL_ACTIVITY_FILENAME, "r") as h5, h5py.File(folder / usp.COO_FILENAME, "r") as grid:
        binned, bins, times_s = (
            h5["spike_rates"][()].astype(np.float64),
            h5["timepoint_indices"][()],
            h5["timepoint_times_s"][()],
        )
        behavior = h5["covariates/behavior"][()]
        assert h5.attrs["timepoint_rate_hz"] == 1.25 and grid["grid_shape"][0] == len(bins) == 200
        np.testing.assert_array_equal(grid["timepoint_times_s"][()], times_s)
    np.testing.assert_allclose(times_s, bins / 1.25)
    with h5py.File(out / "subject_1" / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        frames_kept, rates = h5["timepoint_indices"][()], h5["spike_rates"][()].astype(np.float64)
    per_frame = np.full((400, rates.shape[1]), np.nan)
    per_frame[frames_kept] = rates
    expected = per_frame[0::2] + per_frame[1::2]  # NaN where either frame has no prediction
    np.testing.assert_array_equal(np.isnan(binned), np.isnan(expected))
    assert (~np.isnan(expected)).sum(axis=0).min() > 100
    # per cell, over its fully covered bins: equal up to float16 storage of each value
    np.testing.assert_allclose(np.nansum(binned, axis=0), np.nansum(expected, axis=0), rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(binned, expected, rtol=2e-3, atol=1e-4)
    from conftest import chen_fish_fields

    fields = chen_fish_fields(400, seed=0)
    np.testing.assert_allclose(
        behavior, fields["Behavior_full"].T.reshape(200, 2, 5).mean(axis=1), rtol=1e-5, atol=1e-6
    )


def _datasets(h5) -> list:
    found = []
    h5.visititems(lambda key, item: found.append(key) if isinstance(item, h5py.Dataset) else None)
    return found


def test_two_fish_in_one_atlas_conditions_split_and_holdout_whatever_workers_and_shards(tmp_path):
    from conftest import chen_fish_fields, write_chen_fish

    rng = np.random.default_rng(5)
    shared = np.array([[1, 1, 1], [1406, 621, 138], [700, 300, 70], [350, 150, 30], [1000, 500, 120]])
    fish = {
        "subject_1": np.vstack([shared, rng.integers(1, [1407, 622, 139], (7, 3))]),
        "subject_2": np.vstack([rng.integers(1, [1407, 622, 139], (9, 3)), shared]),
    }
    fields = chen_fish_fields(320)
    for (name, positions), v73 in zip(fish.items(), (False, True)):
        write_chen_fish(tmp_path / "in" / name, positions, 320, fields, v73=v73, seed=len(positions))
    options = ("--coordinates", "registered", "--split", "conditions", "--holdout_condition", "OMR", "--no_plots")
    run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "a", *options, *model_args())
    for shard in ("1/2", "2/2"):
        run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "b", *options, "--workers", 2,
                "--batch_size", 4, "--shard", shard, *model_args())  # fmt: skip
    voxels = {}
    for name in fish:
        for file in (usp.COO_FILENAME, usp.METADATA_FILENAME):
            with h5py.File(tmp_path / "a" / name / file, "r") as a, h5py.File(tmp_path / "b" / name / file, "r") as b:
                for key in _datasets(a):
                    np.testing.assert_array_equal(a[key][()], b[key][()], err_msg=f"{name} {file} {key}")
        with h5py.File(tmp_path / "a" / name / usp.METADATA_FILENAME, "r") as meta:
            voxels[name] = meta["cells/voxel_zxy"][()]
            is_train, condition = meta["is_train"][()], meta["covariates/condition"][()]
            assert meta.attrs["split_rule"].startswith("conditions") and "OMR is test" in meta.attrs["split_rule"]
        assert not is_train[condition == 2].any() and is_train[condition == 0].sum() > 0.9 * (condition == 0).sum()
        pt = np.flatnonzero(condition == 1)  # PT: 3 repetitions of 30 frames, the last one test
        np.testing.assert_array_equal(is_train[pt], np.repeat([1, 1, 0], 30)[-len(pt) :])
    # one atlas voxel, one grid voxel, in both fish
    np.testing.assert_array_equal(voxels["subject_1"][:5], voxels["subject_2"][-5:])


@pytest.mark.parametrize(
    "shape, chunks", [((150_001,), (1 << 16,)), ((70_000, 4), (1 << 14, 1)), ((37, 900), (8, 900))]
)
def test_chunks_compressed_on_every_core_are_stored_as_hdf5_stores_them(tmp_path, shape, chunks):
    """write_chunks and ChunkAppender (edges, uneven appends) give the very bytes of HDF5's own filters."""
    rows = np.random.default_rng(3).integers(0, 5000, shape).astype(np.int32)
    with h5py.File(tmp_path / "chunks.h5", "w") as h5:
        own = h5.create_dataset("own", data=rows, chunks=chunks, **usp.GZIP)
        direct = h5.create_dataset("direct", shape, np.int32, chunks=chunks, **usp.GZIP)
        usp.write_chunks(direct, 0, rows, threads=2)
        appended = h5.create_dataset(
            "appended", (0, *shape[1:]), np.int32, maxshape=(None, *shape[1:]), chunks=chunks, **usp.GZIP
        )
        appender = usp.ChunkAppender(appended, threads=2)
        for part in np.array_split(rows, [1, 7, chunks[0] - 1, chunks[0] + 5, len(rows) - 3]):
            appender.append(part)
        appender.close()
        for name in ("direct", "appended"):
            np.testing.assert_array_equal(h5[name][()], rows)
            for chunk in own.iter_chunks():
                corner = tuple(piece.start for piece in chunk)
                assert h5[name].id.read_direct_chunk(corner) == own.id.read_direct_chunk(corner), (name, corner)


def test_outputs_table_in_reverse_order_writes_the_same_files(tmp_path, monkeypatch):
    """No writer reads what another set: written in the reverse of SUBJECT_OUTPUTS' order (the commit record first in
    the table), every file holds the same, and the commit record is still renamed into place last."""
    from conftest import same_outputs

    args = ["--input_dir", str(SAMPLE), "--subjects", "subject_2", "--nwb", "--target_rate_hz", "1.5"]
    assert usp.main([*args, "--output_dir", str(tmp_path / "normal"), *OFFLINE_BUILTIN]) == 0
    renamed = []
    monkeypatch.setattr(usp, "SUBJECT_OUTPUTS", usp.SUBJECT_OUTPUTS[::-1])
    monkeypatch.setattr(
        usp.os, "replace", lambda source, final: renamed.append(Path(final).name) or os.rename(source, final)
    )
    assert usp.main([*args, "--output_dir", str(tmp_path / "reversed"), *OFFLINE_BUILTIN]) == 0
    assert renamed[-2] == usp.METADATA_FILENAME and len(renamed) == 6  # five files, then combined_metadata.h5
    same_outputs(tmp_path / "normal", tmp_path / "reversed")
