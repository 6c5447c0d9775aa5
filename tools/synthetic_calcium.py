"""Seeded, vectorised simulation of calcium-imaging ground truth.

Used to train and test CASCADE-style spike inference without real ground truth.
Everything is driven by an explicit ``numpy.random.Generator`` so results are
reproducible; nothing here reads global random state.

Typical use::

    import numpy as np
    from tools.synthetic_calcium import (
        simulate_spike_trains, simulate_dff, smoothed_spike_targets)

    rng = np.random.default_rng(0)
    spikes = simulate_spike_trains(100, 2000, frame_rate_hz=2.0, rng=rng)
    dff = simulate_dff(spikes, frame_rate_hz=2.0, noise_level=3.0, rng=rng)
    targets = smoothed_spike_targets(spikes, frame_rate_hz=2.0, smoothing_s=0.5)

Conventions
-----------
* Arrays are ``(n_cells, n_frames)``; frame ``k`` covers the time interval
  ``[k / frame_rate_hz, (k + 1) / frame_rate_hz)``.
* ``spike_counts[i, k]`` is the number of spikes of cell ``i`` inside frame ``k``.
* ``dff`` is dF/F as a fraction (0.1 means 10 %). Sample ``k`` is the mean
  fluorescence over an exposure window lying inside frame ``k`` (a fixed
  sub-frame position per cell, like a ROI's line position in a scanned frame,
  and a per-cell exposure fraction from a point sample to the whole frame).
  Real data resampled to a slow rate by averaging all samples of a frame
  interval is the special case "exposure fraction 1".
* Noise levels follow CASCADE's definition
  ``nanmedian(|diff(dff)|) / sqrt(frame_rate_hz) * 100``; for white Gaussian
  noise of standard deviation sigma, ``median|diff| = 0.6745 * sqrt(2) * sigma``.
* Training targets are spikes per frame smoothed with a Gaussian of standard
  deviation ``smoothing_s * frame_rate_hz`` frames, as CASCADE does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

__all__ = [
    "MEDIAN_ABS_DIFF_PER_SIGMA",
    "cascade_noise_level",
    "noise_sigma_for_level",
    "smoothed_spike_targets",
    "simulate_spike_trains",
    "KernelParams",
    "draw_kernel_params",
    "simulate_dff",
    "simulate_dataset",
]

# median(|x_t - x_{t-1}|) of white Gaussian noise with unit standard deviation:
# the difference has std sqrt(2), and median|N(0,1)| = 0.6745.
MEDIAN_ABS_DIFF_PER_SIGMA = 0.6745 * np.sqrt(2.0)


# --------------------------------------------------------------------------
# Noise level and targets
# --------------------------------------------------------------------------


def cascade_noise_level(dff: np.ndarray, frame_rate_hz: float) -> np.ndarray:
    """CASCADE noise level of each trace (last axis is time).

    ``nanmedian(|diff(dff)|) / sqrt(frame_rate_hz) * 100``; dF/F as fractions.
    """
    dff = np.asarray(dff, dtype=float)
    return np.nanmedian(np.abs(np.diff(dff, axis=-1)), axis=-1) / np.sqrt(frame_rate_hz) * 100.0


def noise_sigma_for_level(noise_level, frame_rate_hz: float):
    """Standard deviation (dF/F fraction) of white Gaussian noise that has the
    given CASCADE noise level at ``frame_rate_hz``."""
    return np.asarray(noise_level, dtype=float) / 100.0 * np.sqrt(frame_rate_hz) / MEDIAN_ABS_DIFF_PER_SIGMA


def smoothed_spike_targets(spike_counts: np.ndarray, frame_rate_hz: float, smoothing_s: float) -> np.ndarray:
    """Spikes per frame smoothed with a Gaussian of sigma ``smoothing_s * frame_rate_hz``
    frames (along the last axis), the regression target of CASCADE models."""
    counts = np.asarray(spike_counts, dtype=float)
    sigma_frames = smoothing_s * frame_rate_hz
    if sigma_frames <= 0:
        return counts.copy()
    return gaussian_filter1d(counts, sigma=sigma_frames, axis=-1)


# --------------------------------------------------------------------------
# Spike trains
# --------------------------------------------------------------------------


def _log_uniform(rng: np.random.Generator, low: float, high: float, size) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size=size))


def simulate_spike_trains(
    n_cells: int,
    n_frames: int,
    frame_rate_hz: float,
    rng: np.random.Generator,
    mean_rate_range_hz: tuple[float, float] = (0.01, 2.0),
    bursty_fraction: float = 0.5,
    burst_spike_fraction_range: tuple[float, float] = (0.3, 0.9),
    mean_burst_size_range: tuple[float, float] = (2.0, 6.0),
    burst_duration_range_s: tuple[float, float] = (0.02, 0.2),
    rate_modulation_range: tuple[float, float] = (0.0, 1.5),
    rate_modulation_timescale_range_s: tuple[float, float] = (2.0, 60.0),
    return_rates: bool = False,
):
    """Spike counts per frame, shape ``(n_cells, n_frames)``, int.

    Each cell gets a mean rate drawn log-uniformly from ``mean_rate_range_hz``.
    Firing is an inhomogeneous Poisson process whose rate is the mean rate
    times a slow, positive, mean-one modulation (log-normal process with a
    per-cell strength from ``rate_modulation_range`` (std of the log-rate) and
    timescale), which produces the episodes of activity and silence seen in vivo.

    A fraction ``bursty_fraction`` of the cells emit part of their spikes
    (``burst_spike_fraction_range``) in bursts: burst onsets follow the same
    modulated rate, each burst has ``1 + Poisson(mean_burst_size - 1)`` spikes
    spread uniformly over a burst duration, so bursts can straddle frames at
    high frame rates. The expected total rate stays at the cell's mean rate.

    With ``return_rates=True`` also returns the per-cell mean rates in Hz.
    """
    n_cells, n_frames = int(n_cells), int(n_frames)
    frame_s = 1.0 / frame_rate_hz
    mean_rate_hz = _log_uniform(rng, *mean_rate_range_hz, size=n_cells)

    # Slow log-normal rate modulation: Gaussian-filtered white noise in log space,
    # normalised to unit variance and then to unit mean so the mean rate is kept.
    mod_strength = rng.uniform(*rate_modulation_range, size=n_cells)
    mod_timescale_frames = _log_uniform(rng, *rate_modulation_timescale_range_s, size=n_cells) * frame_rate_hz
    log_mod = np.empty((n_cells, n_frames))
    # gaussian_filter1d takes one sigma per call; group cells by rounded timescale
    # (few distinct values) to keep it vectorised.
    rounded = np.maximum(np.round(mod_timescale_frames, 1), 0.5)
    for sigma in np.unique(rounded):
        rows = np.flatnonzero(rounded == sigma)
        white = rng.standard_normal((rows.size, n_frames))
        smooth = gaussian_filter1d(white, sigma=sigma, axis=1, mode="wrap")
        std = smooth.std(axis=1, keepdims=True)
        # A timescale far beyond a short trace leaves (almost) no modulation: keep those rows
        # flat instead of blowing round-off up to unit variance (exp() would overflow).
        log_mod[rows] = np.where(std > 1e-3, smooth / (std + 1e-12), 0.0)
    log_mod *= mod_strength[:, None]
    modulation = np.exp(log_mod)
    modulation /= modulation.mean(axis=1, keepdims=True)
    rate_hz = mean_rate_hz[:, None] * modulation  # (n_cells, n_frames)

    is_bursty = rng.random(n_cells) < bursty_fraction
    burst_spike_fraction = np.where(is_bursty, rng.uniform(*burst_spike_fraction_range, size=n_cells), 0.0)
    mean_burst_size = rng.uniform(*mean_burst_size_range, size=n_cells)

    # Single (non-burst) spikes: Poisson counts per frame.
    single_rate = rate_hz * (1.0 - burst_spike_fraction)[:, None]
    counts = rng.poisson(single_rate * frame_s)

    # Bursts: onsets per frame, then each burst's spikes placed in continuous time.
    burst_onset_rate = rate_hz * (burst_spike_fraction / mean_burst_size)[:, None]
    onsets = rng.poisson(burst_onset_rate * frame_s)
    cell_idx, frame_idx = np.nonzero(onsets)
    if cell_idx.size:
        n_per = onsets[cell_idx, frame_idx]
        cell_idx = np.repeat(cell_idx, n_per)
        frame_idx = np.repeat(frame_idx, n_per)
        onset_s = (frame_idx + rng.random(frame_idx.size)) * frame_s
        size = 1 + rng.poisson(mean_burst_size[cell_idx] - 1.0)
        duration_s = rng.uniform(*burst_duration_range_s, size=cell_idx.size)
        spike_cell = np.repeat(cell_idx, size)
        spike_s = np.repeat(onset_s, size) + rng.random(spike_cell.size) * np.repeat(duration_s, size)
        spike_frame = np.floor(spike_s / frame_s).astype(np.int64)
        keep = spike_frame < n_frames
        np.add.at(counts, (spike_cell[keep], spike_frame[keep]), 1)

    counts = counts.astype(np.int64)
    if return_rates:
        return counts, mean_rate_hz
    return counts


# --------------------------------------------------------------------------
# Fluorescence
# --------------------------------------------------------------------------


@dataclass
class KernelParams:
    """Per-cell indicator and acquisition parameters (arrays of length n_cells).

    amplitude: peak dF/F (fraction) of an isolated single spike's kernel,
        before frame averaging and before the nonlinearity.
    rise_s, decay_s: time constants of the double-exponential kernel
        ``exp(-t/decay_s) - exp(-t/rise_s)`` (normalised to peak 1).
    supralinearity: quadratic gain; GCaMP's per-spike response grows in bursts.
    saturation: calcium (in single-spike peak units) at which the response halves.
    exposure_fraction: fraction of the frame interval the sample integrates over.
    exposure_offset: start of the exposure window as a fraction of the frame,
        in [0, 1 - exposure_fraction].
    drift_amplitude: std (dF/F fraction) of slow baseline drift.
    drift_timescale_s: Gaussian correlation time of the drift.
    baseline_offset: constant dF/F offset (imperfect F0 estimates).
    shot_noise_fraction: share of the noise variance that scales with F
        (photon shot noise), the rest is additive.
    """

    amplitude: np.ndarray
    rise_s: np.ndarray
    decay_s: np.ndarray
    supralinearity: np.ndarray
    saturation: np.ndarray
    exposure_fraction: np.ndarray
    exposure_offset: np.ndarray
    drift_amplitude: np.ndarray
    drift_timescale_s: np.ndarray
    baseline_offset: np.ndarray
    shot_noise_fraction: np.ndarray
    extra: dict = field(default_factory=dict)


def draw_kernel_params(
    n_cells: int,
    rng: np.random.Generator,
    amplitude_range: tuple[float, float] = (0.04, 0.6),
    rise_range_s: tuple[float, float] = (0.05, 0.2),
    decay_range_s: tuple[float, float] = (0.4, 2.5),
    supralinearity_range: tuple[float, float] = (0.0, 0.3),
    saturation_range: tuple[float, float] = (5.0, 50.0),
    exposure_fraction_range: tuple[float, float] = (0.05, 1.0),
    drift_amplitude_range: tuple[float, float] = (0.0, 0.1),
    drift_timescale_range_s: tuple[float, float] = (10.0, 200.0),
    baseline_offset_range: tuple[float, float] = (-0.05, 0.05),
    shot_noise_fraction_range: tuple[float, float] = (0.0, 0.5),
) -> KernelParams:
    """Draw per-cell GCaMP6-like kernel, nonlinearity, acquisition and drift
    parameters. Scale-like parameters are log-uniform, the rest uniform."""
    exposure_fraction = rng.uniform(*exposure_fraction_range, size=n_cells)
    return KernelParams(
        amplitude=_log_uniform(rng, *amplitude_range, size=n_cells),
        rise_s=_log_uniform(rng, *rise_range_s, size=n_cells),
        decay_s=_log_uniform(rng, *decay_range_s, size=n_cells),
        supralinearity=rng.uniform(*supralinearity_range, size=n_cells),
        saturation=_log_uniform(rng, *saturation_range, size=n_cells),
        exposure_fraction=exposure_fraction,
        exposure_offset=rng.random(n_cells) * (1.0 - exposure_fraction),
        drift_amplitude=rng.uniform(*drift_amplitude_range, size=n_cells),
        drift_timescale_s=_log_uniform(rng, *drift_timescale_range_s, size=n_cells),
        baseline_offset=rng.uniform(*baseline_offset_range, size=n_cells),
        shot_noise_fraction=rng.uniform(*shot_noise_fraction_range, size=n_cells),
    )


def _calcium_fine(
    spike_counts: np.ndarray,
    params: KernelParams,
    fine_rate_hz: float,
    samples_per_frame: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Calcium (single-spike peak = 1) on a fine time grid, by FFT convolution of
    spikes placed uniformly at random inside their frame."""
    n_cells, n_frames = spike_counts.shape
    n_fine = n_frames * samples_per_frame
    spikes_fine = np.zeros((n_cells, n_fine), dtype=np.float32)
    cell_idx, frame_idx = np.nonzero(spike_counts)
    if cell_idx.size:
        n_per = spike_counts[cell_idx, frame_idx]
        cell_idx = np.repeat(cell_idx, n_per)
        fine_idx = np.repeat(frame_idx, n_per) * samples_per_frame + rng.integers(
            0, samples_per_frame, size=cell_idx.size
        )
        np.add.at(spikes_fine, (cell_idx, fine_idx), 1.0)

    # Kernel support: long enough for the slowest cell to decay to ~0.1 % of
    # peak; convolution is zero-padded (linear, not circular).
    t_s = np.arange(n_fine) / fine_rate_hz
    max_len = min(n_fine, int(np.ceil(7.0 * params.decay_s.max() * fine_rate_hz)) + 1)
    t_s = t_s[:max_len]
    rise = params.rise_s[:, None]
    decay = params.decay_s[:, None]
    kernel = np.exp(-t_s / decay) - np.exp(-t_s / rise)
    kernel /= kernel.max(axis=1, keepdims=True)
    n_fft = int(2 ** np.ceil(np.log2(n_fine + max_len)))
    calcium = np.fft.irfft(
        np.fft.rfft(spikes_fine, n_fft, axis=1) * np.fft.rfft(kernel.astype(np.float32), n_fft, axis=1), n_fft, axis=1
    )[:, :n_fine]
    return np.maximum(calcium, 0.0).astype(np.float32)


def simulate_dff(
    spike_counts: np.ndarray,
    frame_rate_hz: float,
    noise_level,
    rng: np.random.Generator,
    params: KernelParams | None = None,
    fine_rate_hz: float = 100.0,
    drift: bool = True,
    noise_mode: str = "added",
    max_cells_per_chunk: int | None = None,
    **param_ranges,
) -> np.ndarray:
    """dF/F traces (fractions, float32, shape of ``spike_counts``) for given
    per-frame spike counts.

    Parameters
    ----------
    spike_counts : (n_cells, n_frames) int array of spikes per frame.
    frame_rate_hz : frame rate of the output.
    noise_level : scalar or per-cell array of CASCADE noise levels; 0 for
        noise-free. Its meaning depends on ``noise_mode``.
    rng : numpy Generator.
    params : per-cell KernelParams; drawn with ``draw_kernel_params(**param_ranges)``
        when None.
    fine_rate_hz : internal simulation rate; raised to at least 4 samples per
        frame. Spikes fall at uniformly random times inside their frame.
    drift : add slow baseline drift and offset (amplitudes from ``params``).
    noise_mode : ``"added"``: the added noise alone has this level (white-noise
        definition, so its sigma is ``noise_sigma_for_level``). ``"total"``: the
        noise is scaled per cell so that ``cascade_noise_level`` of the final
        trace, signal included, equals the level, as when CASCADE adds noise to
        real ground truth and as a trace is classified at inference. Cells
        whose noise-free trace already exceeds the level get no noise; check
        with ``cascade_noise_level`` and discard them if that matters.
    max_cells_per_chunk : bounds memory of the fine-grid convolution; by
        default chosen to keep about 8 M fine samples per chunk.
    """
    spike_counts = np.asarray(spike_counts)
    if spike_counts.ndim == 1:
        return simulate_dff(
            spike_counts[None],
            frame_rate_hz,
            noise_level,
            rng,
            params=params,
            fine_rate_hz=fine_rate_hz,
            drift=drift,
            noise_mode=noise_mode,
            max_cells_per_chunk=max_cells_per_chunk,
            **param_ranges,
        )[0]
    n_cells, n_frames = spike_counts.shape
    if params is None:
        params = draw_kernel_params(n_cells, rng, **param_ranges)

    samples_per_frame = max(4, int(round(fine_rate_hz / frame_rate_hz)))
    fine_rate_hz = samples_per_frame * frame_rate_hz
    if max_cells_per_chunk is None:
        max_cells_per_chunk = max(1, 8_000_000 // (n_frames * samples_per_frame))

    # Exposure window per cell, in whole fine samples inside the frame.
    width = np.clip(np.round(params.exposure_fraction * samples_per_frame), 1, samples_per_frame).astype(int)
    offset = np.clip(np.round(params.exposure_offset * samples_per_frame), 0, samples_per_frame - width).astype(int)

    calcium = np.empty((n_cells, n_frames), dtype=np.float32)
    frame_starts = np.arange(n_frames) * samples_per_frame
    for start in range(0, n_cells, max_cells_per_chunk):
        rows = slice(start, min(n_cells, start + max_cells_per_chunk))
        sub = KernelParams(**{k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in params.__dict__.items()})
        fine = _calcium_fine(spike_counts[rows], sub, fine_rate_hz, samples_per_frame, rng)
        # Mean over each cell's exposure window via a cumulative sum.
        csum = np.concatenate(
            [np.zeros((fine.shape[0], 1), np.float64), np.cumsum(fine, axis=1, dtype=np.float64)], axis=1
        )
        lo = frame_starts[None, :] + offset[rows, None]
        hi = lo + width[rows, None]
        calcium[rows] = (np.take_along_axis(csum, hi, 1) - np.take_along_axis(csum, lo, 1)) / width[rows, None]

    # Indicator nonlinearity: supralinear for bursts, saturating for large calcium.
    c = calcium.astype(float)
    response = c * (1.0 + params.supralinearity[:, None] * c) / (1.0 + c / params.saturation[:, None])
    dff = params.amplitude[:, None] * response

    if drift:
        t_frames = params.drift_timescale_s * frame_rate_hz
        white = rng.standard_normal((n_cells, n_frames))
        drift_trace = np.empty_like(white)
        rounded = np.maximum(np.round(t_frames, 0), 1.0)
        for sigma in np.unique(rounded):
            rows = np.flatnonzero(rounded == sigma)
            smooth = gaussian_filter1d(white[rows], sigma=sigma, axis=1, mode="reflect")
            smooth /= smooth.std(axis=1, keepdims=True) + 1e-12
            drift_trace[rows] = smooth
        dff += params.drift_amplitude[:, None] * drift_trace + params.baseline_offset[:, None]

    sigma = np.broadcast_to(noise_sigma_for_level(noise_level, frame_rate_hz), (n_cells,)).astype(float)
    if np.any(sigma > 0):
        # Shot noise scales with F = F0 (1 + dF/F); keep the baseline variance
        # equal to sigma^2 so the noise level is what was asked for.
        shot = params.shot_noise_fraction[:, None]
        fluor = np.maximum(1.0 + dff, 0.0)
        unit_noise = np.sqrt((1.0 - shot) + shot * fluor) * rng.standard_normal((n_cells, n_frames))
        if noise_mode == "total":
            sigma = _scale_for_total_level(dff, unit_noise, sigma, frame_rate_hz)
        elif noise_mode != "added":
            raise ValueError(f"noise_mode must be 'added' or 'total', not {noise_mode!r}")
        dff = dff + sigma[:, None] * unit_noise
    return dff.astype(np.float32)


def _scale_for_total_level(
    clean: np.ndarray, unit_noise: np.ndarray, sigma_white: np.ndarray, frame_rate_hz: float, n_iter: int = 20
) -> np.ndarray:
    """Per-cell noise scale s such that the noise level of ``clean + s * unit_noise``
    matches the level whose white-noise sigma is ``sigma_white`` (bisection; the
    level grows monotonically with s for a fixed noise realisation)."""
    target_level = sigma_white * MEDIAN_ABS_DIFF_PER_SIGMA / np.sqrt(frame_rate_hz) * 100.0
    lo = np.zeros_like(sigma_white)
    hi = 1.5 * sigma_white
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        level = cascade_noise_level(clean + mid[:, None] * unit_noise, frame_rate_hz)
        too_noisy = level > target_level
        hi = np.where(too_noisy, mid, hi)
        lo = np.where(too_noisy, lo, mid)
    return 0.5 * (lo + hi)


def simulate_dataset(
    n_cells: int,
    n_frames: int,
    frame_rate_hz: float,
    noise_level,
    smoothing_s: float,
    rng: np.random.Generator,
    spike_kwargs: dict | None = None,
    dff_kwargs: dict | None = None,
) -> dict:
    """Convenience wrapper: spikes, dF/F and smoothed targets in one call.

    Returns a dict with ``spike_counts`` (int), ``dff`` (float32 fractions),
    ``targets`` (smoothed spikes per frame), ``params`` (KernelParams) and
    ``mean_rate_hz`` (per cell).
    """
    spikes, mean_rate_hz = simulate_spike_trains(
        n_cells, n_frames, frame_rate_hz, rng, return_rates=True, **(spike_kwargs or {})
    )
    dff_kwargs = dict(dff_kwargs or {})
    params = dff_kwargs.pop("params", None)
    if params is None:
        range_keys = {k: dff_kwargs.pop(k) for k in list(dff_kwargs) if k.endswith("_range") or k.endswith("_range_s")}
        params = draw_kernel_params(n_cells, rng, **range_keys)
    dff = simulate_dff(spikes, frame_rate_hz, noise_level, rng, params=params, **dff_kwargs)
    return {
        "spike_counts": spikes,
        "dff": dff,
        "targets": smoothed_spike_targets(spikes, frame_rate_hz, smoothing_s),
        "params": params,
        "mean_rate_hz": mean_rate_hz,
    }
