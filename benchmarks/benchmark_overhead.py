#!/usr/bin/env python3
"""The pipeline against its engine: how much of a run goes outside CASCADE's network.

For one subject (default: a 9,000 x 4,000 fish made by benchmarks/make_whole_fish.py), this measures

1. the engine alone, in this process: the subject's traces read and turned into dF/F exactly as the workers
   do (not timed), then ``predict_spike_rates`` on all of it with every core (imports, model loading and dF/F
   excluded; the best of ``--repeats``), for each ``--engines`` value;
2. the whole pipeline, end to end: ``unified_spike_processing_coo.py`` as a fresh process (``--cascade_model
   builtin --offline --no_plots``, a fresh output folder), wall time from start to exit, process start and
   imports included, for each ``--workers`` value and ``--engines`` value (best of ``--repeats``);

and prints neuron-frames per second of each and the pipeline's share of the engine's throughput (the goal of
issue 20: at least 90 % for the best ``--workers``). Also checks that the outputs of every pipeline run are
identical (the COO coordinates and metadata's population rate).

    python benchmarks/make_whole_fish.py --out /work/data/fish9k --cells 9000 --frames 4000
    python benchmarks/benchmark_overhead.py --input_dir /work/data/fish9k --workers 1 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
PIPELINE = REPO_ROOT / "unified_spike_processing_coo.py"


def engine_alone(usp, subject_dir: Path, engine: str, repeats: int) -> tuple:
    """(best seconds, neuron-frames) of predict_spike_rates on the subject's dF/F, all cores."""
    subject = usp.load_subject(subject_dir)
    traces = subject.trace_file.read_raw()
    usp.mark_infinite_as_missing(traces)
    config = usp.PipelineConfig(input_dir=str(subject_dir.parent), output_dir="unused")
    kind = usp.decide_trace_type(traces).kind
    dff = traces
    if kind == "fluorescence":
        dff = usp.compute_dff(
            traces, subject.frame_rate_hz, config.baseline_window_s, config.baseline_percentile, threads=os.cpu_count()
        )
    del traces
    model = usp.read_model_folder(usp.nearest_builtin_folder(subject.frame_rate_hz), "builtin")
    usp.use_engine(usp.choose_engine(engine).name, usp.available_cpus())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        usp.predict_rates_keeping_nan(dff, model, usp.CASCADE_THRESHOLDS[config.cascade_threshold])
        best = min(best, time.perf_counter() - start)
    return best, dff.size


def pipeline_run(input_dir: Path, out: Path, workers: int, engine: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(PIPELINE), "--input_dir", str(input_dir), "--output_dir", str(out)]
    command += ["--workers", str(workers), "--engine", engine, "--cascade_model", "builtin", "--offline", "--no_plots"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"pipeline failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def fingerprint(out: Path) -> tuple:
    """(COO coordinates digest, population rate) of every subject under out, to compare runs."""
    parts = []
    for meta in sorted(out.glob("*/metadata.h5")):
        with h5py.File(meta) as f:
            parts.append(np.asarray(f["population_rate_hz"][()]).tobytes())
        with h5py.File(meta.parent / "preaugmented_grids_coo.h5") as f:
            parts += [np.asarray(f[name][()]).tobytes() for name in sorted(f) if isinstance(f[name], h5py.Dataset)]
    return hash(b"".join(parts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_dir", required=True, help="folder holding one subject folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--engines", nargs="+", default=["auto"], help="--engine values (auto, tensorflow, numpy)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    import unified_spike_processing_coo as usp

    input_dir = Path(args.input_dir)
    subject_dir = next(p for p in sorted(input_dir.iterdir()) if p.is_dir())
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    flags = usp.cpu_flags()
    vector = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni") if f in flags)
    print(f"CPU: {os.cpu_count()} cores visible; vector extensions: {vector}; load {os.getloadavg()[0]:.2f}")
    for engine in args.engines:
        chosen = usp.choose_engine(engine).name
        seconds, neuron_frames = engine_alone(usp, subject_dir, engine, args.repeats)
        engine_rate = neuron_frames / seconds
        print(
            f"engine {engine} ({chosen}) alone on {subject_dir.name}'s dF/F: {seconds:.2f} s, {engine_rate:,.0f} nf/s"
        )
        digests = set()
        with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
            for workers in args.workers:
                times = [pipeline_run(input_dir, Path(tmp) / "out", workers, engine) for _ in range(args.repeats)]
                digests.add(fingerprint(Path(tmp) / "out"))
                rate = neuron_frames / min(times)
                print(
                    f"  pipeline --workers {workers}: best {min(times):.2f} s of {', '.join(f'{t:.2f}' for t in times)}"
                    f" -> {rate:,.0f} nf/s = {rate / engine_rate:.1%} of the engine alone"
                )
        print(f"  outputs identical across --workers: {len(digests) == 1}")
    print(f"load at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
