#!/usr/bin/env python3
"""Chunk shape and compression of cell_activity.h5's spike_rates: file size, write time, window reads.

Makes CASCADE-like rates the size of a whole Chen fish (--timepoints x --cells float16, (T, N): mostly exact
zeros after CASCADE's noise-floor cut, Gaussian bumps around sparse spikes, a few NaN edge rows), writes them
with each candidate layout a block of timepoints at a time (as the pipeline does), then reads --windows random
windows of --length timepoints (all cells) through load_cell_window's path (one open file, as a PyTorch
Dataset holds it) and prints the median wall and CPU time per window. The files stay in the page cache: the
figures are those of a training loop reading one fish, not of a cold disk.

    python benchmarks/benchmark_cell_activity.py [--timepoints 4000] [--cells 90000] [--lengths 1 16 64]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CANDIDATES = {  # name: (timepoints per chunk, cells per chunk or None for all, filter options)
    "16 x all, gzip4+shuffle": (16, None, dict(compression="gzip", compression_opts=4, shuffle=True)),
    "64 x all, gzip4+shuffle": (64, None, dict(compression="gzip", compression_opts=4, shuffle=True)),
    "32 x 8192, gzip4+shuffle": (32, 8192, dict(compression="gzip", compression_opts=4, shuffle=True)),
    "128 x 2048, gzip4+shuffle": (128, 2048, dict(compression="gzip", compression_opts=4, shuffle=True)),
    "16 x all, gzip1+shuffle": (16, None, dict(compression="gzip", compression_opts=1, shuffle=True)),
    "16 x all, lzf+shuffle": (16, None, dict(compression="lzf", shuffle=True)),
    "16 x all, none": (16, None, {}),
}
ROWS_PER_BLOCK = 256


def synthetic_rates(num_timepoints: int, num_cells: int, seed: int) -> np.ndarray:
    """(T, N) float16 CASCADE-like rates, generated a block of cells at a time."""
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(seed)
    rates = np.empty((num_timepoints, num_cells), np.float16)
    for c0 in range(0, num_cells, 4096):
        c1 = min(num_cells, c0 + 4096)
        spikes = (rng.random((c1 - c0, num_timepoints)) < rng.uniform(0.005, 0.08, (c1 - c0, 1))).astype(np.float32)
        block = gaussian_filter1d(spikes, sigma=1.0, axis=1) * rng.uniform(0.8, 1.2, (c1 - c0, 1))
        block[block < 0.05] = 0.0
        rates[:, c0:c1] = block.T
    rates[:32] = np.nan  # CASCADE's edges, kept with --keep_edge_frames
    return rates


def write(path: Path, rates: np.ndarray, rows: int, cells, filters: dict) -> float:
    started = time.perf_counter()
    with h5py.File(path, "w") as h5:
        chunks = (min(rows, len(rates)), rates.shape[1] if cells is None else min(cells, rates.shape[1]))
        out = h5.create_dataset("spike_rates", rates.shape, np.float16, chunks=chunks, **filters)
        for t0 in range(0, len(rates), ROWS_PER_BLOCK):
            out[t0 : t0 + ROWS_PER_BLOCK] = rates[t0 : t0 + ROWS_PER_BLOCK]
    return time.perf_counter() - started


def read_windows(path: Path, length: int, windows: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    walls, cpus = [], []
    with h5py.File(path, "r") as h5:
        data = h5["spike_rates"]
        for start in rng.integers(0, len(data) - length, windows):
            wall, cpu = time.perf_counter(), time.process_time()
            block = data[start : start + length]
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            assert block.shape == (length, data.shape[1])
    return float(np.median(walls)), float(np.median(cpus))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timepoints", type=int, default=4000)
    parser.add_argument("--cells", type=int, default=90000)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    parser.add_argument("--folder", default=tempfile.gettempdir())
    args = parser.parse_args()
    rates = synthetic_rates(args.timepoints, args.cells, 0)
    print(
        f"{args.timepoints} x {args.cells} float16 ({rates.nbytes / 1e6:.0f} MB), nonzero "
        f"{np.count_nonzero(np.nan_to_num(rates)) / rates.size:.1%}; load average {os.getloadavg()[0]:.2f}"
    )
    header = " | ".join(f"window {n}: wall ms (CPU ms)" for n in args.lengths)
    print(f"| layout | MB | write s | {header} |")
    print("|---|---|---|" + "---|" * len(args.lengths))
    for name in args.candidates:
        rows, cells, filters = CANDIDATES[name]
        path = Path(args.folder) / "cell_activity_benchmark.h5"
        seconds = write(path, rates, rows, cells, filters)
        reads = [read_windows(path, n, args.windows, 1) for n in args.lengths]
        shown = " | ".join(f"{wall * 1e3:.1f} ({cpu * 1e3:.1f})" for wall, cpu in reads)
        print(f"| {name} | {path.stat().st_size / 1e6:.0f} | {seconds:.1f} | {shown} |", flush=True)
        path.unlink()


if __name__ == "__main__":
    main()
