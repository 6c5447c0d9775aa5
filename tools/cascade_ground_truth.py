"""Read CASCADE ground-truth recordings and bring them to a model's frame rate.

CASCADE distributes its ground truth as ``DSxx-<name>/CAttached_*.mat`` files,
each holding a MATLAB struct array ``CAttached`` (one element per recording of
that neuron) with, among others:

* ``fluo_time``: frame times in seconds,
* ``fluo_mean``: dF/F of the neuron as a fraction,
* ``events_AP``: spike times in units of 0.1 ms (electrophysiology sampled at 10 kHz).

Shared by ``tools/train_cascade_model.py --ground_truth_dir`` and
``benchmarks/benchmark_accuracy.py`` so both treat the data identically.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import scipy.io as sio

from tools.synthetic_calcium import cascade_noise_level, noise_sigma_for_level

__all__ = ["Recording", "load_ground_truth", "resample_recording", "add_noise_to_level"]

# events_AP counts samples of the 10 kHz electrophysiology recording.
EPHYS_SAMPLES_PER_S = 1e4


@dataclass
class Recording:
    """One ground-truth recording.

    dataset: name of the DSxx folder; file: .mat file name; index: element of
    the CAttached struct array; fluo_time_s / dff: frame times (s) and dF/F
    (fraction); spike_times_s: spike times (s).
    """

    dataset: str
    file: str
    index: int
    fluo_time_s: np.ndarray
    dff: np.ndarray
    spike_times_s: np.ndarray

    @property
    def frame_rate_hz(self) -> float:
        return float(1.0 / np.median(np.diff(self.fluo_time_s)))


def _field(element, name: str) -> np.ndarray:
    # loadmat wraps each struct field in a (1, 1) object array.
    value = element[name]
    while value.dtype == object and value.size == 1:
        value = value.flat[0]
    return np.asarray(value, dtype=float).ravel()


def load_ground_truth(ground_truth_dir: str, datasets: list[str] | None = None) -> list[Recording]:
    """All recordings under ``ground_truth_dir`` (a folder of DSxx folders, or a
    single folder of CAttached_*.mat files). ``datasets`` restricts to those
    DSxx folder names. Recordings without frames are skipped."""
    files = sorted(glob.glob(os.path.join(ground_truth_dir, "*", "CAttached_*.mat")))
    files += sorted(glob.glob(os.path.join(ground_truth_dir, "CAttached_*.mat")))
    recordings = []
    for path in files:
        dataset = os.path.basename(os.path.dirname(path))
        if datasets and dataset not in datasets:
            continue
        struct = sio.loadmat(path)["CAttached"]
        for index, element in enumerate(struct.ravel()):
            t = _field(element, "fluo_time")
            y = _field(element, "fluo_mean")
            spikes = _field(element, "events_AP") / EPHYS_SAMPLES_PER_S
            if t.size < 2 or t.size != y.size:
                continue
            recordings.append(Recording(dataset, os.path.basename(path), index, t, y, np.sort(spikes)))
    return recordings


def resample_recording(rec: Recording, frame_rate_hz: float, outlier_mad: float = 20.0):
    """Bin a recording into frames of ``1 / frame_rate_hz`` seconds.

    Frame ``k`` covers ``[t0 + k / frame_rate_hz, t0 + (k + 1) / frame_rate_hz)``
    with ``t0`` the first frame time. dF/F is the mean of the original samples in
    the bin (the slow-rate equivalent of a long exposure), spikes are counted in
    the same bin. Isolated extreme samples (more than ``outlier_mad`` robust
    standard deviations of the frame-to-frame difference away from both
    neighbours, e.g. a corrupt first frame) are treated as missing. Bins without
    samples are NaN; only bins fully inside the recording are returned.

    Returns ``(dff, spike_counts)`` as float arrays.
    """
    t = rec.fluo_time_s
    y = rec.dff.astype(float).copy()
    y[~np.isfinite(y)] = np.nan

    d = np.diff(y)
    robust_sd = np.nanmedian(np.abs(d - np.nanmedian(d))) / 0.6745 + 1e-12
    jump_prev = np.abs(np.concatenate([[np.nan], d]))
    jump_next = np.abs(np.concatenate([d, [np.nan]]))
    # At the ends only one neighbour exists; there a single large jump suffices.
    big_prev = np.where(np.isnan(jump_prev), True, jump_prev > outlier_mad * robust_sd)
    big_next = np.where(np.isnan(jump_next), True, jump_next > outlier_mad * robust_sd)
    y[big_prev & big_next] = np.nan

    frame_s = 1.0 / frame_rate_hz
    original_frame_s = np.median(np.diff(t))
    t_start = t[0]
    n_frames = int(np.floor((t[-1] + original_frame_s - t_start) / frame_s))
    idx = np.floor((t - t_start) / frame_s).astype(np.int64)
    ok = (idx >= 0) & (idx < n_frames) & np.isfinite(y)
    sums = np.bincount(idx[ok], weights=y[ok], minlength=n_frames)
    n = np.bincount(idx[ok], minlength=n_frames).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        dff = np.where(n > 0, sums / n, np.nan)

    sidx = np.floor((rec.spike_times_s - t_start) / frame_s).astype(np.int64)
    sidx = sidx[(sidx >= 0) & (sidx < n_frames)]
    counts = np.bincount(sidx, minlength=n_frames).astype(float)
    return dff, counts


def add_noise_to_level(dff: np.ndarray, frame_rate_hz: float, target_noise_level: float, rng: np.random.Generator):
    """Add white Gaussian noise so the trace reaches ``target_noise_level``.

    The trace's own noise is measured with CASCADE's definition and treated as
    white; the added variance is the difference. Returns ``None`` when the trace
    is already noisier than the target (CASCADE's training skips those too).
    """
    own_level = float(cascade_noise_level(dff, frame_rate_hz))
    if not np.isfinite(own_level) or own_level > target_noise_level:
        return None
    sigma_own = noise_sigma_for_level(own_level, frame_rate_hz)
    sigma_target = noise_sigma_for_level(target_noise_level, frame_rate_hz)
    sigma_add = np.sqrt(max(sigma_target**2 - sigma_own**2, 0.0))
    return dff + sigma_add * rng.standard_normal(dff.shape)
