"""The pipeline end to end on sample_data, and its stages on small arrays."""

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO_DIR
from scipy.ndimage import gaussian_filter1d

import unified_spike_processing_coo as usp

SAMPLE = REPO_DIR / "sample_data"
SCRIPT = REPO_DIR / "unified_spike_processing_coo.py"


def model_args() -> list:
    """The builtin model (shipped, offline); it must be complete for the product to work."""
    assert usp.is_complete_model_folder(usp.BUILTIN_MODEL_DIR), (
        f"builtin model missing or incomplete at {usp.BUILTIN_MODEL_DIR}"
    )
    return ["--cascade_model", "builtin", "--offline"]


def run_cli(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_DIR,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = run_cli("--input_dir", SAMPLE, "--output_dir", out, *model_args())
    return out, result


def coo(out, subject):
    return usp.load_coo_grid(out / subject / usp.COO_FILENAME)


# --- end to end ---------------------------------------------------------------------------------


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


def test_split_matches_original_rule(sample_run):
    out, _ = sample_run
    grid = coo(out, "subject_3")
    T = int(grid["grid_shape"][0])
    is_train, test_blocks = usp.train_test_split(T, 330, 0.95, 42)
    np.testing.assert_array_equal(grid["is_train"], is_train)
    with h5py.File(out / "subject_3" / usp.METADATA_FILENAME, "r") as meta:
        np.testing.assert_array_equal(meta["test_timepoints"][()], np.flatnonzero(is_train == 0))
        np.testing.assert_array_equal(meta["is_train"][()], is_train)
    # by hand: 416 frames -> 1 block of 330, which is the test block; leftover frames train
    assert T == 416 and is_train[:330].sum() == 0 and is_train[330:].all()
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
        for key in (
            "z_values",
            "train_timepoints",
            "test_timepoints",
            "is_train",
            "per_plane_sparsity_percent",
        ):
            assert key in meta, key
        n = meta.attrs["num_cells"]
        for key in (
            "cell_id",
            "position",
            "voxel_zxy",
            "noise_level",
            "model_noise_level",
            "spike_count",
            "valid",
        ):
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


def test_inferred_spikes_recover_true_spikes():
    subject = usp.load_subject(SAMPLE / "subject_2")
    model = usp.load_cascade_model("builtin")
    dff = usp.compute_dff(subject.traces, subject.frame_rate_hz)
    rates = usp.predict_spike_rates(dff, model, threshold=0)
    with h5py.File(SAMPLE / "subject_2" / "ground_truth_spikes.h5", "r") as truth:
        true_spikes = truth["spike_counts"][()].astype(float)
    valid = ~np.isnan(rates[0])
    sigma = model.smoothing_frames
    inferred = gaussian_filter1d(np.nan_to_num(rates), sigma, axis=1)[:, valid]
    target = gaussian_filter1d(true_spikes, sigma, axis=1)[:, valid]
    active = target.std(axis=1) > 0

    def correlations(a, b):
        a = a - a.mean(axis=1, keepdims=True)
        b = b - b.mean(axis=1, keepdims=True)
        return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-12)

    matched = np.median(correlations(inferred[active], target[active]))
    shuffled = np.median(correlations(inferred[active], np.roll(target[active], 1, axis=0)))
    assert matched > 0.5 and matched > shuffled + 0.3, (matched, shuffled)
    # more active cells get more inferred spikes (absolute calibration depends on the indicator's
    # amplitude per spike: about 2x here, 0.2-1.4x on CASCADE's real ground truth)
    total_corr = np.corrcoef(np.nansum(rates[:, valid], 1), true_spikes[:, valid].sum(1))[0, 1]
    assert total_corr > 0.5


# --- bad input: one error line per subject, the others still run, nothing lost -------------


def test_bad_subjects_fail_alone_and_keep_earlier_outputs(tmp_path):
    data = tmp_path / "data"
    for name in ("subject_1", "subject_2"):
        shutil.copytree(SAMPLE / name, data / name)
    out = tmp_path / "out"
    run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *model_args())
    before = (out / "subject_2" / usp.COO_FILENAME).read_bytes()
    # break subject_2 (truncated TimeSeries.h5) and add broken subjects of every kind
    series = data / "subject_2" / "TimeSeries.h5"
    series.write_bytes(series.read_bytes()[:5000])
    shutil.copytree(SAMPLE / "subject_3", data / "subject_4")
    (data / "subject_4" / "data_full.mat").unlink()
    shutil.copytree(SAMPLE / "subject_3", data / "subject_5")
    with h5py.File(data / "subject_5" / "TimeSeries.h5", "r+") as h5:
        h5["CellResp"][...] = np.nan
    (data / "subject_6").mkdir()
    (data / "subject_7").mkdir()  # generic layout recorded at 10 Hz: far from the 2 Hz model
    with h5py.File(data / "subject_7" / "traces.h5", "w") as h5:
        h5["traces"] = np.random.default_rng(0).normal(0, 0.05, (20, 300)).astype(np.float32)
        h5["positions"] = np.random.default_rng(1).random((20, 3))
        h5.attrs["frame_rate_hz"] = 10.0
    # a usable subject with some dead cells and some missing frames: processed, with warnings
    shutil.copytree(SAMPLE / "subject_3", data / "subject_8")
    with h5py.File(data / "subject_8" / "TimeSeries.h5", "r+") as h5:
        cell_resp = h5["CellResp"][()]
        cell_resp[:, :5] = np.nan
        cell_resp[100:110, 5:50] = np.nan
        h5["CellResp"][...] = cell_resp
    result = run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *model_args(), check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 5, errors
    assert any("subject_7" in e and "10 Hz" in e and "model" in e for e in errors)
    assert "5 cells have all-NaN traces" in result.stderr and "45 cells have some NaN frames" in result.stderr
    with h5py.File(out / "subject_8" / usp.METADATA_FILENAME, "r") as meta:
        valid = meta["cells/valid"][()]
        assert valid[:5].sum() == 0 and valid[5:].all()
        assert meta["cells/spike_count"][:5].sum() == 0
    assert any("subject_2" in e and "TimeSeries.h5" in e for e in errors)
    assert any("subject_4" in e and "data_full.mat" in e for e in errors)
    assert any("subject_5" in e and "NaN" in e for e in errors)
    assert any("subject_6" in e for e in errors)
    assert (out / "subject_2" / usp.COO_FILENAME).read_bytes() == before, "earlier output must survive"
    assert (out / "subject_1" / usp.COO_FILENAME).is_file()
    assert not list(out.rglob(".*tmp*")), "no temporary files left behind"
    with h5py.File(out / usp.COMBINED_FILENAME, "r") as combined:
        assert set(combined) == {"subject_1", "subject_2", "subject_8"}


def test_help_and_bad_arguments():
    result = run_cli("--help")
    for flag in (
        "--input_dir",
        "--workers",
        "--batch_size",
        "--cascade_model",
        "--strict_model",
        "--spike_mode",
        "--grid_shape",
        "--trace_type",
        "--keep_edge_frames",
    ):
        assert flag in result.stdout
    assert run_cli("--input_dir", "nowhere", "--output_dir", "/tmp/x_unused", check=False).returncode == 2


def test_strict_model_without_network_is_a_clear_error(tmp_path):
    result = run_cli(
        "--input_dir",
        SAMPLE,
        "--output_dir",
        tmp_path,
        "--cascade_model",
        "Global_EXC_2Hz_smoothing500ms",
        "--model_cache",
        tmp_path / "cache",
        "--offline",
        "--strict_model",
        check=False,
    )
    assert result.returncode == 2
    assert "Global_EXC_2Hz_smoothing500ms" in result.stderr and "--model_dir" in result.stderr


# --- stages on small arrays -------------------------------------------------------------------


def test_compute_dff_matches_naive_percentile():
    rng = np.random.default_rng(0)
    F = 100 + rng.normal(0, 3, (4, 120)).cumsum(axis=1) * 0.1 + rng.normal(0, 1, (4, 120))
    dff = usp.compute_dff(F, frame_rate_hz=2.0, window_s=10.0, percentile=8)
    half = 10
    for i in range(4):
        for t in (0, 50, 119):
            window = F[i, max(0, t - half) : t + half + 1]
            padded = np.concatenate(
                [np.full(max(0, half - t), F[i, 0]), window, np.full(max(0, t + half - 119), F[i, -1])]
            )
            f0 = np.percentile(padded, 8, method="lower")
            assert dff[i, t] == pytest.approx((F[i, t] - f0) / f0, rel=1e-3, abs=1e-3)


def test_trace_type_decision():
    rng = np.random.default_rng(1)
    fluorescence = 200 + rng.normal(0, 5, (50, 300))
    assert usp.decide_trace_type(fluorescence)[0] == "fluorescence"
    assert usp.decide_trace_type(rng.normal(0, 0.05, (50, 300)))[0] == "dff"
    assert usp.decide_trace_type(fluorescence, hint="dff")[0] == "dff"


def test_sampled_spikes_do_not_depend_on_batching():
    rng = np.random.default_rng(2)
    rates = rng.random((40, 100)) * 0.3
    rates[3, :10] = np.nan
    ids = np.arange(1000, 1040)
    whole = usp.binarize_spikes(rates, ids, "sample", seed=5)
    parts = np.concatenate(
        [usp.binarize_spikes(rates[i : i + 7], ids[i : i + 7], "sample", seed=5) for i in range(0, 40, 7)]
    )
    np.testing.assert_array_equal(whole, parts)
    assert not whole[3, :10].any()
    assert abs(whole.mean() - np.nanmean(rates)) < 0.02
    assert not np.array_equal(whole, usp.binarize_spikes(rates, ids, "sample", seed=6))
    np.testing.assert_array_equal(
        usp.binarize_spikes(rates, ids, "threshold", spike_threshold=0.2), np.nan_to_num(rates) >= 0.2
    )


def test_build_coo_unique_collisions_and_dropped_frames():
    positions = np.array([[0.0, 0, 1], [0.0, 0, 1], [10, 10, 2], [5, 5, 2]])
    grid = usp.make_grid_spec(positions, num_timepoints=3, height=4, width=8)
    np.testing.assert_array_equal(grid.cell_voxels, [[0, 0, 0], [0, 0, 0], [1, 3, 7], [1, 1, 3]])
    frame_to_t = np.array([-1, 0, 1, 2])  # frame 0 dropped
    cells, frames = np.array([0, 1, 2, 3, 2]), np.array([1, 1, 2, 0, 3])
    result = usp.build_coo(cells, frames, grid, frame_to_t, z_markers=False)
    np.testing.assert_array_equal(result["coords"], [[0, 0, 0, 0], [1, 1, 3, 7], [2, 1, 3, 7]])
    assert result["collisions"] == 1 and result["spikes_in_grid"] == 4


def test_generic_layout_and_v73_mat(tmp_path):
    generic = tmp_path / "subject_1"
    generic.mkdir()
    with h5py.File(generic / "traces.h5", "w") as h5:
        h5["traces"] = np.random.default_rng(0).normal(0, 0.05, (5, 80)).astype(np.float32)
        h5["positions"] = np.arange(15, dtype=float).reshape(5, 3)
        h5.attrs["frame_rate_hz"] = 2.5
        h5.attrs["trace_type"] = "dff"
    subject = usp.load_subject(generic)
    assert subject.layout == "generic" and subject.traces.shape == (5, 80) and subject.frame_rate_hz == 2.5
    # MATLAB v7.3: data_full.mat is HDF5 and stores matrices transposed
    chen = tmp_path / "subject_2"
    shutil.copytree(SAMPLE / "subject_1", chen)
    original = usp.load_subject(chen)
    import scipy.io

    fields = scipy.io.loadmat(chen / "data_full.mat", squeeze_me=True, struct_as_record=False)["data"]
    (chen / "data_full.mat").unlink()
    with h5py.File(chen / "data_full.mat", "w", userblock_size=512) as h5:
        group = h5.create_group("data")
        for key in ("CellXYZ", "CellXYZ_norm", "IX_inval_anat"):
            group[key] = np.atleast_2d(np.asarray(getattr(fields, key), dtype=float)).T
        group["fpsec"] = np.array([[float(fields.fpsec)]])
    with open(chen / "data_full.mat", "r+b") as handle:  # MATLAB's text header in the user block
        handle.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")
    converted = usp.load_subject(chen)
    np.testing.assert_array_equal(converted.positions, original.positions)
    assert converted.frame_rate_hz == pytest.approx(original.frame_rate_hz)


def test_load_errors_name_the_problem(tmp_path):
    folder = tmp_path / "subject_1"
    shutil.copytree(SAMPLE / "subject_1", folder)
    with h5py.File(folder / "TimeSeries.h5", "r+") as h5:
        absix = h5["absIX"][()]
        del h5["absIX"]
        h5["absIX"] = absix[:, :-5]
    with pytest.raises(usp.PipelineError, match="absIX lists"):
        usp.load_subject(folder)
    with pytest.raises(usp.PipelineError, match="neither"):
        (tmp_path / "subject_9").mkdir()
        usp.load_subject(tmp_path / "subject_9")


def test_subject_discovery_natural_order(tmp_path):
    for name in ("subject_10", "subject_2", "subject_1", "notes"):
        (tmp_path / "Subjects" / name).mkdir(parents=True)
    found = usp.find_subjects(tmp_path)
    assert [p.name for p in found] == ["subject_1", "subject_2", "subject_10"]
    assert [p.name for p in usp.find_subjects(tmp_path, skip=("subject_2",))] == ["subject_1", "subject_10"]
    with pytest.raises(usp.PipelineError, match="subject_7"):
        usp.find_subjects(tmp_path, only=("subject_7",))


def test_sliding_percentile_equals_scipy():
    from scipy.ndimage import percentile_filter

    traces = np.random.default_rng(4).normal(0, 1, (13, 97)).astype(np.float32)
    for window in (3, 15, 61):
        expected = percentile_filter(traces, 8, size=(1, window), mode="nearest")
        np.testing.assert_array_equal(
            usp.sliding_percentile(traces, window, 8, max_chunk_values=500), expected
        )


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
    model = usp.load_cascade_model("builtin")
    rates = usp.predict_spike_rates(
        usp.compute_dff(subject.traces, subject.frame_rate_hz), model, threshold=0
    )
    np.testing.assert_array_equal(spike_count, (usp.infer_discrete_spikes(rates, model) > 0).sum(axis=1))
