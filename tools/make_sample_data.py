#!/usr/bin/env python3
"""Make the small, seeded sample dataset in the Chen et al. (Neuron 2018) layout.

Writes, for each subject ``n`` in 1..3, into ``<out>/subject_<n>/``:

``TimeSeries.h5``
    ``CellResp``  h5py shape (T, N) float32 -- raw fluorescence (a.u.), frames x cells as seen
                  from h5py (MATLAB wrote an N x T matrix, so HDF5 holds it transposed).
    ``absIX``     h5py shape (1, N) float64 -- 1-based row indices into ``data.CellXYZ`` of the
                  cells whose traces are the columns of ``CellResp`` (sorted, ascending).
``data_full.mat``
    MATLAB v5 file (``scipy.io.savemat``, compressed) with a struct ``data``: ``CellXYZ``
    (numcell_full x 3 float64: row pixel, column pixel, 1-based z-plane), ``CellXYZ_norm``
    (numcell_full x 3: the same cells in a common atlas-like frame shared by all fish),
    ``IX_inval_anat`` (column of 1-based indices of anatomically invalid cells), ``fpsec``,
    ``numcell_full``, ``numcell``, ``numplane``, a few names, and the stimulus and behaviour fields as the
    real files hold them (``make_covariates``): ``stim_full`` (1 x T codes), ``timelists`` (1 x n cell of
    1-based frames per stimulus set), ``timelists_names``, ``periods`` (frames per repetition), ``stimset``
    (1 x n struct array: ``name``, ``pattern``), ``Behavior_full`` (5 x T), ``Eye_full`` (2 x T).
``ground_truth_spikes.h5``
    ``spike_counts`` (N, T) uint8 -- true spikes per CellResp column and frame; ``dff_true``
    (N, T) float32 noise-free dF/F; ``cells/*`` per-cell truth (class, plane, F0, spike amplitude,
    kernel time constants, noise parameters); ``population_event_times_s``; attributes.

Spike trains and the GCaMP-like dF/F come from ``tools/synthetic_calcium.py``; this script adds the
anatomy, the raw-fluorescence baseline, bleaching/drift, shot and readout noise and the Chen
layout. Everything is drawn from ``numpy.random.default_rng`` seeded per subject from ``--seed``
and the subject number, so a subject can be regenerated alone and the arrays are identical from
run to run (with the same numpy/scipy/h5py the files are byte-identical too: no HDF5 timestamps,
fixed MAT header text). A change to ``synthetic_calcium``'s random draws changes the output:
``tests/test_sample_data.py`` then fails until ``sample_data/`` is regenerated and committed.

Usage (the committed ``sample_data/`` was made with exactly this)::

    python tools/make_sample_data.py --out sample_data --seed 20180927
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import h5py
import numpy as np
import scipy.io

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
from tools import synthetic_calcium as sc  # noqa: E402  (spike trains and GCaMP-like dF/F)

DEFAULT_SEED = 20180927  # Chen et al. 2018 online date; any integer works.

# ----------------------------------------------------------------------------------------------
# Subjects
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectSpec:
    subject: int
    fpsec: float  # frame (volume) rate, Hz
    n_frames: int  # T
    n_cells: int  # N: traces in CellResp
    n_planes: int  # Z
    frac_invalid: float  # fraction of numcell_full flagged in IX_inval_anat
    frac_dropped: float  # further fraction of numcell_full absent from absIX (e.g. failed QC)
    # The stimulus program: (name, stimulus codes, period in frames, repetitions) per stimulus set, shown one after
    # the other from frame 1 (the frames after the last are in no set). Empty: one Spontaneous set of every frame.
    stimulus_sets: tuple = ()


# Stimulus sets as Chen et al. name them; code 3 is the blank (spontaneous) screen
SPONTANEOUS, PHOTOTAXIS, OMR = ("Spontaneous", (3,)), ("PT", (1, 2)), ("OMR", (5, 6, 7, 8))
DARK_FLASH, LOOMING = ("DF", (4, 3)), ("Looming", (9, 10, 3))

# Long enough that the default split (330-frame blocks, 95 % train) leaves most timepoints for training; few
# cells, so that the files stay small and a run quick.
SUBJECTS = (
    SubjectSpec(1, 1.97, 1100, 550, 14, 0.07, 0.10, ((*SPONTANEOUS, 360, 1), (*PHOTOTAXIS, 60, 5), (*OMR, 48, 8))),
    SubjectSpec(2, 2.00, 1000, 500, 12, 0.06, 0.12),
    SubjectSpec(
        3, 2.56, 1200, 450, 17, 0.08, 0.09, ((*SPONTANEOUS, 240, 1), (*DARK_FLASH, 40, 10), (*LOOMING, 50, 10))
    ),
)
SUBJECT_BY_ID = {s.subject: s for s in SUBJECTS}

# The indicator: GCaMP6f as larval zebrafish light-sheet recordings at ~2 Hz see it. Per-spike peak dF/F (before the
# exposure's averaging), rise and decay time constants of the double exponential, drawn per cell (log-uniform).
# (Version 1.2.0's 0.05-0.5 dF/F and 0.5-2 s decays were GCaMP6s-like: CASCADE found 4x the true spikes.)
INDICATOR = dict(amplitude_range=(0.1, 0.3), rise_range_s=(0.02, 0.08), decay_range_s=(0.4, 0.7))

# The target noise level of a cell's noise alone: from the dimmest (F0 50 a.u.) to the brightest (600 a.u.) cells,
# jittered, clipped to [low, high]; what CASCADE measures, activity and baseline included, is ~15-25 % higher: a
# median ~2.8, 5-95 % ~1.4-4.8. CASCADE's rate in noise grows with the level (sample_data/README.md).
NOISE_LEVEL_TARGET = (3.7, 1.1, 1.0, 4.0)  # (dim, bright, low, high)

# Cell classes stored in the truth file (``cell_class``).
CLASS_NAMES = ("silent", "sparse", "bursty", "population")
SILENT, SPARSE, BURSTY, POPULATION = range(4)

# Raw fluorescence is quantised to multiples of 1/32 a.u. (far below the noise); this zeroes the
# low mantissa bits so that shuffle+gzip keeps the committed files small.
_QUANTUM = 1.0 / 32.0


def subject_rng(seed: int, subject: int) -> np.random.Generator:
    """Independent, reproducible stream per subject (regenerating one subject needs no others)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(subject)]))


# ----------------------------------------------------------------------------------------------
# Anatomy: a larval-zebrafish-brain-like union of ellipsoids in an atlas frame
# (Z-Brain-like extent: x rostro-caudal 0..1406, y left-right 0..621, z dorso-ventral 0..138)
# ----------------------------------------------------------------------------------------------

ATLAS_SHAPE = (1406.0, 621.0, 138.0)
# (centre x, y, z), (radius x, y, z)
_BRAIN_PARTS = (
    ((260.0, 310.0, 62.0), (150.0, 120.0, 42.0)),  # telencephalon
    ((560.0, 185.0, 50.0), (210.0, 130.0, 42.0)),  # left optic tectum
    ((560.0, 436.0, 50.0), (210.0, 130.0, 42.0)),  # right optic tectum
    ((520.0, 310.0, 88.0), (200.0, 110.0, 38.0)),  # diencephalon / tegmentum
    ((760.0, 310.0, 45.0), (90.0, 210.0, 30.0)),  # cerebellum
    ((1030.0, 310.0, 78.0), (360.0, 170.0, 50.0)),  # hindbrain
)
# Tissue that segmentation picks up but that is not brain (eyes, skin): these become IX_inval_anat.
_INVALID_PARTS = (
    ((380.0, 40.0, 70.0), (120.0, 40.0, 45.0)),  # left eye / skin
    ((380.0, 581.0, 70.0), (120.0, 40.0, 45.0)),  # right eye / skin
    ((1250.0, 310.0, 130.0), (160.0, 220.0, 12.0)),  # ventral skin near the spinal cord
)


def _inside(parts, x, y, z):
    m = np.zeros(x.shape, dtype=bool)
    for (cx, cy, cz), (rx, ry, rz) in parts:
        m |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0
    return m


def _sample_in(parts, n, plane_z, rng):
    """n points uniformly inside ``parts`` on the given atlas z levels (one per imaged plane)."""
    xs, ys, ks = [], [], []
    got = 0
    while got < n:
        m = 4 * (n - got) + 64
        x = rng.uniform(0.0, ATLAS_SHAPE[0], m)
        y = rng.uniform(0.0, ATLAS_SHAPE[1], m)
        k = rng.integers(0, len(plane_z), m)
        ok = _inside(parts, x, y, plane_z[k])
        xs.append(x[ok])
        ys.append(y[ok])
        ks.append(k[ok])
        got += int(ok.sum())
    return (np.concatenate(xs)[:n], np.concatenate(ys)[:n], np.concatenate(ks)[:n])


def make_anatomy(spec: SubjectSpec, rng: np.random.Generator, plane_range: tuple = (14.0, 128.0)):
    """Cell positions for one fish.

    The imaged planes span atlas z ``plane_range`` (each end shifted by up to +-3 per fish). With
    the default, the deepest plane can fall below the brain and hold only invalid (skin) cells;
    benchmarks/make_whole_fish.py passes a shallower range so that every plane has valid cells.

    Returns a dict with CellXYZ, CellXYZ_norm (numcell_full x 3), IX_inval_anat (1-based, sorted),
    absIX (1-based, sorted) and per-cell plane index (0-based) of the cells in absIX order.
    """
    Z = spec.n_planes
    # numcell_full such that N = numcell_full * (1 - frac_invalid - frac_dropped) (rounded up).
    numcell_full = int(np.ceil(spec.n_cells / (1.0 - spec.frac_invalid - spec.frac_dropped)))
    n_invalid = int(round(spec.frac_invalid * numcell_full))
    n_valid = numcell_full - n_invalid  # anatomically valid; n_cells of them are in absIX

    # Imaged planes: evenly spaced through the brain in atlas z, with a fish-specific offset.
    z_top = plane_range[0] + rng.uniform(-3.0, 3.0)
    z_bot = plane_range[1] + rng.uniform(-3.0, 3.0)
    plane_z = np.linspace(z_top, z_bot, Z)

    xv, yv, kv = _sample_in(_BRAIN_PARTS, n_valid, plane_z, rng)
    xi, yi, ki = _sample_in(_INVALID_PARTS, n_invalid, plane_z, rng)
    atlas_x = np.concatenate([xv, xi])
    atlas_y = np.concatenate([yv, yi])
    plane = np.concatenate([kv, ki])  # 0-based plane index
    atlas_z = plane_z[plane] + rng.normal(0.0, 1.2, numcell_full)  # light-sheet thickness
    invalid = np.concatenate([np.zeros(n_valid, bool), np.ones(n_invalid, bool)])

    # Fish pixel frame: rotate/scale/shift the atlas xy (the fish's pose under the microscope).
    theta = np.deg2rad(rng.uniform(-6.0, 6.0))
    sx, sy = rng.uniform(0.86, 0.92), rng.uniform(0.84, 0.92)
    c, s = np.cos(theta), np.sin(theta)
    ax = atlas_x - ATLAS_SHAPE[0] / 2
    ay = atlas_y - ATLAS_SHAPE[1] / 2
    row = sx * (c * ax - s * ay) + 650.0 + rng.uniform(-20.0, 20.0)
    col = sy * (s * ax + c * ay) + 300.0 + rng.uniform(-12.0, 12.0)
    row = np.clip(np.round(row), 1.0, 1300.0)
    col = np.clip(np.round(col), 1.0, 600.0)
    # No two cells share a (row, column, plane) position: move duplicates one column over.
    while True:
        key = (plane * 1301 + row) * 601 + col
        _, first = np.unique(key, return_index=True)
        dup = np.setdiff1d(np.arange(key.size), first)
        if dup.size == 0:
            break
        col[dup] = np.where(col[dup] < 600.0, col[dup] + 1.0, col[dup] - 1.0)

    # Segmentation order: plane by plane, then by row and column (valid and invalid interleaved).
    order = np.lexsort((col, row, plane))
    row, col, plane = row[order], col[order], plane[order]
    atlas = np.stack([atlas_x, atlas_y, atlas_z], axis=1)[order]
    invalid = invalid[order]

    cell_xyz = np.stack([row, col, plane + 1.0], axis=1).astype(np.float64)
    # Registered coordinates: the atlas position plus registration error.
    # As Chen's: 1-based integer voxel indices into the atlas (Z-Brain: 1406 x 621 x 138 voxels).
    cell_xyz_norm = atlas + rng.normal(0.0, [3.0, 3.0, 1.5], atlas.shape)
    cell_xyz_norm = np.clip(np.round(cell_xyz_norm), 1.0, ATLAS_SHAPE)

    ix_inval = np.flatnonzero(invalid) + 1  # 1-based
    valid_idx = np.flatnonzero(~invalid)
    keep = np.sort(rng.choice(valid_idx, spec.n_cells, replace=False))
    abs_ix = keep + 1  # 1-based

    return {
        "CellXYZ": cell_xyz,
        "CellXYZ_norm": cell_xyz_norm,
        "IX_inval_anat": ix_inval.astype(np.float64),
        "absIX": abs_ix.astype(np.float64),
        "plane": plane[keep].astype(np.int64),
        "numcell_full": numcell_full,
        "plane_z_atlas": plane_z,
        "atlas_xyz": atlas[keep],
    }


# ----------------------------------------------------------------------------------------------
# Activity: spike trains and GCaMP-like dF/F from tools/synthetic_calcium.py, then raw fluorescence
# (baseline F0, bleaching and slow drift, shot and readout noise) on top
# ----------------------------------------------------------------------------------------------


def make_spike_counts(spec: SubjectSpec, anat: dict, rng: np.random.Generator):
    """Spikes per frame (N, T) for the N cells, each cell's class and the population event times.

    Frame k covers [k / fpsec, (k + 1) / fpsec) (synthetic_calcium's convention)."""
    N, T, fps = spec.n_cells, spec.n_frames, spec.fpsec
    duration = T / fps
    x_atlas = anat["atlas_xyz"][:, 0]

    # Class per cell; coupling to population events is more common in the hindbrain (x > 800).
    p_pop = np.where(x_atlas > 800.0, 0.22, 0.08)
    u = rng.uniform(size=N)
    cls = np.full(N, SPARSE)
    cls[u < 0.10] = SILENT
    cls[(u >= 0.10) & (u < 0.24)] = BURSTY
    cls[(u >= 0.24) & (u < 0.24 + p_pop)] = POPULATION

    counts = np.zeros((N, T), dtype=np.int64)
    rows = np.flatnonzero(cls == SPARSE)
    counts[rows] = sc.simulate_spike_trains(
        rows.size, T, fps, rng, mean_rate_range_hz=(0.02, 0.5), bursty_fraction=0.0, rate_modulation_range=(0.0, 1.0)
    )
    rows = np.flatnonzero(cls == BURSTY)
    counts[rows] = sc.simulate_spike_trains(rows.size, T, fps, rng, **BURSTY_TRAINS)
    rows = np.flatnonzero(cls == POPULATION)
    counts[rows] = sc.simulate_spike_trains(rows.size, T, fps, rng, mean_rate_range_hz=(0.01, 0.1), bursty_fraction=0.0)

    # Whole-brain population events (swim-bout-like) at shared times >= 12 s apart (mean 30 s):
    # each active cell joins an event with a per-cell probability (coupled cells often, others
    # rarely) and fires a short burst locked to it.
    event_t = rng.uniform(0.0, 12.0) + np.cumsum(12.0 + rng.exponential(18.0, 64))
    event_t = event_t[event_t < duration - 5.0]
    event_strength = rng.uniform(0.4, 1.0, event_t.size)
    active = np.flatnonzero(cls != SILENT)
    p_join = np.where(cls[active] == POPULATION, rng.uniform(0.5, 0.95, active.size), 0.08)
    for te, st in zip(event_t, event_strength):
        joins = active[rng.uniform(size=active.size) < p_join * st]
        k = 1 + rng.poisson(2.5 * st, joins.size)
        cell = np.repeat(joins, k)
        onset = np.repeat(te + rng.normal(0.15, 0.2, joins.size), k)
        t = onset + rng.exponential(0.25, cell.size)
        frame = np.floor(t * fps).astype(np.int64)
        ok = (frame >= 0) & (frame < T)
        np.add.at(counts, (cell[ok], frame[ok]), 1)

    counts[cls == SILENT] = 0
    return np.minimum(counts, 255).astype(np.uint8), cls, event_t


# ----------------------------------------------------------------------------------------------
# Stimulus and behaviour, as data_full.mat holds them: stim_full (1 x T codes), timelists (1 x n cell of 1-based
# frames per stimulus set), timelists_names, periods (frames per repetition), stimset (struct array: name, pattern),
# Behavior_full (5 x T motor channels) and Eye_full (2 x T). Drawn from their own random stream, so they change
# nothing else; the activity does not respond to the stimulus, but swim bouts follow the population events.
# ----------------------------------------------------------------------------------------------


def make_covariates(spec: SubjectSpec, seed: int, event_t: np.ndarray) -> dict:
    """The stimulus and behaviour fields of one fish (its stimulus_sets, or one Spontaneous set of every frame)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(spec.subject), 1]))
    T, fps = spec.n_frames, spec.fpsec
    program = spec.stimulus_sets or ((*SPONTANEOUS, T, 1),)
    stim, timelists, start = np.full(T, 3.0), [], 0
    for _, codes, period, repetitions in program:
        frames = np.arange(start, start + period * repetitions)
        assert frames[-1] < T, f"subject {spec.subject}: the stimulus program needs more than {T} frames"
        stim[frames] = np.asarray(codes, float)[(np.arange(frames.size) % period) * len(codes) // period]
        timelists.append(frames + 1.0)  # 1-based, as MATLAB indexes
        start = frames[-1] + 1
    # Swim bouts (fictive motor output): at most population events and at random, 1-3 frames long.
    onsets = np.concatenate([np.floor(event_t * fps), rng.uniform(0, T, rng.poisson(T / fps / 40.0))]).astype(int)
    left, right = np.zeros(T), np.zeros(T)
    for onset in onsets[(onsets >= 0) & (onsets < T)]:
        length, strength, bias = rng.integers(1, 4), rng.lognormal(0.0, 0.4), rng.uniform(-0.6, 0.6)
        left[onset : onset + length] += strength * (1 + bias)
        right[onset : onset + length] += strength * (1 - bias)
    left, right = (np.abs(c + rng.normal(0, 0.02, T)) for c in (left, right))
    behavior = np.stack([left, right, np.minimum(left, right), left - right, left + right])
    # Eye positions (degrees): slow drift with saccades every ~5 s, the eyes moving together.
    saccades = np.cumsum(np.where(rng.uniform(size=T) < 1 / (5 * fps), rng.normal(0, 8, T), 0.0))
    eye = np.stack([saccades + rng.normal(0, 0.5, T) + 10, saccades + rng.normal(0, 0.5, T) - 10])
    return {
        "stim_full": stim[None, :],
        "timelists": timelists,
        "timelists_names": [name for name, *_ in program],
        "periods": np.array([float(period) for *_, period, _ in program]),
        "stimset": [(name, np.asarray(codes, float)) for name, codes, *_ in program],
        "Behavior_full": np.round(behavior, 4),
        "Eye_full": np.round(eye, 3),
    }


def make_subject(spec: SubjectSpec, seed: int = DEFAULT_SEED) -> dict:
    """Generate every array of one subject (nothing is written)."""
    rng = subject_rng(seed, spec.subject)
    anat = make_anatomy(spec, rng)
    N, T, fps, Z = spec.n_cells, spec.n_frames, spec.fpsec, spec.n_planes
    plane = anat["plane"]

    counts, cls, event_t = make_spike_counts(spec, anat, rng)

    # GCaMP6f-like kernels (INDICATOR). Light-sheet timing: plane z (0-based) of volume k is exposed for
    # ~0.8/Z of the volume period starting at (k + z/Z) / fpsec.
    params = sc.draw_kernel_params(N, rng, **INDICATOR)
    params.exposure_fraction = np.full(N, 0.8 / Z)
    params.exposure_offset = plane / Z
    dff_true = sc.simulate_dff(counts, fps, 0.0, rng, params=params, drift=False)
    dff_true = dff_true.astype(np.float64)

    # Raw fluorescence: baseline F0 (a.u.), bleaching and slow drift.
    f0, bleach, drift = fluorescence_drift(rng, N, T, fps, plane, Z)
    baseline = f0[:, None] * drift

    # Noise: a target CASCADE noise level per cell (dimmer cells noisier), split into shot-like
    # noise (variance = gain * F) and camera readout noise (constant sd per fish). The target is
    # that of the noise alone against the true baseline; dF/F against an estimated (low
    # percentile) baseline, with the activity, measures ~15-25 % higher: ~1.5-5 (NOISE_LEVEL_TARGET).
    u = (np.log(f0) - np.log(50.0)) / (np.log(600.0) - np.log(50.0))
    dim, bright, low, high = NOISE_LEVEL_TARGET
    nl_target = np.clip((dim - (dim - bright) * u) * np.exp(rng.normal(0.0, 0.15, N)), low, high)
    sigma_rel = sc.noise_sigma_for_level(nl_target, fps)
    readout_sd = float(rng.uniform(0.8, 1.5))
    var_total = (sigma_rel * f0) ** 2
    gain = np.maximum(var_total - readout_sd**2, 0.05 * var_total) / f0

    f_clean = baseline * (1.0 + dff_true)
    noise = rng.standard_normal((N, T)) * np.sqrt(gain[:, None] * f_clean)
    noise += rng.standard_normal((N, T)) * readout_sd
    f_raw = np.round((f_clean + noise) / _QUANTUM) * _QUANTUM
    f_raw = np.maximum(f_raw, _QUANTUM).astype(np.float32)

    return {
        "spec": spec,
        "seed": int(seed),
        "anat": anat,
        "covariates": make_covariates(spec, seed, event_t),
        "CellResp": np.ascontiguousarray(f_raw.T),  # (T, N) as h5py sees Chen's files
        "spike_counts": counts,  # (N, T) uint8
        "dff_true": dff_true,
        "truth": {
            "cell_class": cls.astype(np.uint8),
            "plane": plane.astype(np.int16),
            "CellXYZ": anat["CellXYZ"][anat["absIX"].astype(np.int64) - 1],
            "CellXYZ_norm": anat["CellXYZ_norm"][anat["absIX"].astype(np.int64) - 1],
            "F0": f0,
            "bleach_fraction": bleach,
            "spike_amplitude_dff": params.amplitude,
            "tau_rise_s": params.rise_s,
            "tau_decay_s": params.decay_s,
            "supralinearity": params.supralinearity,
            "saturation": params.saturation,
            "exposure_offset": params.exposure_offset,  # fraction of the frame
            "exposure_fraction": params.exposure_fraction,  # of the frame
            "shot_noise_gain": gain,
            "noise_level_target": nl_target,
        },
        "population_event_times_s": event_t,
        "readout_noise_sd": readout_sd,
    }


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: tools/make_sample_data.py".ljust(116)


# Spike trains of the bursty class (shared with benchmarks/make_whole_fish.py).
BURSTY_TRAINS = dict(
    mean_rate_range_hz=(0.08, 0.4),
    bursty_fraction=1.0,
    burst_spike_fraction_range=(0.7, 0.95),
    mean_burst_size_range=(2.5, 6.0),
    burst_duration_range_s=(0.2, 1.0),
    rate_modulation_range=(0.3, 1.0),
)


def fluorescence_drift(rng, num_cells: int, num_frames: int, fps: float, plane: np.ndarray, num_planes: int) -> tuple:
    """Baseline F0 per cell (a.u., log-uniform 50-600), bleached fraction and the slow drift (T,) per cell: bleaching
    (up to 10 % over the recording) and three slow sinusoids, sampled at each plane's own time."""
    f0 = np.exp(rng.uniform(np.log(50.0), np.log(600.0), num_cells))
    duration = num_frames / fps
    tt = (np.arange(num_frames)[None, :] + plane[:, None] / num_planes) / fps
    bleach = rng.uniform(0.0, 0.10, num_cells)  # fractional loss over the recording
    tau_bleach = rng.uniform(0.5, 2.0, num_cells) * duration
    drift = 1.0 - bleach[:, None] * (1.0 - np.exp(-tt / tau_bleach[:, None])) / (
        1.0 - np.exp(-duration / tau_bleach[:, None])
    )
    for _ in range(3):
        period = rng.uniform(60.0, 300.0, num_cells)
        phase = rng.uniform(0.0, 2 * np.pi, num_cells)
        a = rng.uniform(0.0, 0.015, num_cells)
        drift *= 1.0 + a[:, None] * np.sin(2 * np.pi * tt / period[:, None] + phase[:, None])
    return f0, bleach, drift


def mat_cells(covariates: dict) -> dict:
    """The stimulus fields as savemat writes MATLAB's types: lists -> 1 x n cell arrays, stimset -> a 1 x n struct
    array of name and pattern (a 1 x 1 cell or struct, when n is 1, is what the real single-set fish hold)."""
    converted = dict(covariates)
    for key in ("timelists", "timelists_names"):
        cell = np.empty((1, len(covariates[key])), dtype=object)
        for i, item in enumerate(covariates[key]):
            cell[0, i] = item if isinstance(item, str) else np.atleast_2d(item)
        converted[key] = cell
    struct = np.zeros((1, len(covariates["stimset"])), dtype=[("name", object), ("pattern", object)])
    for i, (name, pattern) in enumerate(covariates["stimset"]):
        struct[0, i] = (name, np.atleast_2d(pattern))
    converted["stimset"] = struct
    converted["periods"] = np.atleast_2d(covariates["periods"])
    return converted


def write_data_full(mat_path, anat: dict, spec, num_cells: int, num_frames: int, fish_name: str, description: str,
                    header: bytes, covariates: dict | None = None) -> None:  # fmt: skip
    """data_full.mat (MATLAB v5) with Chen's struct `data` (and the stimulus and behaviour fields of
    make_covariates, if given), byte-identical from run to run: savemat stamps the creation time into the
    116-byte text header, which is overwritten with ``header``."""
    data = {
        "CellXYZ": anat["CellXYZ"],
        "CellXYZ_norm": anat["CellXYZ_norm"],
        "IX_inval_anat": anat["IX_inval_anat"][:, None],
        "fpsec": float(spec.fpsec),
        "numcell_full": float(anat["numcell_full"]),
        "numcell": float(num_cells),
        "numplane": float(spec.n_planes),
        "periods": float(num_frames),
        "timeBlockStartIx": np.array([[1.0]]),
        "FishName": fish_name,
        "Description": description,
        **(mat_cells(covariates) if covariates else {}),
    }
    scipy.io.savemat(mat_path, {"data": data}, do_compression=True, oned_as="column")
    with open(mat_path, "r+b") as fh:
        fh.write(header)


_DFF_QUANTUM = 1.0 / 1024.0  # dff_true is stored rounded to this (keeps the file small)
_GZ = dict(compression="gzip", compression_opts=9, shuffle=True, track_times=False)


def write_subject(out_dir: str, sub: dict) -> str:
    spec: SubjectSpec = sub["spec"]
    anat = sub["anat"]
    d = os.path.join(out_dir, f"subject_{spec.subject}")
    os.makedirs(d, exist_ok=True)
    T, N = sub["CellResp"].shape

    with h5py.File(os.path.join(d, "TimeSeries.h5"), "w", track_order=False) as f:
        f.create_dataset("CellResp", data=sub["CellResp"], chunks=(T, min(N, 100)), **_GZ)
        f.create_dataset("absIX", data=anat["absIX"][None, :], **_GZ)

    write_data_full(
        os.path.join(d, "data_full.mat"), anat, spec, N, T, f"synthetic_subject_{spec.subject}",
        "Synthetic sample in the Chen et al. 2018 layout (tools/make_sample_data.py)", _MAT_HEADER, sub["covariates"],
    )  # fmt: skip

    tr = sub["truth"]
    with h5py.File(os.path.join(d, "ground_truth_spikes.h5"), "w") as f:
        f.create_dataset("spike_counts", data=sub["spike_counts"], chunks=(min(N, 100), T), **_GZ)
        dff_q = (np.round(sub["dff_true"] / _DFF_QUANTUM) * _DFF_QUANTUM).astype(np.float32)
        f.create_dataset("dff_true", data=dff_q, chunks=(min(N, 100), T), **_GZ)
        g = f.create_group("cells")
        for k, v in tr.items():
            g.create_dataset(k, data=np.asarray(v), **_GZ)
        f.create_dataset("population_event_times_s", data=sub["population_event_times_s"], **_GZ)
        f.attrs["frame_rate_hz"] = float(spec.fpsec)
        f.attrs["seed"] = int(sub["seed"])
        f.attrs["subject"] = int(spec.subject)
        f.attrs["n_cells"] = int(N)
        f.attrs["n_frames"] = int(T)
        f.attrs["readout_noise_sd"] = float(sub["readout_noise_sd"])
        f.attrs["cell_class_names"] = ",".join(CLASS_NAMES)
        f.attrs["description"] = (
            "True spikes of the synthetic sample. spike_counts[i, k] = number of spikes of the cell "
            "in CellResp column i (row absIX[i] of CellXYZ) inside frame k, i.e. in "
            "[k, k + 1) / frame_rate_hz (tools/synthetic_calcium.py convention). The cell's plane "
            "(cells/plane, 0-based) is exposed from (k + plane / numplane) / frame_rate_hz for "
            "0.8 / numplane of the frame, so a spike late in frame k may first show in frame k + 1. "
            "dF/F = amplitude * c * (1 + supralinearity * c) / (1 + c / saturation), c = spikes "
            "convolved with exp(-t/tau_decay_s) - exp(-t/tau_rise_s) (peak 1), averaged over the "
            "exposure; dff_true holds that noise-free dF/F, (N, T), rounded to 1/1024. "
            "CellResp (raw fluorescence) = F0 * drift(t) * (1 + dF/F) + shot noise "
            "(variance shot_noise_gain * F) + readout noise (sd readout_noise_sd), quantised to "
            "1/32 a.u.; drift = bleaching (bleach_fraction lost over the recording) times slow "
            "sinusoids of <= 1.5 %. Per-cell parameters are in /cells, in CellResp column order "
            "(cells/CellXYZ and cells/CellXYZ_norm = data.CellXYZ[absIX - 1], data.CellXYZ_norm"
            "[absIX - 1]: each trace's true position) "
            f"(cell_class: {', '.join(f'{i}={n}' for i, n in enumerate(CLASS_NAMES))})."
        )
    return d


def summarize(sub: dict) -> dict:
    spec = sub["spec"]
    F = sub["CellResp"].T.astype(np.float64)  # (N, T)
    # dF/F against a simple 8th-percentile baseline per cell (what a pipeline would roughly do)
    f0 = np.percentile(F, 8, axis=1, keepdims=True)
    nl = sc.cascade_noise_level((F - f0) / f0, spec.fpsec)
    duration = spec.n_frames / spec.fpsec
    rates = sub["spike_counts"].sum(axis=1) / duration
    return {
        "subject": spec.subject,
        "N": spec.n_cells,
        "T": spec.n_frames,
        "fpsec": spec.fpsec,
        "numcell_full": sub["anat"]["numcell_full"],
        "noise_min": float(nl.min()),
        "noise_p5": float(np.percentile(nl, 5)),
        "noise_median": float(np.median(nl)),
        "noise_p95": float(np.percentile(nl, 95)),
        "noise_max": float(nl.max()),
        "mean_rate_hz": float(rates.mean()),
        "frac_silent": float((rates == 0).mean()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="sample_data", help="output folder (default: sample_data)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--subjects", type=int, nargs="*", default=[s.subject for s in SUBJECTS])
    args = ap.parse_args(argv)
    for n in args.subjects:
        sub = make_subject(SUBJECT_BY_ID[n], args.seed)
        d = write_subject(args.out, sub)
        s = summarize(sub)
        print(
            f"{d}: N={s['N']} (numcell_full={s['numcell_full']}) T={s['T']} fpsec={s['fpsec']} "
            f"noise {s['noise_min']:.2f}..{s['noise_max']:.2f} (p5 {s['noise_p5']:.2f}, median "
            f"{s['noise_median']:.2f}, p95 {s['noise_p95']:.2f}) mean rate "
            f"{s['mean_rate_hz']:.3f} Hz, silent {100 * s['frac_silent']:.0f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
