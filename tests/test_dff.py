"""dF/F: the trace-type decision and the sliding-percentile baseline."""

import numpy as np
import pytest
from conftest import SAMPLE_DIR

import unified_spike_processing_coo as usp

SAMPLE = SAMPLE_DIR


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
    assert usp.decide_trace_type(fluorescence).kind == "fluorescence"
    assert usp.decide_trace_type(rng.normal(0, 0.05, (50, 300))).kind == "dff"
    assert usp.decide_trace_type(fluorescence, hint="dff").kind == "dff"


@pytest.mark.parametrize("percentile", [0, 1, 8, 13, 30, 50, 70, 92, 99, 100])
def test_sliding_percentile_equals_scipy(percentile):
    """Both paths (running minima for low and high ranks, np.partition in between), ties and constant runs too."""
    from scipy.ndimage import percentile_filter

    traces = np.random.default_rng(4).normal(0, 1, (13, 97)).astype(np.float32)
    traces[2, 10:60], traces[5] = 0.5, 3.0  # ties, a constant row
    traces[7] = np.round(traces[7])
    for window in (3, 15, 59, 61, 97, 201):
        expected = percentile_filter(traces, percentile, size=(1, window), mode="nearest")
        got = usp.sliding_percentile(traces, window, percentile, max_chunk_values=5000)
        np.testing.assert_array_equal(got, expected, err_msg=f"window {window}")


def test_sliding_percentile_same_whatever_the_threads_and_blocks():
    traces = (100 + np.random.default_rng(3).normal(0, 5, (37, 500))).astype(np.float32)
    for percentile in (8.0, 50.0):  # running minima, np.partition
        one = usp.sliding_percentile(traces, 41, percentile)
        np.testing.assert_array_equal(
            usp.sliding_percentile(traces, 41, percentile, max_chunk_values=41 * 500 * 3, threads=3), one
        )
