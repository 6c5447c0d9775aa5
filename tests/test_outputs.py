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
    np.testing.assert_array_equal(grid["timepoint_indices"], np.arange(32, 1100 - 32))


def test_split_matches_original_rule(sample_run):
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


def test_covariates_at_timepoint_indices_in_coo_and_metadata(tmp_path):
    from conftest import chen_fish_fields, write_chen_fish

    fields = chen_fish_fields(320)
    positions = np.column_stack([np.arange(1, 13) * 100, np.arange(1, 13) * 50, np.arange(1, 13) * 10])
    write_chen_fish(tmp_path / "in" / "subject_1", positions, 320, fields, v73=True)
    run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--no_plots", *model_args())
    expected_condition = np.full(320, -1)
    for index, frames in enumerate(fields["timelists"]):
        expected_condition[frames.astype(int) - 1] = index
    for name in (usp.COO_FILENAME, usp.METADATA_FILENAME):
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
