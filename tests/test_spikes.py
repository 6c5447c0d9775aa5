"""Spikes from rates: seeded sampling, thresholds, and recovery of true spikes."""

import h5py
import numpy as np
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
