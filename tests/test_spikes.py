"""Spikes from rates: seeded sampling, thresholds, and recovery of true spikes."""

import h5py
import numpy as np
import pytest
from conftest import SAMPLE_DIR
from scipy.ndimage import gaussian_filter1d

import unified_spike_processing_coo as usp

SAMPLE = SAMPLE_DIR


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


def test_inferred_spikes_recover_true_spikes():
    subject = usp.load_subject(SAMPLE / "subject_2")
    model = usp.resolve_model("builtin")
    dff = usp.compute_dff(subject.read_traces(), subject.frame_rate_hz)
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


def test_a_spike_mode_is_one_table_entry(monkeypatch):
    """One SpikeMode entry is a --spike_mode choice with its help, and binarize_spikes runs it."""
    mode = usp.SpikeMode("every positive rate", lambda rates, context: np.nan_to_num(rates) > 0)
    monkeypatch.setitem(usp.SPIKE_MODES, "positive", mode)
    parser = usp.build_parser()
    config = usp.PipelineConfig(
        **vars(parser.parse_args(["--input_dir", "a", "--output_dir", "b", "--spike_mode", "positive"]))
    )
    assert config.spike_mode == "positive" and "positive: every positive rate" in " ".join(parser.format_help().split())
    rates = np.array([[0.0, 0.2, np.nan, -0.1]])
    np.testing.assert_array_equal(usp.binarize_spikes(rates, [1], "positive"), [[False, True, False, False]])


# --- the time base: rates re-binned to --target_rate_hz (issue 18) ---------------------------------------------


def frame_coverage(time_base) -> np.ndarray:
    """(frames,) the fraction of each frame inside the bins (the last frames may fall past the last whole bin)."""
    end_in_frames = time_base.num_timepoints / time_base.rate_hz * time_base.frame_rate_hz
    return np.clip(end_in_frames - np.arange(time_base.num_frames), 0.0, 1.0)


@pytest.mark.parametrize("frame_rate_hz, target_rate_hz", [(2.37, 1.0), (1.84, 2.0), (2.0, 5.0), (2.5, 1.25)])
def test_rebinning_conserves_expected_spikes(frame_rate_hz, target_rate_hz):
    rng = np.random.default_rng(0)
    rates = rng.random((6, 501)) * 0.4
    time_base = usp.TimeBase(frame_rate_hz, 501, target_rate_hz)
    binned = time_base.rebin(rates)
    assert binned.shape == (6, time_base.num_timepoints) and not np.isnan(binned).any()
    assert time_base.num_timepoints == int(501 * target_rate_hz / frame_rate_hz + 1e-9)
    np.testing.assert_allclose(binned.sum(axis=1), rates @ frame_coverage(time_base), rtol=1e-12)
    np.testing.assert_allclose(time_base.times_s(), np.arange(time_base.num_timepoints) / target_rate_hz)
    # a constant rate per frame becomes rate x frames per bin
    np.testing.assert_allclose(time_base.rebin(np.full((1, 501), 0.3)), 0.3 * frame_rate_hz / target_rate_hz)


def test_a_bin_touching_a_frame_without_prediction_is_nan():
    time_base = usp.TimeBase(2.37, 200, 1.0)
    rates = np.full((2, 200), 0.1)
    rates[0, 50] = np.nan
    binned = time_base.rebin(rates)
    bins = np.arange(time_base.num_timepoints)
    touches = (bins / 1.0 < 51 / 2.37) & ((bins + 1) / 1.0 > 50 / 2.37)  # bin j overlaps frame 50
    np.testing.assert_array_equal(np.isnan(binned[0]), touches)
    assert touches.sum() in (1, 2) and not np.isnan(binned[1]).any()
    predicted = np.ones(200, bool)
    predicted[:30] = predicted[-40:] = False  # CASCADE's edges
    kept = time_base.predicted(predicted)
    starts, ends = bins / 1.0 * 2.37, (bins + 1) / 1.0 * 2.37  # bins in frames
    np.testing.assert_array_equal(kept, (starts >= 30 - 1e-9) & (ends <= 160 + 1e-9))


def test_without_a_target_rate_the_time_base_is_the_recording():
    time_base = usp.TimeBase(2.0, 50)
    rates = np.random.default_rng(1).random((3, 50))
    assert time_base.rebin(rates) is rates and time_base.num_timepoints == 50 and time_base.rate_hz == 2.0
    covariates = usp.Covariates(stimulus=np.arange(50))
    assert time_base.resample_covariates(covariates) is covariates


def test_covariates_resampled_codes_at_the_bin_start_behaviour_by_mean():
    time_base = usp.TimeBase(3.0, 30, 1.0)  # bins of 3 frames
    behavior = np.arange(60, dtype=np.float32).reshape(30, 2)
    covariates = usp.Covariates(stimulus=np.arange(30, dtype=np.int16), condition=np.repeat([0, 1, -1], 10).astype(np.int16),
                                behavior=behavior, extra={"speed": np.arange(30.0), "code": np.arange(30)})  # fmt: skip
    binned = time_base.resample_covariates(covariates)
    np.testing.assert_array_equal(binned.stimulus, np.arange(0, 30, 3))
    np.testing.assert_array_equal(binned.condition, np.repeat([0, 1, -1], 10)[::3])
    np.testing.assert_allclose(binned.behavior, behavior.reshape(10, 3, 2).mean(axis=1))
    np.testing.assert_allclose(binned.extra["speed"], np.arange(30.0).reshape(10, 3).mean(axis=1))
    np.testing.assert_array_equal(binned.extra["code"], np.arange(0, 30, 3))
    assert binned.behavior.dtype == np.float32 and binned.stimulus.dtype == np.int16


# --- threshold mode: the grid's spikes are exactly cell_activity.h5's rates at or above the threshold ------------


@pytest.mark.parametrize("target", [(), ("--target_rate_hz", "1.3")])
def test_threshold_spikes_are_the_stored_rates_at_or_above_the_threshold(tmp_path, target):
    from conftest import OFFLINE_BUILTIN, run_cli

    threshold = 0.1
    run_cli("--input_dir", SAMPLE, "--output_dir", tmp_path, "--subjects", "subject_2", "--no_plots", "--no_z_markers",
            "--spike_mode", "threshold", "--spike_threshold", threshold, *target, *OFFLINE_BUILTIN)  # fmt: skip
    folder = tmp_path / "subject_2"
    with h5py.File(folder / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        rates, frames = h5["spike_rates"][()], h5["timepoint_indices"][()]
        offsets, spike_frames = h5["cascade/cell_offsets"][()], h5["cascade/spike_frames"][()]
    with h5py.File(folder / usp.METADATA_FILENAME, "r") as h5:
        voxels = h5["cells/voxel_zxy"][()]
    grid = usp.load_coo_grid(folder / usp.COO_FILENAME)
    # per cell and timepoint: a spike where the stored rate is at or above the threshold
    spikes = np.zeros(rates.shape, bool)
    frame_to_row = np.full(frames.max() + 1, -1)
    frame_to_row[frames] = np.arange(len(frames))
    cells = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    inside = spike_frames <= frames.max()
    rows = frame_to_row[spike_frames[inside]]
    spikes[rows[rows >= 0], cells[inside][rows >= 0]] = True
    at_or_above = np.nan_to_num(rates.astype(np.float64)) >= threshold
    rounding = np.abs(rates.astype(np.float64) - threshold) <= threshold * 2.0**-10  # float16 storage
    assert at_or_above.sum() > 100 and not (spikes != at_or_above)[~rounding].any()
    # and the grid's active voxels at each timepoint are those of these cells (markers off)
    expected = {(t, *voxels[c]) for t, c in zip(*np.nonzero(spikes))}
    ambiguous = {(t, *voxels[c]) for t, c in zip(*np.nonzero(rounding))}
    found = {tuple(row) for row in grid["spike_coords"].tolist()}
    assert expected - ambiguous <= found and found - ambiguous <= expected
