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

The file stays in the OS page cache between reads (~0.5 GB, 0.3 of it spike_zxy): the figures are those of a
training loop reading one fish, not of a cold disk. Wall times depend on what else runs on the
machine (the load average is printed); CPU times much less.

Training speed (issue 26, after the readers above; --training_only skips them): three whole-fish-sized
subjects' cell_activity.h5 (--cells x --timepoints float16, CASCADE-like rates 74 % nonzero as the real fish's,
covariates) written with the pipeline's own write_cell_activity, the COO file above beside the first. From the
page cache, per process (windows read into one reused buffer, random starts) and through torch's DataLoader
with --workers processes (spike_sampler.make_loader): median and worst ms per window, windows/s, and the ratio
to a plain numpy copy of the same bytes timed in the same run (the memory-bandwidth limit), for per-cell windows
of --cell_lengths timepoints (float16 as stored; float32 for 48), the 1.2 layout (gzip 1 + shuffle) beside the
new one, 64-plane sequences, --length-timepoint grid windows sparse and dense (from spike_zxy; a copy without it
as 1.2 wrote it, inflated, and through the sampler's cache_dir), and the sampler over the three subjects. Generated files stay in --folder (several GB): delete it afterwards.

    python benchmarks/benchmark_windows.py --training_only [--workers 2] [--windows 40]
"""

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import unified_spike_processing_coo as usp  # noqa: E402

WHOLE_FISH_SHAPE = (3900, 29, 256, 128)
WHOLE_FISH_ENTRIES = 107_000_000  # the pipeline's whole-fish output (issue 26; 62.5 M before)
WHOLE_FISH_CELLS, WHOLE_FISH_TIMEPOINTS = 90_000, 4_000
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
        with h5py.File(path, "r") as h5:
            if "spike_zxy" in h5:
                return
        print(f"{path} was written before spike_zxy: made again")
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


OLDER_LAYOUTS = {"1.0": ("timepoint_offsets", "spike_zxy"), "1.2": ("spike_zxy",)}  # version: datasets it lacks


def older_copy(path: Path, version: str) -> Path:
    """A copy of the file as ``version`` wrote it, without the datasets it did not have (made once)."""
    copy = path.with_name(f"{path.stem}_v{version}.h5")
    if not copy.is_file():
        temporary = usp.temporary_path(copy)
        shutil.copyfile(path, temporary)
        with h5py.File(temporary, "r+") as h5:
            for name in OLDER_LAYOUTS[version]:
                del h5[name]
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
    parser.add_argument("--training_only", action="store_true", help="only the training-speed part (issue 26)")
    parser.add_argument("--cells", type=int, default=WHOLE_FISH_CELLS)
    parser.add_argument("--timepoints", type=int, default=WHOLE_FISH_TIMEPOINTS)
    parser.add_argument("--cell_lengths", type=int, nargs="+", default=[1, 16, 48, 256])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = parser.parse_args()

    usp.COO_CHUNK_ROWS = args.chunk_rows
    shape = tuple(args.shape)
    name = f"coo_{'x'.join(map(str, shape))}_{args.entries}_seed{args.seed}_rows{args.chunk_rows}.h5"
    path = args.folder / name
    make_file(path, shape, args.entries, args.seed)
    if args.training_only:
        training_speed(args, path)
        return

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
        wall, cpu = timed(function, older_copy(path, "1.0") if label.startswith("1.0") else path, windows)
        print(f"  {label:<44} {np.median(wall):>10.1f} {wall.max():>11.1f} {np.median(cpu):>12.1f} {cpu.max():>11.1f}")
    entries_per_window = entries * length / shape[0]
    print(
        f"  (a window: ~{entries_per_window / 1e6:.1f} M entries, dense block {length * np.prod(shape[1:]) / 1e6:.0f} MB)"
    )

    training_speed(args, path)


# --- training speed (issue 26) ------------------------------------------------------------------------------


def synthetic_spikes(num_cells: int, num_timepoints: int, seed: int, scratch: Path) -> usp.SubjectSpikes:
    """SubjectSpikes as the workers leave them: (cells, timepoints) float16 rates like the real fish's (74 %
    nonzero; NaN first rows of a few cells) in a scratch array at ``scratch``, four batches of cells, and nothing
    else (no spikes: only the rates are read here)."""
    rng, batches = np.random.default_rng(seed), []
    store = usp.ScratchArray.create(scratch, (num_timepoints, num_cells), "float16")
    bounds = np.linspace(0, num_cells, 5).astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        rates = rng.random((stop - start, num_timepoints), np.float32)
        rates *= rates > 0.26
        rates = rates.astype(np.float16)
        rates[:50, :2] = np.nan
        cells = usp.CellResults.from_arrays(dict.fromkeys(usp.CellResults.names(), np.zeros(stop - start)))
        plot = usp.PlotTraces(np.zeros(0, np.int64), *(np.zeros((0, num_timepoints), d) for d in ("f4", "f4", bool)))
        no_spikes = np.zeros(0, np.int32)
        batches.append(usp.BatchResult(start, no_spikes, no_spikes, cells, np.zeros(num_timepoints, np.int64), plot))
        store.write_columns(start, rates)
    return usp.SubjectSpikes(batches, num_timepoints, num_timepoints, store)


def make_cell_activity(path: Path, num_cells: int, num_timepoints: int, seed: int) -> None:
    """A whole-fish-sized cell_activity.h5 written by the pipeline's write_cell_activity (made once)."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    started, rng = time.perf_counter(), np.random.default_rng(seed)
    frames = np.arange(num_timepoints)
    is_train, test_blocks = usp.train_test_split(num_timepoints)
    grid = usp.GridSpec(num_timepoints, 29, 256, 128, np.arange(29.0), np.zeros((num_cells, 3), np.int32))
    plan = usp.GridPlan(grid, frames, frames, np.ones(num_timepoints, bool), is_train, test_blocks, True, "blocks",
                        frames / 3.0)  # fmt: skip
    covariates = usp.Covariates(stimulus=rng.integers(0, 9, num_timepoints).astype(np.float64),
                                behavior=rng.normal(size=(num_timepoints, 5)).astype(np.float32), clock="timepoints")  # fmt: skip
    subject = SimpleNamespace(name=path.parent.name, raw_positions=rng.uniform(0, 500, (num_cells, 3)),
                              registered_positions=None,
                              cell_ids=np.arange(1, num_cells + 1))  # fmt: skip
    fingerprint = {"inputs": {}, "cascade_params": {}, "model": "synthetic", "software_version": usp.__version__}
    temporary, scratch = usp.temporary_path(path), usp.temporary_path(path.with_suffix(".rates"))
    try:
        spikes = synthetic_spikes(num_cells, num_timepoints, seed, scratch)
        usp.write_cell_activity(temporary, spikes, plan, subject, {"fingerprint": fingerprint}, covariates)
        os.replace(temporary, path)
    finally:
        usp.remove_quietly(temporary)
        usp.remove_quietly(scratch)
    print(f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s")


def legacy_copy(path: Path) -> Path:
    """The file with spike_rates as 1.2 wrote it (16 timepoints x all cells, gzip 1 + shuffle), made once."""
    copy = path.with_name("cell_activity_v1.2.h5")
    if not copy.is_file():
        with h5py.File(path, "r") as source, h5py.File(copy, "w") as h5:
            rates = source["spike_rates"]
            out = h5.create_dataset("spike_rates", rates.shape, np.float16, chunks=(16, rates.shape[1]), **usp.GZIP)
            for first in range(0, rates.shape[0], usp.CELL_RATE_BLOCK_TIMEPOINTS):
                usp.write_chunks(out, first, rates[first : first + usp.CELL_RATE_BLOCK_TIMEPOINTS], 2)
            for name in ("timepoint_indices", "timepoint_times_s", "is_train"):
                h5[name] = source[name][()]
    return copy


def bandwidth_ms(num_bytes: int, repeats: int = 20) -> float:
    """Median ms of a plain numpy copy of ``num_bytes`` between two preallocated, touched arrays."""
    source, target = np.ones(max(1, num_bytes), np.uint8), np.zeros(max(1, num_bytes), np.uint8)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times))


def warm(path: Path) -> None:
    """Read the file once, so that it is in the page cache."""
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


def per_process(read, starts) -> tuple:
    """(wall ms of read(start) for each start, median CPU ms) after one untimed read: the machine is shared, so
    wall times include waiting for a core."""
    read(int(starts[0]))
    times, cpu = [], []
    for start in starts:
        began, began_cpu = time.perf_counter(), time.process_time()
        read(int(start))
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return 1e3 * np.array(times), 1e3 * float(np.median(cpu))


def _ms_per_window(batches_in, batch_size: int, batches: int) -> np.ndarray:
    """ms per window of an iterator of batches (batch arrival times / batch size, the first batch untimed)."""
    next(batches_in)
    times, began = [], time.perf_counter()
    for _ in range(batches):
        next(batches_in)
        now = time.perf_counter()
        times.append((now - began) / batch_size)
        began = now
    return 1e3 * np.array(times)


def through_loader(sampler, batch_size: int, workers: int, batches: int) -> np.ndarray:
    """ms per window of a DataLoader over the sampler."""
    import spike_sampler

    loader = iter(spike_sampler.make_loader(sampler, batch_size, num_workers=workers))
    times = _ms_per_window(loader, batch_size, batches)
    del loader
    return times


def through_window_loader(sampler, batch_size: int, workers: int, batches: int) -> np.ndarray:
    """ms per window of the sampler's own workers (spike_sampler.WindowLoader)."""
    import spike_sampler

    with spike_sampler.WindowLoader(sampler, batch_size, workers=workers) as loader:
        return _ms_per_window(iter(loader), batch_size, batches)


def row(label: str, measured, window_bytes: int, copy_ms: float) -> None:
    """A table row; ``measured``: per_process's (wall ms, CPU ms), or the wall ms of a loader (no CPU ms)."""
    times_ms, cpu = measured if isinstance(measured, tuple) else (measured, None)
    median, cpu = float(np.median(times_ms)), "-" if cpu is None else f"{cpu:.2f}"
    per_second = 1e3 / float(np.mean(times_ms))  # windows over the whole time: a loader's prefetched batches count
    print(f"| {label} | {median:.2f} | {cpu} | {times_ms.max():.2f} | {per_second:.0f} | "
          f"{window_bytes / 1e6:.2f} | {copy_ms:.3f} | {median / copy_ms:.1f} |", flush=True)  # fmt: skip


def subject_folder_of(coo_path: Path, folder: Path) -> Path:
    """``folder`` as a subject folder whose COO file is ``coo_path`` (a link to it), for the sampler."""
    folder.mkdir(exist_ok=True)
    if not (folder / usp.COO_FILENAME).exists():
        os.symlink(coo_path, folder / usp.COO_FILENAME)
    return folder


def training_speed(args, coo_path: Path) -> None:
    import spike_sampler

    folder = args.folder / f"fish_{args.cells}x{args.timepoints}"
    subjects = [folder / f"subject_{k}" for k in range(3)]
    for k, subject in enumerate(subjects):
        make_cell_activity(subject / usp.CELL_ACTIVITY_FILENAME, args.cells, args.timepoints, args.seed + k)
    grid_folder = subject_folder_of(coo_path, folder / "grid_subject")
    old = legacy_copy(subjects[0] / usp.CELL_ACTIVITY_FILENAME)
    for path in [*(s / usp.CELL_ACTIVITY_FILENAME for s in subjects), old, coo_path]:
        warm(path)
    rng = np.random.default_rng(args.seed + 2)
    n, workers = args.windows, args.workers
    print(f"\nTraining speed: {args.cells:,} cells x {args.timepoints:,} timepoints per subject, {n} windows per "
          f"case, load average {os.getloadavg()[0]:.1f} (the machine is shared)")  # fmt: skip
    print("| case | median ms/window | CPU ms (median) | worst ms | windows/s | MB/window | copy ms (same bytes) "
          "| x copy (median / copy) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    cells = usp.CellFile(subjects[0] / usp.CELL_ACTIVITY_FILENAME)
    legacy = usp.CellFile(old)
    for length in args.cell_lengths:
        starts = rng.integers(0, args.timepoints - length + 1, n)
        buffer, nbytes = np.empty((length, args.cells), np.float16), 2 * length * args.cells
        copy_ms = bandwidth_ms(nbytes)
        row(f"cells {length} tp, float16 into a reused buffer", per_process(
            lambda s, length=length, buffer=buffer: cells.rates(s, s + length, out=buffer), starts), nbytes, copy_ms)  # fmt: skip
        if length == 48:
            as_float = np.empty((length, args.cells), np.float32)
            row("cells 48 tp, float32 into a reused buffer", per_process(
                lambda s, length=length, out=as_float, buffer=buffer: np.copyto(out, cells.rates(s, s + length, out=buffer)), starts), nbytes, copy_ms)  # fmt: skip
            row("cells 48 tp, load_cell_window(path) (float32, new arrays)", per_process(
                lambda s, length=length: usp.load_cell_window(cells.filename, s, s + length), starts), nbytes, copy_ms)  # fmt: skip
        if length in (1, 48):
            row(f"cells {length} tp, 1.2 layout (gzip 1 + shuffle)", per_process(
                lambda s, length=length, buffer=buffer: legacy.rates(s, s + length, out=buffer), starts[: max(5, n // 4)]), nbytes, copy_ms)  # fmt: skip
    cells.close()
    legacy.close()
    # grids: 64-plane sequences, windows of --length timepoints
    num_timepoints, z, height, width = args.shape
    per_plane = 2 * args.entries / (num_timepoints * z)  # bytes of x, y per plane, sparse
    for dense in (True, False):
        planes = spike_sampler.WindowSampler([grid_folder], "planes", length=64, seed=args.seed, num_windows=n,
                                             dense=dense)  # fmt: skip
        batch = planes.empty_batch(1) if dense else None
        read = functools.partial(planes.read, 0, out=batch) if dense else functools.partial(planes.read, 0)
        nbytes = 64 * height * width if dense else int(64 * per_plane)
        times = per_process(read, planes.plan()[1])
        row(f"64-plane sequence, {'dense into a reused buffer' if dense else 'sparse (offsets + x, y)'}",
            times, nbytes, bandwidth_ms(nbytes))  # fmt: skip
    old_coo = older_copy(coo_path, "1.2")  # no spike_zxy: windows inflate spike_coords
    old_folder = subject_folder_of(old_coo, folder / "grid_subject_v1.2")
    warm(old_coo)
    starts = rng.integers(0, num_timepoints - args.length + 1, n)
    dense_buffer = np.empty((args.length, z, height, width), np.uint8)
    for path, layout in ((coo_path, ""), (old_coo, ", 1.2 layout (inflating spike_coords)")):
        grid = usp.CooFile(path)
        entries = int(np.median([grid.offsets[s + args.length] - grid.offsets[s] for s in starts]))
        cases = [
            ("sparse, compact (offsets + z, x, y uint8)", lambda s, grid=grid: grid.entries(s, s + args.length), 3 * entries),
            ("sparse, CooWindow (n, 4) int32", lambda s, grid=grid: grid.window(s, s + args.length), 16 * entries),
            ("dense into a reused buffer", lambda s, grid=grid: grid.dense(s, s + args.length, out=dense_buffer),
             dense_buffer.nbytes),
        ]  # fmt: skip
        for label, read, nbytes in cases[: 3 if not layout else 1]:
            row(f"grid {args.length} tp, {label}{layout}", per_process(read, starts), nbytes, bandwidth_ms(nbytes))
        grid.close()
    cache = args.folder / "decoded"
    began = time.perf_counter()
    spike_sampler.decoded_columns(old_coo, cache)
    print(f"| (1.2 layout: decoded z, x, y of the COO file into {cache}: {time.perf_counter() - began:.1f} s, once) |")
    for kind, length in (("grid", args.length), ("planes", 64)):
        for dense in (False, True):
            cached = spike_sampler.WindowSampler([old_folder], kind, length=length, seed=args.seed, num_windows=n,
                                                 dense=dense, cache_dir=cache)  # fmt: skip
            batch = cached.empty_batch(1) if dense else None
            read = functools.partial(cached.read, 0, out=batch) if dense else functools.partial(cached.read, 0)
            if kind == "grid":
                nbytes = dense_buffer.nbytes if dense else 3 * entries
            else:
                nbytes = 64 * height * width if dense else int(64 * per_plane)
            label = f"{f'grid {args.length} tp' if kind == 'grid' else '64-plane sequence'}, {'dense' if dense else 'sparse'}"
            row(f"{label}, 1.2 layout, decoded cache (cache_dir)", per_process(read, cached.plan()[1]), nbytes,
                bandwidth_ms(nbytes))  # fmt: skip
    # the sampler over three subjects, in this process and through the DataLoader
    sampler = spike_sampler.WindowSampler(subjects, "cells", length=48, seed=args.seed, num_windows=100_000)
    nbytes = 2 * 48 * args.cells
    copy_ms = bandwidth_ms(nbytes)
    batch = sampler.empty_batch(1)
    subjects_drawn, starts = sampler.plan()
    times = per_process(lambda i: sampler.read(int(subjects_drawn[i]), int(starts[i]), out=batch), np.arange(n))
    row("sampler, 3 subjects, cells 48 tp, this process (float16)", times, nbytes, copy_ms)
    both = (("DataLoader", through_loader), ("own workers (WindowLoader)", through_window_loader))
    for label, measure in both:
        times = measure(sampler, 16, workers, max(10, n))
        row(f"sampler, 3 subjects, cells 48 tp, {label}, {workers} workers, batches of 16", times, nbytes, copy_ms)
    for length, batch_size in ((1, 16), (16, 16), (256, 4)):
        try:
            loader_sampler = spike_sampler.WindowSampler(subjects, "cells", length=length, seed=1, num_windows=100_000)
        except ValueError as error:  # subjects too short for the window
            print(f"| sampler, cells {length} tp | {error} |")
            continue
        nbytes = 2 * length * args.cells
        for label, measure in both:
            times = measure(loader_sampler, batch_size, workers, max(6, n // 2))
            row(f"sampler, 3 subjects, cells {length} tp, {label}, {workers} workers, batches of {batch_size}",
                times, nbytes, bandwidth_ms(nbytes))  # fmt: skip
    planes = spike_sampler.WindowSampler([grid_folder], "planes", length=64, seed=1, num_windows=100_000)
    for label, measure in both:
        row(f"sampler, 64-plane sequences dense, {label}, {workers} workers, batches of 16",
            measure(planes, 16, workers, max(6, n // 2)), 64 * height * width, bandwidth_ms(64 * height * width))  # fmt: skip
    for subject_folder, cache_dir in ((grid_folder, None), (old_folder, None), (old_folder, cache)):
        sparse = spike_sampler.WindowSampler([subject_folder], "grid", length=args.length, seed=1,
                                             num_windows=100_000, dense=False, cache_dir=cache_dir)  # fmt: skip
        label = "" if subject_folder == grid_folder else "1.2 layout, decoded cache, " if cache_dir else "1.2 layout, "
        row(f"sampler, grid {args.length} tp sparse, {label}DataLoader {workers} workers, batches of 4",
            through_loader(sparse, 4, workers, max(6, n // 4)), 3 * entries, bandwidth_ms(3 * entries))  # fmt: skip


if __name__ == "__main__":
    main()
