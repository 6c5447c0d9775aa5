#!/usr/bin/env python3
"""End-to-end speed and memory of unified_spike_processing_coo.py, per run and per stage.

Runs the pipeline's command line as a subprocess (``--cascade_model builtin --offline``) on an
input folder of ``subject_<n>`` folders, once per setting (``--workers 1 2 4`` by default, or
``--runs workers:batch_size:HxW,...``), and reports for each run:

* wall time, neuron-frames per second (whole run, and CASCADE alone from the stage timings);
* peak RSS of the whole process tree (psutil, every ``--interval`` s, summing the RSS of the
  pipeline and all its children), of the main process and of the largest single worker, and the
  memory to plan per worker;
* per-stage times: the ``timings`` JSON attribute of each subject's ``metadata.h5`` (whatever keys
  it has: load_s, inference_s, grid_s, write_s, ...);
* per-stage RSS: the samples are attributed to stages with the pipeline's own log lines, tailed
  from ``<output>/processing*.log`` while it runs (arrival time, so sub-second), see
  ``STAGE_MARKERS``: startup / load / prepare / inference / after inference (grid, COO, metadata,
  PDF) / finish (combined metadata, summary, pool shutdown). A stage's RSS is the peak over its
  samples, and "start" is the RSS when it began: a jump between the two is that stage's memory;
* active voxels (``total_spikes``), output file sizes, bytes per active voxel (size of
  ``preaugmented_grids_coo.h5`` / ``total_spikes``), and whether the COO coordinates are identical
  to the first run's with the same grid (they must be, whatever --workers and --batch_size).

Prints a table and, with ``--markdown PATH``, writes it as markdown with the machine, the date and
the commands. Without ``--input_dir`` a subject of ``--cells`` x ``--frames`` is generated once
(cached) with benchmarks/make_whole_fish.py (bounded memory).

    # the 1/10 fish (make it once with benchmarks/make_whole_fish.py --out /work/data/tenth_fish --cells 9000)
    python benchmarks/benchmark_pipeline.py --input_dir /work/data/tenth_fish --workers 1 2 \\
        --markdown benchmarks/RESULTS_pipeline.md --label "1/10 fish"

Each run's output goes to ``--out_dir/<run>/`` (emptied first), with the pipeline's stderr in
``stderr.log`` and, with ``--rss_csv``, the RSS time series with its stage in ``rss.csv``.
Memory must grow with the batch and the spikes, never with the dense (T, Z, H, W) grid: a run with a
4x larger grid (``--runs 2:30000:1024x512``) shows it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "unified_spike_processing_coo.py"
COO_FILENAME = "preaugmented_grids_coo.h5"
METADATA_FILENAME = "metadata.h5"
GB = 1e9

# Log lines that END a stage, in pipeline order (matched with re.search; a line is given to the
# latest stage whose pattern it matches). Stages whose line is missing merge into the next one
# ("load+inference"), so a renamed message costs resolution, not correctness. A stage's duration
# in the metadata timings (<stage>_s) splits off what came before it: "startup" before the first
# load, "prepare" before inference (trace-type decision, model, NaN scan).
STAGE_MARKERS = (
    ("load", r"\b\d+ cells x \d+ frames\b|(?i:\bloaded\b.*\bcells\b)"),
    ("inference", r"(?i)\b(cascade|inference)\b.*\b(batch(es)?|neuron-frames)\b"),
    ("after inference", r"(?i)\bactive voxels\b.*\bwritten\b|\bsubject\S*:? (done|finished)\b"),
)
PRE_STAGE_NAMES = {"inference": "prepare"}  # what runs before a stage's own timing starts
SUBJECT_IN_LINE = re.compile(r"\b(subject_[^\s:,;]+)")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)")


# ----------------------------------------------------------------------------------------------
# Running one setting: RSS sampling of the process tree and live tailing of the log
# ----------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the pipeline started
    total: int  # RSS of the whole tree, bytes
    main: int  # RSS of the pipeline process itself
    workers: dict  # pid -> RSS of each pool worker


@dataclass
class Run:
    name: str
    command: list
    workers: int
    batch_size: int | None
    grid: str | None
    out: Path
    wall_s: float = 0.0
    returncode: int = 0
    samples: list = field(default_factory=list)
    lines: list = field(default_factory=list)  # (arrival t, text)
    subjects: list = field(default_factory=list)
    segments: list = field(default_factory=list)


class LogTail:
    """New complete lines of ``<folder>/processing*.log`` (and extra files) since the last call."""

    def __init__(self, folder: Path, extra: list):
        self.folder, self.extra = folder, [Path(p) for p in extra]
        self.offsets: dict = {}
        self.partial: dict = {}

    def read(self) -> list:
        lines = []
        files = sorted(self.folder.glob("processing*.log")) + [p for p in self.extra if p.is_file()]
        for path in files:
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offsets.get(path, 0))
                    chunk = fh.read()
                    self.offsets[path] = fh.tell()
            except OSError:
                continue
            text = self.partial.pop(path, b"") + chunk
            *complete, rest = text.split(b"\n")
            if rest:
                self.partial[path] = rest
            lines += [line.decode("utf-8", "replace") for line in complete]
        return lines


def _worker_role(process: psutil.Process, cache: dict, main_pid: int) -> str:
    """'worker' (multiprocessing pool process: spawned, or forked by the fork server) or 'helper'
    (the fork server itself, the resource tracker, anything else)."""
    if process.pid not in cache:
        try:
            cmdline, parent = " ".join(process.cmdline()), process.ppid()
        except psutil.Error:
            cmdline, parent = "", main_pid
        spawned = "spawn_main" in cmdline or "multiprocessing-fork" in cmdline
        forked = "multiprocessing.forkserver" in cmdline and parent != main_pid
        is_worker = (spawned or forked) and "resource_tracker" not in cmdline
        cache[process.pid] = "worker" if is_worker else "helper"
    return cache[process.pid]


def run_pipeline(run: Run, interval: float, extra_logs: list) -> Run:
    if run.out.exists():
        shutil.rmtree(run.out)  # this run's own folder: a stale log or output would confuse the stages
    run.out.mkdir(parents=True)
    tail = LogTail(run.out, extra_logs)
    roles: dict = {}
    with open(run.out / "stderr.log", "wb") as stderr:  # a file, not a pipe: a full pipe would block
        started = time.perf_counter()
        process = psutil.Popen(run.command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO)
        while True:
            finished = process.poll() is not None
            now = time.perf_counter() - started
            try:
                tree = [process] + process.children(recursive=True)
            except psutil.Error:
                tree = []
            total = main = 0
            workers = {}
            for member in tree:
                try:
                    rss = member.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if member.pid == process.pid:
                    main = rss
                elif _worker_role(member, roles, process.pid) == "worker":
                    workers[member.pid] = rss
            if total and not finished:
                run.samples.append(Sample(now, total, main, workers))
            run.lines += [(now, line) for line in tail.read()]
            if finished:
                break
            time.sleep(interval)
        run.wall_s = time.perf_counter() - started
        run.returncode = process.returncode
    return run


# ----------------------------------------------------------------------------------------------
# Reading the outputs
# ----------------------------------------------------------------------------------------------


def _attr(attrs, key, default=None):
    value = attrs.get(key, default)
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def read_subject(folder: Path) -> dict:
    """Timings, counts, sizes and a digest of the COO coordinates of one output subject."""
    info = {"subject": folder.name, "files": {}}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            info["files"][path.name] = path.stat().st_size
    with h5py.File(folder / METADATA_FILENAME, "r") as h5:
        attrs = h5.attrs
        timings = _attr(attrs, "timings")
        timings = json.loads(timings) if timings else {}
        if not timings:  # older/newer layouts: every numeric attribute named *_s
            timings = {k: float(_attr(attrs, k)) for k in attrs if k.endswith("_s") and np.isscalar(attrs[k])}
        info["timings"] = {k: float(v) for k, v in timings.items()}
        info["num_cells"] = int(_attr(attrs, "num_cells", 0))
        info["num_frames"] = int(_attr(attrs, "num_original_frames", 0))
    with h5py.File(folder / COO_FILENAME, "r") as h5:
        attrs = h5.attrs
        info["total_spikes"] = int(_attr(attrs, "total_spikes", 0))
        info["spike_pixels"] = int(_attr(attrs, "spike_pixels", 0))
        info["marker_pixels"] = int(_attr(attrs, "marker_pixels", 0))
        info["grid_shape"] = [int(v) for v in h5["grid_shape"][()]]
        coords = h5["spike_coords"]
        digest = hashlib.sha256()
        step = 1 << 22  # 4 M rows (64 MB) at a time: bounded memory whatever the fish
        for start in range(0, coords.shape[0], step):
            digest.update(np.ascontiguousarray(coords[start : start + step]).tobytes())
        info["digest"] = digest.hexdigest()[:16]
    info["coo_bytes"] = info["files"].get(COO_FILENAME, 0)
    return info


# ----------------------------------------------------------------------------------------------
# Stages: log lines -> time segments -> RSS per segment
# ----------------------------------------------------------------------------------------------


def stage_segments(run: Run) -> list:
    """[(name, t0, t1, subject)] covering the run, from the stage-ending log lines and timings."""
    names = [name for name, _ in STAGE_MARKERS]
    patterns = [re.compile(pattern) for _, pattern in STAGE_MARKERS]
    timings = {s["subject"]: s["timings"] for s in run.subjects}
    segments, previous_t, previous_stage, subject = [], 0.0, -1, None
    for t, line in run.lines:
        stage = next((j for j in reversed(range(len(names))) if patterns[j].search(line)), None)
        if stage is None or stage == previous_stage:  # the summary repeats "active voxels": not a stage
            continue
        found = SUBJECT_IN_LINE.search(line)
        if stage < previous_stage or subject is None:
            subject = found.group(1) if found else None
        first = previous_stage + 1 if stage > previous_stage else 0
        name = "+".join(names[first : stage + 1])
        duration = timings.get(subject, {}).get(f"{name.replace(' ', '_')}_s")
        if duration is not None and t - duration > previous_t + 0.05:
            if name == "load":
                pre = "between subjects" if segments else "startup"
            else:
                pre = PRE_STAGE_NAMES.get(name, f"before {name}")
            segments.append((pre, previous_t, t - duration, subject))
            segments.append((name, t - duration, t, subject))
        else:
            segments.append((name, previous_t, t, subject))
        previous_t, previous_stage = t, stage
    segments.append(("finish" if segments else "whole run", previous_t, run.wall_s, None))
    return segments


def sub_segments(run: Run) -> list:
    """Approximate parts of each stage that has no log line of its own: the timings that follow
    the last marked stage's timing in the metadata (grid_s, write_s after inference_s today) are
    laid end to end from the start of the stage after it, the remainder is "rest" (metadata, PDF).
    Named "<stage> ~ <part>"; they assume nothing runs between the timed parts (concatenating the
    batches' results, a fraction of a second, does)."""
    timings = {s["subject"]: s["timings"] for s in run.subjects}
    marked = {f"{name.replace(' ', '_')}_s" for name, _ in STAGE_MARKERS}
    last_stage = STAGE_MARKERS[-1][0]
    parts = []
    for name, t0, t1, subject in run.segments:
        keys = list(timings.get(subject, {}))
        marked_at = [i for i, key in enumerate(keys) if key in marked]
        if name != last_stage or not marked_at:
            continue
        start, before = t0, len(parts)
        for key in keys[marked_at[-1] + 1 :]:
            if key == "total_s":
                continue
            end = min(t1, start + timings[subject][key])
            parts.append((f"{name} ~ {key.removesuffix('_s')}", start, end, subject))
            start = end
        if len(parts) > before and t1 - start > 0.05:
            parts.append((f"{name} ~ rest", start, t1, subject))
    return parts


def segment_rss(run: Run, t0: float, t1: float) -> dict:
    inside = [s for s in run.samples if t0 <= s.t <= t1]
    before = [s for s in run.samples if s.t <= t0]
    start = before[-1] if before else (inside[0] if inside else None)
    if not inside:
        return {"samples": 0, "start": start.total if start else None, "main_start": start.main if start else None}
    return {
        "samples": len(inside),
        "start": start.total,
        "main_start": start.main,
        "peak": max(s.total for s in inside),
        "main": max(s.main for s in inside),
        "worker": max((max(s.workers.values()) for s in inside if s.workers), default=None),
        "workers_sum": max((sum(s.workers.values()) for s in inside if s.workers), default=None),
    }


def summarize(run: Run) -> dict:
    cells = sum(s["num_cells"] for s in run.subjects)
    frames = max((s["num_frames"] for s in run.subjects), default=0)
    neuron_frames = sum(s["num_cells"] * s["num_frames"] for s in run.subjects)
    spikes = sum(s["total_spikes"] for s in run.subjects)
    coo = sum(s["coo_bytes"] for s in run.subjects)
    inference = sum(s["timings"].get("inference_s", 0.0) for s in run.subjects)
    worker_peaks = [max(s.workers.values()) for s in run.samples if s.workers]
    return {
        "name": run.name,
        "workers": run.workers,
        "batch_size": run.batch_size,
        "grid": run.grid,
        "wall_s": run.wall_s,
        "cells": cells,
        "frames": frames,
        "neuron_frames": neuron_frames,
        "neuron_frames_per_s": neuron_frames / run.wall_s if run.wall_s else 0.0,
        "inference_neuron_frames_per_s": neuron_frames / inference if inference else None,
        "peak_total_gb": max((s.total for s in run.samples), default=0) / GB,
        "peak_main_gb": max((s.main for s in run.samples), default=0) / GB,
        "peak_worker_gb": max(worker_peaks) / GB if worker_peaks else None,
        "num_workers_seen": len({pid for s in run.samples for pid in s.workers}),
        "active_voxels": spikes,
        "spike_pixels": sum(s["spike_pixels"] for s in run.subjects),
        "coo_bytes": coo,
        "bytes_per_voxel": coo / spikes if spikes else None,
        "output_bytes": sum(sum(s["files"].values()) for s in run.subjects),
        "files": {s["subject"]: s["files"] for s in run.subjects},
        "timings": {s["subject"]: s["timings"] for s in run.subjects},
        "dense_gb": sum(float(np.prod(s["grid_shape"])) for s in run.subjects) / GB,
        "digest": "/".join(s["digest"] for s in run.subjects),
        "stages": [
            {"stage": name, "subject": subject, "t0": t0, "t1": t1, **segment_rss(run, t0, t1)}
            for name, t0, t1, subject in run.segments
        ],
        "sub_stages": [
            {"stage": name, "subject": subject, "t0": t0, "t1": t1, **segment_rss(run, t0, t1)}
            for name, t0, t1, subject in sub_segments(run)
        ],
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _gb(value) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def _fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = psutil.virtual_memory()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = psutil.cpu_count()
    return {
        "cpu": cpu,
        "cpus": psutil.cpu_count(),
        "cpus_usable": affinity,
        "ram_gb": memory.total / GB,
        "available_gb": memory.available / GB,
        "load": os.getloadavg(),
        "python": platform.python_version(),
        "host": platform.node(),
    }


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", PIPELINE.name], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return rev + (" (pipeline modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(results: list, context: dict) -> list:
    """Markdown lines (also printed)."""
    m = context["machine"]
    lines = [
        f"# Pipeline benchmark: {context['label']}" if context["label"] else "# Pipeline benchmark",
        "",
        f"* date: {context['date']}; code: `{context['git']}` ({PIPELINE.name})",
        f"* machine: {m['cpu']}, {m['cpus']} CPUs ({m['cpus_usable']} usable), {m['ram_gb']:.1f} GB RAM "
        f"({m['available_gb']:.1f} GB available at start), load average {m['load'][0]:.2f}; Python {m['python']}",
        f"* input: `{context['input']}`: {context['input_desc']}",
        f"* benchmark: `{context['benchmark_command']}`",
        f"* RSS sampled every {context['interval']} s over the pipeline and all its children (summed; "
        "shared pages count once per process, so it overstates memory actually used a little).",
        "",
        "| run | workers | batch | grid HxW | wall s | neuron-frames/s | CASCADE neuron-frames/s | peak RSS GB "
        "(tree) | main GB | per worker GB | active voxels | COO MB | bytes/voxel | outputs MB | dense GB "
        "| identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['workers']} | {r['batch_size'] or 'default'} | {r['grid'] or 'default'} "
            f"| {r['wall_s']:.1f} | {r['neuron_frames_per_s']:,.0f} "
            f"| {_fmt(r['inference_neuron_frames_per_s'], ',.0f')} | {r['peak_total_gb']:.2f} "
            f"| {r['peak_main_gb']:.2f} | {_fmt(r['peak_worker_gb']) if r['workers'] > 1 else '(in main)'} "
            f"| {r['active_voxels']:,} | {r['coo_bytes'] / 1e6:.1f} | {_fmt(r['bytes_per_voxel'])} "
            f"| {r['output_bytes'] / 1e6:.1f} | {r['dense_gb']:.2f} | {r['identical']} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"* {r['name']}: `{shlex.join(r['command_display'])}`" for r in results]

    lines += ["", "## Stage times (the subjects' metadata.h5 `timings`, seconds)", ""]
    keys = list(dict.fromkeys(k for r in results for t in r["timings"].values() for k in t))
    lines += ["| run | subject | " + " | ".join(keys) + " | wall |", "|---" * (len(keys) + 3) + "|"]
    for r in results:
        for subject, t in r["timings"].items():
            lines.append(
                f"| {r['name']} | {subject} | "
                + " | ".join(_fmt(t.get(k), ".1f") for k in keys)
                + f" | {r['wall_s']:.1f} |"
            )

    lines += [
        "",
        "## RSS per stage (GB; stages from the pipeline's log lines, see STAGE_MARKERS)",
        "",
        "`start`: tree RSS when the stage began; `peak`: highest tree RSS during it; `main start`, `main`: "
        "the same for the pipeline process alone; `worker`: the largest single pool worker; `samples`: RSS "
        "samples in the stage.",
        "",
        "| run | stage | subject | from s | to s | seconds | start | peak | main start | main | worker | samples |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        subs = r["sub_stages"]
        for s in r["stages"]:
            rows = [s] + [p for p in subs if p["stage"].startswith(s["stage"] + " ~") and p["subject"] == s["subject"]]
            for row in rows:
                lines.append(
                    f"| {r['name']} | {row['stage']} | {row['subject'] or ''} | {row['t0']:.1f} | {row['t1']:.1f} "
                    f"| {row['t1'] - row['t0']:.1f} | {_gb(row.get('start'))} | {_gb(row.get('peak'))} "
                    f"| {_gb(row.get('main_start'))} | {_gb(row.get('main'))} | {_gb(row.get('worker'))} "
                    f"| {row['samples']} |"
                )
    lines += [
        "",
        "Rows `after inference ~ grid`, `~ write`, `~ rest` are approximate: the metadata's grid_s and "
        "write_s laid end to end from the end of inference (no log line marks them).",
    ]

    lines += ["", "## Memory to plan", ""]
    pooled = [r for r in results if r["workers"] > 1 and r["peak_worker_gb"]]
    for r in results:
        if r["workers"] > 1 and r["peak_worker_gb"]:
            after = max(
                (s.get("main") or 0 for s in r["stages"] if s["stage"] not in ("inference", "startup")), default=0
            )
            lines.append(
                f"* {r['name']}: main process peak {r['peak_main_gb']:.2f} GB (outside inference "
                f"{after / GB:.2f} GB), largest worker {r['peak_worker_gb']:.2f} GB at batch size "
                f"{r['batch_size'] or 'default'}; whole tree {r['peak_total_gb']:.2f} GB."
            )
        else:
            inference = [s for s in r["stages"] if s["stage"] == "inference" and s.get("main")]
            rise = max((s["main"] - (s["start"] or 0) for s in inference), default=None)
            lines.append(
                f"* {r['name']}: 1 worker runs in the main process: peak {r['peak_main_gb']:.2f} GB"
                + (f", of which inference added {rise / GB:.2f} GB" if rise is not None else "")
                + "."
            )
    if pooled:
        worker = max(r["peak_worker_gb"] for r in pooled)
        main = max(r["peak_main_gb"] for r in pooled)
        lines += [
            "",
            f"**Plan about {worker:.1f} GB per worker plus {main:.1f} GB for the main process** (largest "
            f"observed; total ~ {main:.1f} + workers x {worker:.1f} GB for this input and batch size).",
        ]
    return lines


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def generated_input(args) -> Path:
    """A cached synthetic subject of --cells x --frames (benchmarks/make_whole_fish.py)."""
    folder = Path(args.data_dir) / f"{args.cells}x{args.frames}"
    if not (folder / "subject_1" / "data_full.mat").is_file():
        command = [
            sys.executable,
            str(REPO / "benchmarks" / "make_whole_fish.py"),
            "--out",
            str(folder),
            "--cells",
            str(args.cells),
            "--frames",
            str(args.frames),
            "--planes",
            str(args.planes),
            "--fps",
            str(args.frame_rate_hz),
        ]
        print("generating:", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return folder


def describe_input(folder: Path, subjects: list) -> str:
    parts = []
    for subject in sorted(folder.glob("subject_*")) + sorted(folder.glob("Subjects/subject_*")):
        if subjects and subject.name not in subjects:
            continue
        series = subject / "TimeSeries.h5"
        if series.is_file():
            with h5py.File(series, "r") as h5:
                T, N = h5["CellResp"].shape
            parts.append(f"{subject.name} {N:,} cells x {T:,} frames (Chen layout)")
        elif (subject / "traces.h5").is_file():
            with h5py.File(subject / "traces.h5", "r") as h5:
                N, T = h5["traces"].shape
            parts.append(f"{subject.name} {N:,} cells x {T:,} frames (generic layout)")
    return "; ".join(parts) or "no subjects found"


def parse_runs(args) -> list:
    if args.runs:
        runs = []
        for spec in args.runs.split(","):
            workers, batch, grid = (spec.split(":") + ["", ""])[:3]
            runs.append((int(workers), int(batch) if batch else None, grid or None))
        return runs
    grid = "x".join(map(str, args.grid_shape)) if args.grid_shape else None
    return [(w, args.batch_size, grid) for w in args.workers]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", help="folder of subject_<n> folders (default: a generated subject)")
    parser.add_argument("--subjects", help="comma list passed to the pipeline's --subjects")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="one run per value")
    parser.add_argument("--batch_size", type=int, help="pipeline --batch_size (default: the pipeline's)")
    parser.add_argument("--grid_shape", type=int, nargs=2, metavar=("H", "W"), help="pipeline --grid_shape")
    parser.add_argument("--runs", help="instead of --workers: comma list of workers:batch_size:HxW")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run every setting this many times, alternating; report medians"
    )
    parser.add_argument("--extra", default="", help="more pipeline arguments, e.g. '--no_plots'")
    parser.add_argument("--pipeline", default=str(PIPELINE), help="the pipeline script to run")
    parser.add_argument("--out_dir", default="/tmp/spike_benchmark_out", help="runs write into <out_dir>/<run>")
    parser.add_argument("--interval", type=float, default=0.2, help="RSS sampling interval, s")
    parser.add_argument("--markdown", help="write the report here as markdown")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--rss_csv", action="store_true", help="write <out_dir>/<run>/rss.csv")
    parser.add_argument("--label", default="", help="title of the report, e.g. '1/10 fish, current code'")
    parser.add_argument("--extra_log", action="append", default=[], help="another log file to tail for stages")
    gen = parser.add_argument_group("generated input (without --input_dir)")
    gen.add_argument("--cells", type=int, default=20000)
    gen.add_argument("--frames", type=int, default=2000)
    gen.add_argument("--planes", type=int, default=29)
    gen.add_argument("--frame_rate_hz", type=float, default=1.97)
    gen.add_argument("--data_dir", default="/tmp/spike_benchmark_data")
    args = parser.parse_args(argv)

    input_dir = Path(args.input_dir) if args.input_dir else generated_input(args)
    subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else []
    context = {
        "label": args.label,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "git": git_revision(),
        "machine": machine(),
        "input": str(input_dir),
        "input_desc": describe_input(input_dir, subjects),
        "benchmark_command": shlex.join(["python", "benchmarks/benchmark_pipeline.py", *(argv or sys.argv[1:])]),
        "interval": args.interval,
    }
    m = context["machine"]
    print(
        f"input {input_dir}: {context['input_desc']}; machine: {m['cpus']} CPUs, {m['ram_gb']:.0f} GB RAM "
        f"({m['available_gb']:.1f} GB available)",
        flush=True,
    )

    results, first_by_grid, walls = [], {}, {}
    settings = [setting for _ in range(args.repeats) for setting in parse_runs(args)]  # alternating
    for index, (workers, batch, grid) in enumerate(settings):
        setting = f"w{workers}" + (f"_b{batch}" if batch else "") + (f"_{grid}" if grid else "")
        name = setting + (f"_r{index // len(parse_runs(args)) + 1}" if args.repeats > 1 else "")
        out = Path(args.out_dir) / name
        pipeline_args = ["--input_dir", str(input_dir), "--output_dir", str(out), "--workers", str(workers)]
        pipeline_args += ["--cascade_model", "builtin", "--offline"]
        if batch:
            pipeline_args += ["--batch_size", str(batch)]
        if grid:
            pipeline_args += ["--grid_shape", *grid.split("x")]
        if subjects:
            pipeline_args += ["--subjects", ",".join(subjects)]
        pipeline_args += args.extra.split()
        run = Run(name, [sys.executable, args.pipeline, *pipeline_args], workers, batch, grid, out)
        print(f"[{name}] {' '.join(run.command)}", flush=True)
        run_pipeline(run, args.interval, args.extra_log)
        if run.returncode != 0:
            tail = (out / "stderr.log").read_text(errors="replace")[-3000:]
            print(f"[{name}] pipeline exited with {run.returncode}:\n{tail}", file=sys.stderr)
            return 1
        run.subjects = [read_subject(d) for d in sorted(out.iterdir()) if (d / METADATA_FILENAME).is_file()]
        run.segments = stage_segments(run)
        result = summarize(run)
        result["command_display"] = ["python", Path(args.pipeline).name, *pipeline_args]
        first = first_by_grid.setdefault(grid, result)  # outputs compare only within one grid size
        result["identical"] = "yes" if result["digest"] == first["digest"] else "NO"
        results.append(result)
        walls.setdefault(setting, []).append(result["wall_s"])
        if args.rss_csv:
            with open(out / "rss.csv", "w") as fh:
                fh.write("t_s,total_gb,main_gb,workers_gb,max_worker_gb,stage\n")
                for s in run.samples:
                    stage = next((n for n, t0, t1, _ in run.segments if t0 <= s.t <= t1), "")
                    workers_sum = sum(s.workers.values()) / GB
                    top = max(s.workers.values(), default=0) / GB
                    fh.write(f"{s.t:.2f},{s.total / GB:.3f},{s.main / GB:.3f},{workers_sum:.3f},{top:.3f},{stage}\n")
        print(
            f"[{name}] wall {result['wall_s']:.1f} s, peak RSS {result['peak_total_gb']:.2f} GB (main "
            f"{result['peak_main_gb']:.2f}, worker {_fmt(result['peak_worker_gb'])}), "
            f"{result['active_voxels']:,} active voxels, {_fmt(result['bytes_per_voxel'])} B/voxel, "
            f"timings {json.dumps(result['timings'])}",
            flush=True,
        )

    lines = report(results, context)
    if args.repeats > 1:
        lines += ["", f"## Wall time over {args.repeats} alternating repeats (s)", ""]
        lines += ["| setting | median | runs |", "|---|---|---|"]
        lines += [
            f"| {setting} | {statistics.median(w):.2f} | {', '.join(f'{x:.2f}' for x in w)} |"
            for setting, w in walls.items()
        ]
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.markdown}")
    if args.json:
        Path(args.json).write_text(json.dumps({"context": context, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
