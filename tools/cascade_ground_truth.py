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
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.io as sio

from tools.synthetic_calcium import cascade_noise_level, noise_sigma_for_level

__all__ = [
    "Recording",
    "Skipped",
    "load_ground_truth",
    "usable_at_rate",
    "resample_recording",
    "add_noise_to_level",
    "is_excitatory",
    "dataset_group",
]

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


# Dataset folders by cell type (CASCADE's grouping; the folder name says indicator, species, region).
# Inhibitory interneuron datasets; every other dataset is excitatory (CASCADE's "Global_EXC" set).
INHIBITORY_DATASET_PREFIXES = ("DS22-", "DS23-", "DS24-", "DS25-", "DS26-", "DS27-", "DS41-")
# Datasets recorded from the same neurons (different processing of one recording): they must stay
# on the same side of a train/test split, or a held-out score would be measured on seen cells.
SAME_NEURONS = (("DS12-", "X-DS11-"),)


def is_excitatory(dataset: str) -> bool:
    """True for CASCADE's excitatory datasets (everything but the interneuron folders)."""
    return not dataset.startswith(INHIBITORY_DATASET_PREFIXES)


def dataset_group(dataset: str) -> str:
    """Key shared by datasets of the same neurons (for splits by dataset)."""
    for group in SAME_NEURONS:
        if dataset.startswith(group):
            return group[0].rstrip("-")
    return dataset


@dataclass
class Skipped:
    """A recording (struct element) that was not read, and why."""

    dataset: str
    file: str
    index: int
    reason: str


def _field(element, name: str) -> np.ndarray | None:
    """A struct field as a flat float array; None when the element has no such field
    (absent from the file's struct) or it is an empty placeholder."""
    names = element.dtype.names or ()
    if name not in names:
        return None
    value = element[name]
    while value.dtype == object and value.size == 1:
        value = value.flat[0]
    if value.dtype == object and value.size == 0:
        return None
    return np.asarray(value, dtype=float).ravel()


def dataset_files(ground_truth_dir: str) -> list[str]:
    """All ground-truth .mat files: ``CAttached_*.mat`` and DS24-DS27's ``CAttached<Name>.mat``."""
    files = sorted(glob.glob(os.path.join(ground_truth_dir, "*", "CAttached*.mat")))
    return files + sorted(glob.glob(os.path.join(ground_truth_dir, "CAttached*.mat")))


def load_ground_truth(
    ground_truth_dir: str, datasets: list[str] | None = None, skipped: list | None = None
) -> list[Recording]:
    """All recordings under ``ground_truth_dir`` (a folder of DSxx folders, or a
    single folder of CAttached*.mat files). ``datasets`` restricts to those
    DSxx folder names.

    Elements that cannot be used are left out and, if ``skipped`` is a list,
    reported there as :class:`Skipped`: ``fluo_time``, ``fluo_mean`` or
    ``events_AP`` absent or empty (DS03 has such elements), fewer than two
    frames, or ``fluo_time`` and ``fluo_mean`` of different lengths (frame times
    cannot be assigned). Frames whose time is not finite (DS19 pads one
    recording with NaN) are dropped; spikes outside the imaged interval are
    ignored when resampling.
    """
    recordings = []
    for path in dataset_files(ground_truth_dir):
        dataset = os.path.basename(os.path.dirname(path))
        if datasets and dataset not in datasets:
            continue
        struct = sio.loadmat(path)["CAttached"]
        for index, element in enumerate(struct.ravel()):

            def skip(reason, _dataset=dataset, _path=path, _index=index):
                if skipped is not None:
                    skipped.append(Skipped(_dataset, os.path.basename(_path), _index, reason))

            t = _field(element, "fluo_time")
            y = _field(element, "fluo_mean")
            spikes = _field(element, "events_AP")
            missing = [n for n, v in (("fluo_time", t), ("fluo_mean", y), ("events_AP", spikes)) if v is None]
            if missing:
                skip(", ".join(missing) + " absent or empty")
                continue
            if t.size != y.size:
                skip(f"fluo_time ({t.size}) and fluo_mean ({y.size}) differ in length")
                continue
            keep = np.isfinite(t)
            t, y = t[keep], y[keep]
            if t.size < 2:
                skip("fewer than two frames")
                continue
            spikes = spikes[np.isfinite(spikes)] / EPHYS_SAMPLES_PER_S
            recordings.append(Recording(dataset, os.path.basename(path), index, t, y, np.sort(spikes)))
    return recordings


def usable_at_rate(rec: Recording, frame_rate_hz: float, min_frames: int) -> str | None:
    """Why a recording cannot be used at a model's frame rate (None if it can).

    Resampling averages the original frames of each model frame, so the original
    rate must not be below the model's (upsampling would invent frames), and the
    recording must span ``min_frames`` model frames (one 64-frame window of the
    network for training).
    """
    if rec.frame_rate_hz < frame_rate_hz * 0.999:
        return f"frame rate {rec.frame_rate_hz:.2f} Hz below the model's {frame_rate_hz:g} Hz"
    duration = rec.fluo_time_s[-1] - rec.fluo_time_s[0] + 1.0 / rec.frame_rate_hz
    if duration * frame_rate_hz < min_frames:
        return (
            f"{duration:.0f} s long, shorter than {min_frames} frames at {frame_rate_hz:g} Hz "
            f"({min_frames / frame_rate_hz:.0f} s)"
        )
    return None


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN traces: handled just below
        own_level = float(cascade_noise_level(dff, frame_rate_hz))
    if not np.isfinite(own_level) or own_level > target_noise_level:
        return None
    sigma_own = noise_sigma_for_level(own_level, frame_rate_hz)
    sigma_target = noise_sigma_for_level(target_noise_level, frame_rate_hz)
    sigma_add = np.sqrt(max(sigma_target**2 - sigma_own**2, 0.0))
    return dff + sigma_add * rng.standard_normal(dff.shape)
