#!/usr/bin/env python3
"""Window reads of a whole-fish COO grid: load_coo_window / load_coo_window_dense.

Generates (once, kept in the temp folder) a synthetic preaugmented_grids_coo.h5 the size of a
whole Chen fish (90k cells x 4k frames: 62.5 M active voxels in a (3900, 29, 256, 128) grid;
uniformly random voxels, the worst case for compression) with the pipeline's own writer
(write_coo_file: the same chunking, compression and timepoint_offsets), a block of timepoints at a
time so memory stays bounded (0.45 GB peak). Then reads --windows random windows of --length
timepoints, each through a fresh file handle, and prints the wall and CPU time of reading and
densifying them, the same through h5py's ordinary slicing plus coo_to_dense_grid (and, with
--v1_0, through a copy without timepoint_offsets, as version 1.0 wrote), and the file's size per entry (the target: at most 4 bytes per active voxel, reads at most 50 ms).

    python benchmarks/benchmark_windows.py [--chunk_rows 65536] [--windows 20] [--length 100]

The file stays in the OS page cache between reads (it is ~80 MB): the figures are those of a
training loop reading one fish, not of a cold disk. Wall times depend on what else runs on the
machine (the load average is printed); CPU times much less.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import unified_spike_processing_coo as usp  # noqa: E402

WHOLE_FISH_SHAPE = (3900, 29, 256, 128)
WHOLE_FISH_ENTRIES = 62_500_000
TIMEPOINTS_PER_BLOCK = 256  # ~4 M entries (~70 MB of coordinates) generated at a time


def synthetic_blocks(shape: tuple, entries: int, seed: int):
    """(coords, CooCounts) blocks of sorted, unique random voxels, ~entries/T per timepoint."""
    rng = np.random.default_rng(seed)
    num_timepoints, voxels = shape[0], int(np.prod(shape[1:]))
    for t0 in range(0, num_timepoints, TIMEPOINTS_PER_BLOCK):
        linear = []
        for t in range(t0, min(num_timepoints, t0 + TIMEPOINTS_PER_BLOCK)):
            count = min(int(rng.poisson(entries / num_timepoints)), voxels)
            linear.append(np.sort(rng.choice(voxels, count, replace=False)) + t * voxels)
        coords = np.stack(np.unravel_index(np.concatenate(linear), shape), axis=1).astype(np.int32)
        yield coords, usp.CooCounts(spike_pixels=len(coords))


def make_file(path: Path, shape: tuple, entries: int, seed: int) -> None:
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    num_timepoints, num_z, height, width = shape
    grid = usp.GridSpec(num_timepoints, num_z, height, width, np.arange(num_z, dtype=float), np.zeros((0, 3), np.int32))
    frames = np.arange(num_timepoints)
    is_train, test_blocks = usp.train_test_split(num_timepoints)
    plan = usp.GridPlan(grid, frames, frames, np.ones(num_timepoints, bool), is_train, test_blocks, True)
    temporary = usp.temporary_path(path)
    started = time.perf_counter()
    try:
        usp.write_coo_file(temporary, synthetic_blocks(shape, entries, seed), plan, {"format": "COO_sparse"})
        os.replace(temporary, path)
    finally:
        usp.remove_quietly(temporary)
    print(f"generated {path} in {time.perf_counter() - started:.0f} s")


def h5py_window_dense(path: Path, start: int, stop: int) -> np.ndarray:
    """The obvious reader, for comparison: h5py slicing of the window's rows, coo_to_dense_grid."""
    with h5py.File(path, "r") as h5:
        first, last = h5["timepoint_offsets"][[start, stop]]
        coords = h5["spike_coords"][first:last]
        shape = (stop - start, *h5["grid_shape"][1:])
    coords[:, 0] -= start
    return usp.coo_to_dense_grid(coords, grid_shape=shape)


def v1_0_copy(path: Path) -> Path:
    """A copy of the file as version 1.0 wrote it: no timepoint_offsets (made once)."""
    copy = path.with_name(path.stem + "_v1.0.h5")
    if not copy.is_file():
        temporary = usp.temporary_path(copy)
        shutil.copyfile(path, temporary)
        with h5py.File(temporary, "r+") as h5:
            del h5["timepoint_offsets"]
        os.replace(temporary, copy)
    return copy


def timed(function, path: Path, windows: list) -> tuple:
    """Wall and CPU milliseconds of function(path, start, stop) for each window."""
    wall, cpu = [], []
    for start, stop in windows:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        function(path, start, stop)
        wall.append(1e3 * (time.perf_counter() - wall0))
        cpu.append(1e3 * (time.process_time() - cpu0))
    return np.array(wall), np.array(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=WHOLE_FISH_SHAPE, metavar=("T", "Z", "H", "W"))
    parser.add_argument("--entries", type=int, default=WHOLE_FISH_ENTRIES)
    parser.add_argument("--chunk_rows", type=int, default=usp.COO_CHUNK_ROWS, help="the writer's COO_CHUNK_ROWS")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--length", type=int, default=100, help="timepoints per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "usp_benchmark_windows")
    parser.add_argument("--skip_h5py", action="store_true", help="do not time h5py's ordinary slicing")
    parser.add_argument("--v1_0", action="store_true", help="also time a copy without timepoint_offsets (a 1.0 file)")
    args = parser.parse_args()

    usp.COO_CHUNK_ROWS = args.chunk_rows
    shape = tuple(args.shape)
    name = f"coo_{'x'.join(map(str, shape))}_{args.entries}_seed{args.seed}_rows{args.chunk_rows}.h5"
    path = args.folder / name
    make_file(path, shape, args.entries, args.seed)

    with h5py.File(path, "r") as h5:
        dataset = h5["spike_coords"]
        entries, chunks, compression = dataset.shape[0], dataset.chunks, (dataset.compression, dataset.compression_opts)
    size = path.stat().st_size
    rng = np.random.default_rng(args.seed + 1)
    starts = rng.integers(0, shape[0] - args.length + 1, args.windows)
    windows = [(int(start), int(start) + args.length) for start in starts]
    reference = h5py_window_dense(path, *windows[0])
    assert np.array_equal(usp.load_coo_window_dense(path, *windows[0]), reference), "readers disagree"
    print(f"file: {path}")
    print(f"  grid {shape}, {entries:,} entries, spike_coords chunks {chunks}, {compression[0]} level {compression[1]}")
    print(f"  {size:,} bytes = {size / entries:.2f} bytes per entry (target: at most 4)")
    length = args.length
    print(
        f"{args.windows} random windows of {length} timepoints (a fresh file handle each), load average {os.getloadavg()[0]:.1f}:"
    )
    print("  window in ms                                   wall median  wall worst   CPU median   CPU worst")
    cases = [
        ("load_coo_window (coords)", usp.load_coo_window),
        ("load_coo_window_dense (read + densify)", usp.load_coo_window_dense),
    ]
    buffer = np.zeros((length, *shape[1:]), np.uint8)
    cases.append(
        ("load_coo_window_dense(..., out=one buffer)", lambda *window: usp.load_coo_window_dense(*window, out=buffer))
    )
    if not args.skip_h5py:
        cases.append(("h5py slicing + coo_to_dense_grid", h5py_window_dense))
    if args.v1_0:
        cases.append(("1.0 file (bisection): load_coo_window_dense", usp.load_coo_window_dense))
    for label, function in cases:
        wall, cpu = timed(function, v1_0_copy(path) if label.startswith("1.0") else path, windows)
        print(f"  {label:<44} {np.median(wall):>10.1f} {wall.max():>11.1f} {np.median(cpu):>12.1f} {cpu.max():>11.1f}")
    entries_per_window = entries * length / shape[0]
    print(
        f"  (a window: ~{entries_per_window / 1e6:.1f} M entries, dense block {length * np.prod(shape[1:]) / 1e6:.0f} MB)"
    )


if __name__ == "__main__":
    main()
