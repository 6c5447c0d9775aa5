"""tools/synthetic_calcium.py: reproducibility, units and the noise-level definition."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import synthetic_calcium as sc  # noqa: E402


def test_seeded_and_shapes():
    a = sc.simulate_dataset(20, 400, 2.0, 3.0, 0.5, np.random.default_rng(5))
    b = sc.simulate_dataset(20, 400, 2.0, 3.0, 0.5, np.random.default_rng(5))
    np.testing.assert_array_equal(a["spike_counts"], b["spike_counts"])
    np.testing.assert_array_equal(a["dff"], b["dff"])
    assert a["spike_counts"].shape == a["dff"].shape == a["targets"].shape == (20, 400)
    assert a["spike_counts"].dtype.kind == "i" and a["dff"].dtype == np.float32


def test_mean_rates_in_range_and_realised():
    rng = np.random.default_rng(0)
    counts, rates_hz = sc.simulate_spike_trains(300, 4000, 4.0, rng, return_rates=True)
    assert np.all((rates_hz >= 0.01) & (rates_hz <= 2.0))
    realised_hz = counts.sum(axis=1) / (4000 / 4.0)
    # Expected spike count is preserved by the modulation and bursts (pooled over cells).
    assert realised_hz.sum() == pytest.approx(rates_hz.sum(), rel=0.1)


@pytest.mark.parametrize("frame_rate_hz", [2.0, 30.0])
def test_added_noise_has_requested_cascade_level(frame_rate_hz):
    rng = np.random.default_rng(1)
    zeros = np.zeros((40, 3000), int)
    dff = sc.simulate_dff(
        zeros,
        frame_rate_hz,
        4.0,
        rng,
        drift=False,
        shot_noise_fraction_range=(0.0, 0.0),
        baseline_offset_range=(0.0, 0.0),
    )
    assert np.median(sc.cascade_noise_level(dff, frame_rate_hz)) == pytest.approx(4.0, rel=0.03)


def test_total_noise_mode_reaches_level_with_signal():
    rng = np.random.default_rng(2)
    spikes = sc.simulate_spike_trains(60, 2000, 2.0, rng, mean_rate_range_hz=(0.05, 0.3))
    clean = sc.simulate_dff(spikes, 2.0, 0.0, np.random.default_rng(3))
    dff = sc.simulate_dff(spikes, 2.0, 5.0, np.random.default_rng(3), noise_mode="total")
    reachable = sc.cascade_noise_level(clean, 2.0) < 4.5
    measured = sc.cascade_noise_level(dff, 2.0)[reachable]
    np.testing.assert_allclose(measured, 5.0, rtol=0.02)


def test_targets_are_gaussian_smoothed_counts():
    counts = np.zeros((1, 101))
    counts[0, 50] = 2
    targets = sc.smoothed_spike_targets(counts, frame_rate_hz=2.0, smoothing_s=0.5)
    assert targets.sum() == pytest.approx(2.0)
    assert targets.argmax() == 50
    # sigma = 1 frame: neighbour / peak = exp(-1/2)
    assert targets[0, 51] / targets[0, 50] == pytest.approx(np.exp(-0.5), rel=0.02)


def test_single_spike_kernel_shape():
    """Noise-free response to one spike: rises within a frame or two, then decays."""
    counts = np.zeros((1, 200), int)
    counts[0, 20] = 1
    params = sc.draw_kernel_params(1, np.random.default_rng(0))
    params.decay_s[:] = 1.0
    params.amplitude[:] = 0.2
    params.exposure_fraction[:] = 1.0
    params.exposure_offset[:] = 0.0
    dff = sc.simulate_dff(counts, 10.0, 0.0, np.random.default_rng(0), params=params, drift=False)[0]
    assert np.all(np.abs(dff[:20]) < 1e-6)  # FFT round-off only
    peak = int(np.argmax(dff))
    assert 20 <= peak <= 23
    assert 0.1 < dff[peak] <= 0.2 * (1 + params.supralinearity[0])
    # e-fold decay over about 1 s = 10 frames
    assert dff[peak + 10] / dff[peak] == pytest.approx(np.exp(-1), rel=0.25)


def test_short_traces_and_single_trace():
    import numpy as np

    rng = np.random.default_rng(0)
    counts = sc.simulate_spike_trains(20, 40, 7.5, rng)
    assert counts.shape == (20, 40) and np.isfinite(counts).all()
    one = sc.simulate_dff(counts[0], 7.5, 3.0, rng)
    assert one.shape == (40,) and np.isfinite(one).all()
