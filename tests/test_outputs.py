"""The files of a run on sample_data: schema, contents, split, markers, combined metadata."""

import h5py
import numpy as np
import pytest
from conftest import OFFLINE_BUILTIN, SAMPLE_DIR, run_cli

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
    dense = usp.coo_to_dense_grid(coords, shape)
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
    np.testing.assert_array_equal(grid["timepoint_indices"], np.arange(32, 400 - 32))


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
    for subject in ("subject_1", "subject_3"):  # defaults: blocks of 330, ratio 0.95, seed 42 (subject_2: below)
        check_written_split(out / subject, 330, 0.95, 42)
    # by hand: subject_3 keeps 416 frames -> 1 block of 330, which is the test block; leftover frames train
    is_train = coo(out, "subject_3")["is_train"]
    assert len(is_train) == 416 and is_train[:330].sum() == 0 and is_train[330:].all()
    # non-default options reach the split: 336 kept frames in 6 blocks of 50 (36 leftover), 1 test block
    split = ("--split_block", 50, "--split_ratio", 0.7, "--seed", 3)
    run_cli(
        "--input_dir", SAMPLE, "--output_dir", tmp_path, "--subjects", "subject_1", "--no_plots", *split, *model_args()
    )
    is_train = check_written_split(tmp_path / "subject_1", 50, 0.7, 3)
    assert len(is_train) == 336 and is_train.sum() == 336 - int(6 * 0.3) * 50


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
    np.testing.assert_array_equal(grid["timepoint_indices"], np.arange(360))
    assert grid["attrs"]["marker_pixels"] == 0 and grid["attrs"]["param_spike_mode"] == "discrete"
    assert grid["attrs"]["param_cascade_threshold"] == "0"
    coords = grid["spike_coords"]
    # no spikes where CASCADE has no prediction (first/last 32 frames are kept but empty)
    assert coords[:, 0].min() >= 32 and coords[:, 0].max() < 360 - 32
    with h5py.File(SAMPLE / "subject_2" / "ground_truth_spikes.h5", "r") as truth:
        registered = truth["cells/CellXYZ_norm"][()]
    with h5py.File(tmp_path / "subject_2" / usp.METADATA_FILENAME, "r") as meta:
        np.testing.assert_array_equal(meta["cells/position"][()], registered)
        spike_count = meta["cells/spike_count"][()]
    # discrete mode: a cell's binary spikes are the frames with inferred spikes
    subject = usp.load_subject(SAMPLE / "subject_2")
    model = usp.resolve_model("builtin")
    rates = usp.predict_spike_rates(usp.compute_dff(subject.read_traces(), subject.frame_rate_hz), model, threshold=0)
    np.testing.assert_array_equal(spike_count, (usp.infer_discrete_spikes(rates, model) > 0).sum(axis=1))


def test_quantised_rates_keep_nan_and_stay_within_a_step():
    rates = np.array([[0.0, 0.1, 0.5, np.nan, 0.25], [0.0, 0.0, 0.0, 0.0, np.nan], [-0.1, 2.0, 1.0, 0.0, 0.0]])
    quantised, scale = usp.quantise_rates(rates)
    assert quantised.dtype == np.uint8 and quantised[0, 3] == 255 and quantised[1, 4] == 255
    back = quantised * scale[:, None]
    finite = ~np.isnan(rates)
    assert np.all(
        np.abs(back[finite] - np.maximum(rates, 0)[finite]) <= scale.repeat(5).reshape(3, 5)[finite] / 2 + 1e-7
    )
    assert quantised[2].max() == 254 and quantised[1, :4].max() == 0


def test_a_cell_field_is_one_table_entry(tmp_path, monkeypatch):
    """One CellField entry reaches the workers' results, cascade_results.h5, metadata.h5 cells/ and re-gridding."""
    peak = usp.CellField("peak_rate", "float32", lambda chunk: np.nanmax(np.nan_to_num(chunk.rates), axis=1), True)
    monkeypatch.setattr(usp, "CELL_FIELDS", (*usp.CELL_FIELDS, peak))
    out, subject = tmp_path / "out", "subject_2"
    args = ["--input_dir", str(SAMPLE), "--output_dir", str(out), "--subjects", subject, "--no_plots"]
    assert usp.main([*args, *OFFLINE_BUILTIN]) == 0
    with h5py.File(out / subject / usp.METADATA_FILENAME, "r") as h5:
        written, spike_count = h5["cells/peak_rate"][()], h5["cells/spike_count"][()]
    with h5py.File(out / subject / usp.CASCADE_FILENAME, "r") as h5:
        np.testing.assert_array_equal(h5["peak_rate"][()], written)
    assert written.dtype == np.float32 and len(written) == len(spike_count)
    assert np.all(written >= 0) and np.all(written[spike_count > 0] > 0)  # sampled spikes need a positive rate
    assert usp.main([*args, "--grid_shape", "64", "32", *OFFLINE_BUILTIN]) == 0  # re-grids the saved results
    with h5py.File(out / subject / usp.METADATA_FILENAME, "r") as h5:
        np.testing.assert_array_equal(h5["cells/peak_rate"][()], written)
        assert tuple(h5.attrs["grid_shape"][2:]) == (64, 32)
