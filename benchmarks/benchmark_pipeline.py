#!/usr/bin/env python3
"""End-to-end speed and memory of unified_spike_processing_coo.py on one synthetic fish.

Generates (once, cached) a Chen-2018-layout subject with --cells x --frames raw fluorescence
(tools/make_sample_data.py's generator), then runs the pipeline CLI under several settings
(workers, batch size, grid size) and prints, per run: wall time, neuron-frames per second,
peak resident memory of the whole process tree (sampled every 0.1 s with psutil), active voxels,
file size, and whether the COO output is identical to the first run's.

    python benchmarks/benchmark_pipeline.py --cells 20000 --frames 2000

Memory must grow with the batch and the spikes, never with the dense (T, Z, H, W) grid: the
runs with a 4x larger grid (16x the dense voxels) show it.
"""

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def make_data(folder: Path, cells: int, frames: int, planes: int, rate_hz: float) -> Path:
    import make_sample_data as msd

    subject_dir = folder / "subject_1"
    if (subject_dir / "TimeSeries.h5").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    spec = msd.SubjectSpec(1, rate_hz, frames, cells, planes, 0.07, 0.10)
    started = time.perf_counter()
    subject = msd.make_subject(spec)
    msd.write_subject(str(folder), subject)
    print(f"generated {cells} cells x {frames} frames in {time.perf_counter() - started:.0f} s -> {folder}")
    return folder


def run(data: Path, out: Path, args: list) -> dict:
    command = [
        sys.executable,
        str(REPO / "unified_spike_processing_coo.py"),
        "--input_dir",
        str(data),
        "--output_dir",
        str(out),
        "--cascade_model",
        "builtin",
        "--offline",
        *args,
    ]
    started = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process] + process.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    stderr = process.stderr.read()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{stderr[-3000:]}")
    with h5py.File(out / "subject_1" / "preaugmented_grids_coo.h5", "r") as h5:
        coords = h5["spike_coords"][()]
        digest = hashlib.sha256(coords.tobytes()).hexdigest()[:16]
        shape = tuple(h5["grid_shape"][()])
    return {
        "wall_s": wall,
        "peak_gb": peak / 1e9,
        "entries": len(coords),
        "digest": digest,
        "file_mb": (out / "subject_1" / "preaugmented_grids_coo.h5").stat().st_size / 1e6,
        "dense_gb": float(np.prod(shape)) / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--planes", type=int, default=29)
    parser.add_argument("--frame_rate_hz", type=float, default=2.0)
    parser.add_argument("--data_dir", default="/tmp/spike_benchmark_data")
    parser.add_argument("--out_dir", default="/tmp/spike_benchmark_out")
    parser.add_argument(
        "--runs",
        default="1:30000:256x128,2:30000:256x128,2:5000:256x128,2:5000:1024x512",
        help="comma list of workers:batch_size:HxW",
    )
    args = parser.parse_args()
    data = make_data(
        Path(args.data_dir) / f"{args.cells}x{args.frames}", args.cells, args.frames, args.planes, args.frame_rate_hz
    )
    neuron_frames = args.cells * args.frames
    print(
        f"subject: {args.cells} cells x {args.frames} frames at {args.frame_rate_hz} Hz, "
        f"{args.planes} planes; machine: {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 1e9:.0f} GB"
    )
    print(
        f"{'workers':>7} {'batch':>6} {'grid HxW':>9} {'wall s':>7} {'neuron-frames/s':>16} "
        f"{'peak RSS GB':>11} {'dense GB':>8} {'entries':>9} {'file MB':>7} identical"
    )
    first_by_grid = {}
    for index, spec in enumerate(args.runs.split(",")):
        workers, batch, grid = spec.split(":")
        height, width = grid.split("x")
        result = run(
            data,
            Path(args.out_dir) / f"run{index}",
            ["--workers", workers, "--batch_size", batch, "--grid_shape", height, width],
        )
        first = first_by_grid.setdefault(grid, result)  # outputs compare only within one grid size
        same = "yes" if result["digest"] == first["digest"] else "NO"
        print(
            f"{workers:>7} {batch:>6} {grid:>9} {result['wall_s']:7.1f} {neuron_frames / result['wall_s']:16,.0f} "
            f"{result['peak_gb']:11.2f} {result['dense_gb']:8.2f} {result['entries']:9,} "
            f"{result['file_mb']:7.2f} {same}",
            flush=True,
        )


if __name__ == "__main__":
    main()
