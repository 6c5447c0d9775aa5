#!/usr/bin/env python3
"""Generate a whole-fish-sized synthetic subject in the Chen et al. 2018 layout, in bounded memory.

``tools/make_sample_data.py`` builds a subject entirely in memory (several (N, T) float64 arrays),
which is fine for the 1,500-cell samples but runs out of 24 GB at the size of a real fish
(~90,000 cells x ~4,000 frames). This script writes the same kind of subject a block of cells at a
time: the anatomy (positions of every cell, ~100k rows) is made up front, then the activity of
``BLOCK_CELLS`` cells at a time is simulated and streamed into a chunked ``CellResp`` dataset, so
peak memory is set by the block, not by the fish (~0.6 GB whatever the number of cells).

Writes ``<out>/subject_<n>/``:

``TimeSeries.h5``
    ``CellResp`` h5py shape (T, N) float32, raw fluorescence (a.u.), chunked (T, 256) (a chunk is
    all frames of 256 cells, so reading a block of cells, as the pipeline does, reads whole
    chunks), gzip level 1 + shuffle by default (``--compression``); ``absIX`` (1, N) float64,
    1-based rows into ``data.CellXYZ``.
``data_full.mat``
    MATLAB v5 struct ``data``: ``CellXYZ`` and ``CellXYZ_norm`` (numcell_full x 3), ``IX_inval_anat``
    (1-based), ``fpsec``, ``numcell_full``, ``numcell``, ``numplane``, names, and the stimulus and behaviour
    fields of ``tools/make_sample_data.make_covariates`` (``stim_full``, ``timelists``, ``timelists_names``,
    ``periods``, ``stimset``, ``Behavior_full`` 5 x T, ``Eye_full`` 2 x T) for the stimulus sets of
    ``STIMULUS_SETS`` that fit the recording, one after the other.
``ground_truth_spikes.h5`` (only with ``--ground_truth``)
    ``spike_counts`` (N, T) uint8 true spikes per frame, ``cells/cell_class``, ``cells/plane``,
    ``cells/F0``.

The model is ``tools/make_sample_data.py``'s: anatomy from its ``make_anatomy`` (cells in
``--planes`` z-planes of a brain-shaped union of ellipsoids, eyes/skin cells in IX_inval_anat,
~10 % further cells not in absIX), cell classes (silent, sparse, bursty, coupled to whole-brain
population events), spike trains and GCaMP-like dF/F from ``tools/synthetic_calcium.py``, raw
fluorescence with bleaching, drift, shot and readout noise, quantised to 1/32 a.u. Differences,
for speed and bounded memory: the population-event times are drawn once per fish and each block
draws which of its cells join them; the fine time grid of the dF/F simulation is
``--fine_rate_hz`` (default 20 Hz, i.e. ~10 samples per frame at 2 Hz, instead of 100 Hz: the
light-sheet exposure of a plane is then one tenth of a frame instead of 0.8/Z of it).

Reproducible: the anatomy, the per-fish draws and every block have their own random stream
(``SeedSequence([seed, subject, stream, block])``); ``BLOCK_CELLS`` is a constant, so the same
arguments give the same arrays on any machine (with the same numpy/scipy). With the builtin
CASCADE model and ``--spike_mode sample`` the pipeline finds ~12 % of neuron-frames active (the
whole-fish run of issue 8: 59 M spikes in 360 M neuron-frames, 16 %).

Whole fish (~4 min, ~0.6 GB peak RSS on one core) and a 1/10 fish::

    python benchmarks/make_whole_fish.py --out /work/data/whole_fish
    python benchmarks/make_whole_fish.py --out /work/data/tenth_fish --cells 9000

Prints its own wall time and peak RSS, and ``--check`` verifies an existing subject folder
(shapes, dtypes, chunking, absIX range, a few columns against a regeneration) without loading it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import scipy.io

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tools import make_sample_data as msd  # noqa: E402
from tools import synthetic_calcium as sc  # noqa: E402

BLOCK_CELLS = 1024  # cells simulated (and random stream) per block; fixed so outputs are reproducible
CHUNK_CELLS = 256  # CellResp chunk: (T, 256) float32 = 4 MB at T = 4000
STREAM_ANATOMY, STREAM_FISH, STREAM_BLOCK = 0, 1, 2
# Atlas z of the first and last imaged plane (+-3 per fish): the last one stays inside the hindbrain
# and diencephalon, so all --planes planes hold valid cells (make_sample_data's default, 128, can
# put the deepest plane below the brain, leaving one plane fewer in the grid).
PLANE_RANGE = (14.0, 122.0)
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: benchmarks/make_whole_fish.py".ljust(116)


def _rng(seed: int, subject: int, stream: int, block: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(subject), stream, block]))


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def fish_draws(spec: msd.SubjectSpec, seed: int) -> dict:
    """Per-fish random quantities shared by all blocks: population events and readout noise."""
    rng = _rng(seed, spec.subject, STREAM_FISH)
    duration = spec.n_frames / spec.fpsec
    # Whole-brain population events (swim-bout-like) >= 12 s apart (mean 30 s), as make_sample_data
    n_max = int(duration / 12.0) + 2
    event_t = rng.uniform(0.0, 12.0) + np.cumsum(12.0 + rng.exponential(18.0, n_max))
    event_t = event_t[event_t < duration - 5.0]
    return {
        "event_t": event_t,
        "event_strength": rng.uniform(0.4, 1.0, event_t.size),
        "readout_sd": float(rng.uniform(0.8, 1.5)),
    }


def block_spike_counts(spec, x_atlas: np.ndarray, fish: dict, rng: np.random.Generator):
    """Spikes per frame (n, T) uint8 and the class of each of a block's cells
    (tools/make_sample_data.make_spike_counts, with the fish's shared event times)."""
    n, T, fps = x_atlas.size, spec.n_frames, spec.fpsec
    p_pop = np.where(x_atlas > 800.0, 0.22, 0.08)  # coupling to events: more in the hindbrain
    u = rng.uniform(size=n)
    cls = np.full(n, msd.SPARSE)
    cls[u < 0.10] = msd.SILENT
    cls[(u >= 0.10) & (u < 0.24)] = msd.BURSTY
    cls[(u >= 0.24) & (u < 0.24 + p_pop)] = msd.POPULATION

    counts = np.zeros((n, T), dtype=np.int64)
    kinds = (
        (msd.SPARSE, dict(mean_rate_range_hz=(0.02, 0.5), bursty_fraction=0.0, rate_modulation_range=(0.0, 1.0))),
        (msd.BURSTY, msd.BURSTY_TRAINS),
        (msd.POPULATION, dict(mean_rate_range_hz=(0.01, 0.1), bursty_fraction=0.0)),
    )
    for kind, kwargs in kinds:
        rows = np.flatnonzero(cls == kind)
        if rows.size:
            counts[rows] = sc.simulate_spike_trains(rows.size, T, fps, rng, **kwargs)

    active = np.flatnonzero(cls != msd.SILENT)
    p_join = np.where(cls[active] == msd.POPULATION, rng.uniform(0.5, 0.95, active.size), 0.08)
    for te, st in zip(fish["event_t"], fish["event_strength"]):
        joins = active[rng.uniform(size=active.size) < p_join * st]
        k = 1 + rng.poisson(2.5 * st, joins.size)
        cell = np.repeat(joins, k)
        onset = np.repeat(te + rng.normal(0.15, 0.2, joins.size), k)
        frame = np.floor((onset + rng.exponential(0.25, cell.size)) * fps).astype(np.int64)
        ok = (frame >= 0) & (frame < T)
        np.add.at(counts, (cell[ok], frame[ok]), 1)
    counts[cls == msd.SILENT] = 0
    return np.minimum(counts, 255).astype(np.uint8), cls


def block_fluorescence(spec, plane: np.ndarray, counts: np.ndarray, fish: dict, rng, fine_rate_hz: float):
    """Raw fluorescence (n, T) float32 of a block of cells (tools/make_sample_data.make_subject)."""
    n, T = counts.shape
    fps, Z = spec.fpsec, spec.n_planes
    params = sc.draw_kernel_params(
        n, rng, amplitude_range=(0.05, 0.5), rise_range_s=(0.1, 0.2), decay_range_s=(0.5, 2.0)
    )
    params.exposure_fraction = np.full(n, 0.8 / Z)
    params.exposure_offset = plane / Z
    dff = sc.simulate_dff(counts, fps, 0.0, rng, params=params, fine_rate_hz=fine_rate_hz, drift=False)

    f0, _, drift = msd.fluorescence_drift(rng, n, T, fps, plane, Z)

    u = (np.log(f0) - np.log(50.0)) / (np.log(600.0) - np.log(50.0))
    nl_target = np.clip((6.2 - 4.4 * u) * np.exp(rng.normal(0.0, 0.15, n)), 1.6, 6.6)
    sigma_rel = sc.noise_sigma_for_level(nl_target, fps)
    readout_sd = fish["readout_sd"]
    var_total = (sigma_rel * f0) ** 2
    gain = np.maximum(var_total - readout_sd**2, 0.05 * var_total) / f0

    f = drift  # reuse the buffer: F_clean = F0 * drift * (1 + dF/F)
    f *= f0[:, None]
    f *= 1.0 + dff
    del dff
    noise = rng.standard_normal((n, T))
    noise *= np.sqrt(gain[:, None] * f)
    f += noise
    f += rng.standard_normal((n, T)) * readout_sd
    del noise
    f = np.round(f / msd._QUANTUM) * msd._QUANTUM  # noqa: SLF001 (the sample data's quantum)
    return np.maximum(f, msd._QUANTUM).astype(np.float32), f0  # noqa: SLF001


# A real fish's program (about 4,000 frames): (name, codes, period in frames, repetitions); those that fit are used
STIMULUS_SETS = (
    (*msd.SPONTANEOUS, 600, 1), (*msd.PHOTOTAXIS, 120, 8), (*msd.OMR, 96, 10), (*msd.DARK_FLASH, 60, 10),
    (*msd.LOOMING, 80, 10),
)  # fmt: skip


def stimulus_program(num_frames: int) -> tuple:
    """The first sets of STIMULUS_SETS that fit ``num_frames`` frames (at least one Spontaneous set of them all)."""
    program, used = [], 0
    for name, codes, period, repetitions in STIMULUS_SETS:
        if used + period * repetitions > num_frames:
            break
        program.append((name, codes, period, repetitions))
        used += period * repetitions
    return tuple(program)


def make_fish(args) -> Path:
    spec = msd.SubjectSpec(
        args.subject, args.fps, args.frames, args.cells, args.planes, args.frac_invalid, args.frac_dropped,
        stimulus_program(args.frames),
    )  # fmt: skip
    subject_dir = Path(args.out) / f"subject_{spec.subject}"
    subject_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    anat = msd.make_anatomy(spec, _rng(args.seed, spec.subject, STREAM_ANATOMY), PLANE_RANGE)
    fish = fish_draws(spec, args.seed)
    N, T = spec.n_cells, spec.n_frames
    print(
        f"{subject_dir}: {N} cells (numcell_full {anat['numcell_full']}) x {T} frames at {spec.fpsec} Hz, "
        f"{spec.n_planes} planes, {fish['event_t'].size} population events; anatomy in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )

    compression = {} if args.compression == "none" else dict(compression="gzip", shuffle=True)
    if args.compression.startswith("gzip"):
        compression["compression_opts"] = int(args.compression[4:] or 1)
    chunk = (T, min(N, CHUNK_CELLS))
    truth = None
    series_tmp = subject_dir / "TimeSeries.h5.partial"
    with h5py.File(series_tmp, "w") as h5:
        cell_resp = h5.create_dataset("CellResp", shape=(T, N), dtype=np.float32, chunks=chunk, **compression)
        h5.create_dataset("absIX", data=anat["absIX"][None, :])
        h5.attrs["generator"] = "benchmarks/make_whole_fish.py"
        h5.attrs["generator_args"] = json.dumps(vars(args))
        if args.ground_truth:
            truth = h5py.File(subject_dir / "ground_truth_spikes.h5", "w")
            spikes_ds = truth.create_dataset(
                "spike_counts", shape=(N, T), dtype=np.uint8, chunks=(min(N, CHUNK_CELLS), T), **compression
            )
            classes, f0_all = np.zeros(N, np.uint8), np.zeros(N)
        num_blocks = -(-N // BLOCK_CELLS)
        total_spikes = 0
        for block in range(num_blocks):
            rows = slice(block * BLOCK_CELLS, min(N, (block + 1) * BLOCK_CELLS))
            rng = _rng(args.seed, spec.subject, STREAM_BLOCK, block)
            counts, cls = block_spike_counts(spec, anat["atlas_xyz"][rows, 0], fish, rng)
            fluorescence, f0 = block_fluorescence(spec, anat["plane"][rows], counts, fish, rng, args.fine_rate_hz)
            cell_resp[:, rows] = fluorescence.T
            total_spikes += int(counts.sum(dtype=np.int64))
            if truth is not None:
                spikes_ds[rows] = counts
                classes[rows], f0_all[rows] = cls, f0
            if block % max(1, num_blocks // 10) == 0 or block == num_blocks - 1:
                elapsed = time.perf_counter() - started
                print(
                    f"  block {block + 1}/{num_blocks}: {rows.stop} cells in {elapsed:.0f} s, "
                    f"peak RSS {peak_rss_gb():.2f} GB",
                    flush=True,
                )
        h5.attrs["true_spikes"] = total_spikes
    if truth is not None:
        group = truth.create_group("cells")
        group.create_dataset("cell_class", data=classes)
        group.create_dataset("plane", data=anat["plane"].astype(np.int16))
        group.create_dataset("F0", data=f0_all)
        truth.create_dataset("population_event_times_s", data=fish["event_t"])
        truth.attrs["frame_rate_hz"] = float(spec.fpsec)
        truth.attrs["cell_class_names"] = ",".join(msd.CLASS_NAMES)
        truth.close()
    os.replace(series_tmp, subject_dir / "TimeSeries.h5")

    msd.write_data_full(
        subject_dir / "data_full.mat", anat, spec, N, T, f"synthetic_whole_fish_{spec.subject}",
        "Synthetic whole fish in the Chen et al. 2018 layout (benchmarks/make_whole_fish.py)", _MAT_HEADER,
        msd.make_covariates(spec, args.seed, fish["event_t"]),
    )  # fmt: skip

    elapsed = time.perf_counter() - started
    size = sum(p.stat().st_size for p in subject_dir.iterdir() if p.is_file())
    print(
        f"done: {N} cells x {T} frames ({N * T / 1e6:.0f} M neuron-frames, {total_spikes:,} true spikes, "
        f"{total_spikes / (N * T):.3f}/neuron-frame) in {elapsed:.0f} s; peak RSS {peak_rss_gb():.2f} GB; "
        f"{size / 1e9:.2f} GB on disk in {subject_dir}",
        flush=True,
    )
    return subject_dir


def check_fish(subject_dir: Path) -> None:
    """Validate a generated folder without loading CellResp whole, and compare its first and last
    block of cells with a regeneration from the arguments recorded in TimeSeries.h5."""
    with h5py.File(subject_dir / "TimeSeries.h5", "r") as h5:
        cell_resp, abs_ix = h5["CellResp"], h5["absIX"][()]
        args = argparse.Namespace(**json.loads(h5.attrs["generator_args"]))
        T, N = cell_resp.shape
        assert (T, N) == (args.frames, args.cells), "CellResp shape differs from the recorded arguments"
        print(
            f"CellResp {cell_resp.shape} {cell_resp.dtype}, chunks {cell_resp.chunks}, "
            f"compression {cell_resp.compression} {cell_resp.compression_opts}; absIX {abs_ix.shape} {abs_ix.dtype}"
        )
        assert cell_resp.dtype == np.float32 and cell_resp.ndim == 2
        assert abs_ix.shape == (1, N)
        data = scipy.io.loadmat(subject_dir / "data_full.mat", squeeze_me=True)["data"]
        xyz = np.asarray(data["CellXYZ"].item(), dtype=float)
        xyz_norm = np.asarray(data["CellXYZ_norm"].item(), dtype=float)
        inval = np.asarray(data["IX_inval_anat"].item(), dtype=np.int64).ravel()
        fps = float(data["fpsec"].item())
        ix = abs_ix.ravel().astype(np.int64)
        assert xyz.shape == xyz_norm.shape == (int(data["numcell_full"].item()), 3)
        assert np.all(np.diff(ix) > 0) and ix[0] >= 1 and ix[-1] <= len(xyz), "absIX not 1-based sorted"
        assert not np.isin(ix, inval).any(), "absIX lists invalid cells"
        planes = np.unique(xyz[ix - 1, 2])
        print(
            f"data_full.mat: CellXYZ {xyz.shape}, {planes.size} planes ({planes.min():g}..{planes.max():g}), "
            f"IX_inval_anat {inval.size}, fpsec {fps}"
        )
        blocks = sorted({0, (N - 1) // BLOCK_CELLS})
        spec = msd.SubjectSpec(
            args.subject, fps, T, N, int(data["numplane"].item()), args.frac_invalid, args.frac_dropped
        )
        anat = msd.make_anatomy(spec, _rng(args.seed, spec.subject, STREAM_ANATOMY), PLANE_RANGE)
        assert np.array_equal(anat["absIX"], ix) and np.array_equal(anat["CellXYZ"], xyz)
        fish = fish_draws(spec, args.seed)
        stats = []
        for block in blocks:
            rows = slice(block * BLOCK_CELLS, min(N, (block + 1) * BLOCK_CELLS))
            stored = cell_resp[:, rows]
            assert np.isfinite(stored).all() and (stored > 0).all()
            rng = _rng(args.seed, spec.subject, STREAM_BLOCK, block)
            counts, _ = block_spike_counts(spec, anat["atlas_xyz"][rows, 0], fish, rng)
            again, _ = block_fluorescence(spec, anat["plane"][rows], counts, fish, rng, args.fine_rate_hz)
            assert np.array_equal(again.T, stored), f"block {block} differs from its regeneration"
            f = stored.T.astype(np.float64)
            base = np.percentile(f, 8, axis=1, keepdims=True)
            stats.append(sc.cascade_noise_level((f - base) / base, fps))
        noise = np.concatenate(stats)
        print(
            f"blocks {blocks} identical to a regeneration; CASCADE noise level median {np.median(noise):.2f} "
            f"(5-95 %: {np.percentile(noise, 5):.2f}-{np.percentile(noise, 95):.2f}); OK"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder that receives subject_<n>/")
    parser.add_argument("--subject", type=int, default=1, help="n of subject_<n>")
    parser.add_argument("--cells", type=int, default=90000, help="N: traces in CellResp")
    parser.add_argument("--frames", type=int, default=4000, help="T")
    parser.add_argument("--fps", type=float, default=1.97, help="frame (volume) rate, Hz")
    parser.add_argument("--planes", type=int, default=29, help="z-planes")
    parser.add_argument("--seed", type=int, default=msd.DEFAULT_SEED)
    parser.add_argument("--frac_invalid", type=float, default=0.07, help="of numcell_full, in IX_inval_anat")
    parser.add_argument("--frac_dropped", type=float, default=0.10, help="further cells absent from absIX")
    parser.add_argument("--fine_rate_hz", type=float, default=20.0, help="dF/F simulation time grid")
    parser.add_argument("--compression", default="gzip1", help="CellResp: none or gzip<level>")
    parser.add_argument("--ground_truth", action="store_true", help="also write ground_truth_spikes.h5")
    parser.add_argument("--check", action="store_true", help="only validate an existing subject folder")
    args = parser.parse_args(argv)
    if args.compression != "none" and not (args.compression.startswith("gzip") and args.compression[4:].isdigit()):
        parser.error("--compression must be none or gzip<level>, e.g. gzip1")
    subject_dir = Path(args.out) / f"subject_{args.subject}"
    if args.check:
        started = time.perf_counter()
        check_fish(subject_dir)
        print(f"checked in {time.perf_counter() - started:.0f} s; peak RSS {peak_rss_gb():.2f} GB")
        return 0
    make_fish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
