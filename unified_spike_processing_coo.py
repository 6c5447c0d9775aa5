#!/usr/bin/env python3
"""Whole-brain calcium imaging -> CASCADE spike inference -> COO-sparse spike grids.

For every subject (one fish) under --input_dir: load calcium traces and 3-D cell positions (Chen et al. 2018 or a
generic ``traces.h5``) as dF/F; infer spike rates with a fully convolutional CASCADE (Rupprecht et al. 2021; same
numbers, >20x faster) on a pool of workers; draw seeded binary spikes (independent of --workers and --batch_size);
map them to a (T, Z, H, W) grid; write a COO-sparse HDF5 grid, metadata and a PDF of plots per subject, then
combined metadata and a summary. The file reads top-down in that order; --help lists every option. Example::

    python unified_spike_processing_coo.py --input_dir raw_trace_data_2018 \\
        --output_dir processed_spike_grids_coo_2018 --workers 4 --batch_size 30000
"""

from __future__ import annotations

import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # SLURM's time limit or scancel, Ctrl-C: the run stops cleanly
# Run as a script (or the installed command), these wait (blocked) until main() takes them: a signal during the
# imports below then still ends the run with its one line and exit status, not a silent death or a traceback.
if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "unified-spike-processing-coo":
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import errno
import functools
import hashlib
import http.client
import io
import itertools
import json
import logging
import math
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import yaml
from numpy.lib.stride_tricks import as_strided

__version__ = "1.2.0"
log = logging.getLogger("spike_grids")
REPO_DIR = Path(__file__).resolve().parent
BUILTIN_MODEL_DIR = REPO_DIR / "models" / "builtin_2Hz_smoothing500ms"


class PipelineError(Exception):
    """An error with a one-line, user-facing explanation (which file, what to do)."""


def remove_quietly(path: Path) -> None:
    """Remove a file or a folder if it is there (temporaries, leftovers of a killed run)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def plural(count: int, word: str, plural_word: str = "") -> str:
    """'1 worker', '2 workers', '1,100 frames': a count and its noun in agreement, for log lines."""
    return f"{count:,} {word if count == 1 else plural_word or word + 's'}"


# =============================================================================================
# 1. Configuration of a run
# =============================================================================================
# Every parameter is declared once, here: default, --help text, argument group, and which stage's outputs it
# changes ('cascade': spikes and everything after; 'grid': only the grid, split and plots). Those make up the
# fingerprint that decides whether a finished subject is skipped on a rerun, and whether CASCADE's saved results
# can be re-gridded. The command line is built from it (int and float defaults parse as int and float); choices
# and help that come from a table further down (spike modes, input layouts) are filled in when it is built.
# Each stage takes only the settings it uses: a small dataclass whose fields are named after the options
# (settings_for), so no stage sees the whole configuration.

IO, RUN, MODEL, TRACES, GRID = "input and output", "running", "CASCADE model", "traces", "spikes and grid"
# CASCADE's post-processing by name, and the value cascade2p's predict() takes for it (False: none)
CASCADE_THRESHOLDS = {"0": 0, "1": 1, "none": False}
# Workers return the traces of this many seeded random cells; the PDF shows the first --num_neurons of them, so
# that option changes only the plots, never CASCADE's work.
PLOT_CELLS_MAX = 50


def option(default, help, group: str, affects: str | None = None, flag: str | None = None, **argparse_kwargs):
    """A configuration field with its command-line declaration (see build_parser). ``help`` and
    ``choices`` may be callables, for text and choices that come from a table defined further down."""
    metadata = {"help": help, "group": group, "affects": affects, "flag": flag, "kwargs": argparse_kwargs}
    return dataclasses.field(default=default, metadata=metadata)


def _comma_list(text: str) -> tuple:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _threshold_name(text: str) -> str:
    name = text.strip().lower()
    return "none" if name in ("false", "off") else name  # the spellings 1.0 accepted


def _shard_arg(text: str) -> tuple:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise argparse.ArgumentTypeError("must be K/N with 1 <= K <= N, e.g. 3/18")
    return int(match.group(1)), int(match.group(2))


def _spike_mode_help() -> str:
    return "; ".join(f"{name}: {mode.description}" for name, mode in SPIKE_MODES.items())


@dataclass(frozen=True)
class PipelineConfig:
    """Every parameter of a run (each recorded as param_<name> in every output file)."""

    input_dir: str = option(None, "folder of subject folders", IO, required=True)
    output_dir: str = option(None, "where <subject>/ outputs and combined_metadata.h5 go", IO, required=True)
    subjects: tuple = option((), "only these subjects (comma list)", IO, type=_comma_list)
    skip: tuple = option((), "skip these subjects (comma list)", IO, type=_comma_list)
    coordinates: str = option(
        "raw", "cell positions: CellXYZ (raw) or CellXYZ_norm (registered, shared across fish)", IO, "grid",
        choices=("raw", "registered"),
    )  # fmt: skip
    plots: bool = option(True, "skip the PDF of plots", IO, "grid", flag="--no_plots")
    cell_activity: bool = option(
        True, "skip cell_activity.h5 (per-cell rates and CASCADE's results: a later grid-only change then reruns "
        "CASCADE)", IO, "grid", flag="--no_cell_activity",
    )  # fmt: skip
    num_neurons: int = option(10, f"cells shown in the PDF's trace pages (at most {PLOT_CELLS_MAX})", IO, "grid")
    nwb: bool = option(
        False, "also write <subject>/<subject>_cascade.nwb: cells, input dF/F and CASCADE's rates (NWB)", IO, "grid",
        flag="--nwb",
    )  # fmt: skip
    nwb_subject_id: str | None = option(None, "--nwb: the subject's id (default: its folder's name)", IO)
    nwb_species: str | None = option(None, "--nwb: the subject's species, e.g. 'Danio rerio'", IO)
    nwb_experimenter: tuple = option((), "--nwb: experimenters, 'Last, First' (separate several with ;)", IO,
                                     type=lambda text: tuple(t.strip() for t in text.split(";") if t.strip()))  # fmt: skip
    log_file: str | None = option(None, "log file (default: <output_dir>/processing[_shard<K>of<N>].log)", IO)
    verbose: bool = option(False, "debug logging, tracebacks on errors", IO, flag="-v/--verbose")
    workers: int = option(
        1, "worker processes for CASCADE inference; each uses cores/workers threads (workers x threads per worker = "
        "the cores this job may use), so workers never add cores, only memory (~2 GB each for a whole fish with "
        "TensorFlow, less with --engine numpy; the main process ~1.7 GB). More workers keep the cores busier between "
        "the network's layers: on 2 cores a whole "
        "fish ran 9 %% faster with 2 workers than with 1. Choose the most that fit in memory, up to the cores "
        "(--inspect suggests a number; docs/performance.md)", RUN,
    )  # fmt: skip
    engine: str = option(
        "auto", lambda: "how CASCADE's network is evaluated: " + "; ".join(
            f"{name}: {engine.description}" for name, engine in CASCADE_ENGINES.items()
        ) + "; auto: tensorflow on CPUs with AVX-512 and with a GPU, numpy on the rest (faster there: docs/performance.md). "
        "Results agree to ~1e-6 and never depend on --workers or --batch_size", RUN,
        choices=lambda: (AUTO_ENGINE, *CASCADE_ENGINES),
    )  # fmt: skip
    batch_size: int = option(30000, "cells per batch sent to a worker (a worker's memory does not grow with it)", RUN)
    overwrite: bool = option(False, "recompute subjects whose finished outputs are up to date", RUN)
    shard: tuple | None = option(
        None, "process the K-th of N parts of the subjects (default in a SLURM array: from SLURM_ARRAY_TASK_*)", RUN,
        type=_shard_arg, metavar="K/N",
    )  # fmt: skip
    combine_only: bool = option(False, "only build combined_metadata.h5 and the summary from the outputs present", RUN)
    inspect: bool = option(
        False, "look before a run: per subject its layout, cells, frames, rate, trace type, model, warnings and "
        "refusals, estimated memory and time; then totals and a suggested --workers and SLURM memory. Runs no "
        "CASCADE and writes nothing (logs to stderr, and to --log_file if given)", RUN,
    )  # fmt: skip
    cascade_model: str = option(
        "Global_EXC_2Hz_smoothing500ms", "official model name, 'auto' (nearest sampling rate per subject) or "
        "'builtin' (nearest builtin model per subject)", MODEL, "cascade",
    )  # fmt: skip
    model_dir: str | None = option(None, "a CASCADE model folder (overrides --cascade_model)", MODEL)
    model_cache: str | None = option(
        None, "official models' cache (default: neuralib's ~/.cache/neuralib/cascade)", MODEL
    )
    strict_model: bool = option(
        False, "error instead of falling back to a builtin model when the named one is unavailable", MODEL
    )
    offline: bool = option(False, "never download: use --model_dir, the cache or the builtin models", MODEL)
    cascade_threshold: str = option(
        "1", "CASCADE's post-processing: 0 (negatives to 0), 1 (noise-floor cut) or none", MODEL, "cascade",
        type=_threshold_name, choices=tuple(CASCADE_THRESHOLDS),
    )  # fmt: skip
    max_rate_mismatch: float = option(
        0.5, "refuse a frame rate this fraction away from the model's (warn above 0.05)", MODEL
    )
    trace_type: str = option(
        "auto", "raw fluorescence (converted to dF/F) or dF/F; auto decides per subject", TRACES, "cascade",
        choices=("auto", "fluorescence", "dff"),
    )  # fmt: skip
    neuropil_coefficient: float | None = option(
        None, "suite2p: traces are F - c * Fneu with this c (default: the recording's neucoeff, else 0.7)", TRACES,
        "cascade", type=float, metavar="C",
    )  # fmt: skip
    iscell_threshold: float | None = option(
        None, "suite2p: cells are the ROIs whose classifier probability (iscell.npy column 2) is at least P "
        "(default: suite2p's own choice, iscell.npy column 1)", TRACES, "cascade", type=float, metavar="P",
    )  # fmt: skip
    baseline_percentile: float = option(8.0, "F0 percentile for dF/F", TRACES, "cascade")
    baseline_window_s: float = option(30.0, "sliding F0 window (seconds)", TRACES, "cascade")
    spike_mode: str = option("sample", _spike_mode_help, GRID, "cascade", choices=lambda: tuple(SPIKE_MODES))
    spike_threshold: float = option(0.5, "rate (spikes/frame) for --spike_mode threshold", GRID, "cascade")
    seed: int = option(42, "seed of spike sampling and of the train/test split", GRID, "cascade")
    target_rate_hz: float | None = option(
        None, "re-bin CASCADE's rates to this rate (Hz), conserving expected spikes, before spikes, grid and split: "
        "one time base for fish recorded at different rates (default: the recording's rate)", GRID, "cascade",
        type=float,
    )  # fmt: skip
    keep_edge_frames: bool = option(False, "keep the frames at both ends that CASCADE cannot predict", GRID, "grid")
    grid_shape: tuple = option(
        (256, 128), "grid height (x) and width (y) in pixels", GRID, "grid", type=int, nargs=2, metavar=("H", "W")
    )
    z_markers: bool = option(
        True, "no z-plane marker pixels (rows 0-1, last z+2 columns)", GRID, "grid", flag="--no_z_markers"
    )
    atlas_shape: tuple = option(
        (1406, 621, 138), "with --coordinates registered: the atlas extent in voxels (x, y, z) mapped onto the grid "
        "for every fish (Z-Brain's; CellXYZ_norm holds 1-based voxel indices into it)", GRID, "grid",
        type=int, nargs=3, metavar=("X", "Y", "Z"),
    )  # fmt: skip
    # 46 slabs of 3 Z-Brain voxels (6 um, about one neuron) divide its 138 voxels evenly, and with their z markers
    # (z + 2 columns) they fit the default grid width of 128
    z_planes: int = option(
        46, "with --coordinates registered: equal slabs of the atlas depth (grid planes)", GRID, "grid"
    )
    split: str = option(
        "blocks", "train/test split: blocks (--split_block frames shuffled, the original rule), conditions (per "
        "stimulus condition, whole repetitions: its last ones are test) or zapbench (ZAPBench's rule: "
        "each contiguous condition segment a contiguous train, validation and test, by --val_ratio and --test_ratio); see 'Train/test splits' in "
        "docs/outputs.md", GRID, "grid", choices=("blocks", "conditions", "zapbench"),
    )  # fmt: skip
    split_block: int = option(330, "frames per train/test block", GRID, "grid")
    split_ratio: float = option(
        0.95, "fraction of blocks (or of each condition's repetitions) for training", GRID, "grid"
    )
    holdout_condition: str | None = option(
        None, "put every timepoint of this stimulus condition (a name in timelists_names) in test", GRID, "grid"
    )
    # None by default (not 0): a fingerprint made before these options existed still matches (docs/outputs.md)
    val_ratio: float | None = option(
        None, "validation share (split code 1): blocks: this fraction of the blocks, after the test ones in the "
        "shuffled order; conditions: of each condition's repetitions, those before its test ones; zapbench: of each "
        "segment (default 0, with zapbench ZAPBench's 0.1)", GRID, "grid", type=float, metavar="F",
    )  # fmt: skip
    test_ratio: float | None = option(
        None, "with --split zapbench: the test share of each segment (default ZAPBench's 0.2; the other rules take "
        "1 - --split_ratio)", GRID, "grid", type=float, metavar="F",
    )  # fmt: skip
    condition_padding: int | None = option(
        None, "with --split zapbench: timepoints at both edges of each condition segment in no split (code -1; "
        "default ZAPBench's 1)", GRID, "grid", type=int, metavar="N",
    )  # fmt: skip
    export: tuple = option(
        (), lambda: "also write these formats from the run's saved results, for trainers that read them (comma list; "
        "adding one to a finished run reruns no CASCADE): " + "; ".join(
            f"{name}: {export.description}" for name, export in EXPORTS.items()
        ), IO, type=_comma_list, metavar="NAME[,NAME...]",
    )  # fmt: skip

    def __post_init__(self):
        object.__setattr__(self, "grid_shape", tuple(int(v) for v in self.grid_shape))
        object.__setattr__(self, "atlas_shape", tuple(int(v) for v in self.atlas_shape))
        registered = self.coordinates == "registered"
        checks = {
            "--atlas_shape needs three positive sizes": len(self.atlas_shape) != 3 or min(self.atlas_shape) < 1,
            "--z_planes must be at least 1": self.z_planes < 1,
            f"--z_planes {self.z_planes} with z markers needs a grid width of at least {self.z_planes + 1} "
            "(--grid_shape or --no_z_markers)": registered
            and self.z_markers
            and self.z_planes + 1 > self.grid_shape[-1],
            "--workers and --batch_size must be at least 1": self.workers < 1 or self.batch_size < 1,
            "--split_ratio in (0, 1], --split_block >= 1": not 0 < self.split_ratio <= 1 or self.split_block < 1,
            "--val_ratio and --test_ratio must be in [0, 1)": any(
                value is not None and not 0 <= value < 1 for value in (self.val_ratio, self.test_ratio)
            ),
            "--test_ratio and --condition_padding go with --split zapbench only (the other rules take 1 - "
            "--split_ratio for test and pad nothing)": self.split != "zapbench"
            and (self.test_ratio is not None or self.condition_padding is not None),
            "--condition_padding must be at least 0": self.condition_padding is not None and self.condition_padding < 0,
            "--val_ratio plus the test share must leave some training: with --split zapbench --val_ratio + "
            "--test_ratio < 1, otherwise --val_ratio < --split_ratio": (self.val_ratio or 0) > 0
            and (
                sum(zapbench_fractions(self)) >= 1
                if self.split == "zapbench"
                else (self.val_ratio or 0) >= self.split_ratio
            ),
            "--grid_shape needs positive H and W": len(self.grid_shape) != 2 or min(self.grid_shape) < 1,
            f"--num_neurons in [0, {PLOT_CELLS_MAX}]": not 0 <= self.num_neurons <= PLOT_CELLS_MAX,
            "--max_rate_mismatch >= 0": self.max_rate_mismatch < 0,
            "--baseline_percentile must be in [0, 100]": not 0 <= self.baseline_percentile <= 100,
            "--baseline_window_s must be positive": self.baseline_window_s <= 0,
            "--neuropil_coefficient must be >= 0": self.neuropil_coefficient is not None
            and self.neuropil_coefficient < 0,
            "--iscell_threshold must be in [0, 1]": self.iscell_threshold is not None
            and not 0 <= self.iscell_threshold <= 1,
            "--target_rate_hz must be a rate in Hz between {:g} and {:g}".format(*FRAME_RATE_RANGE_HZ): (
                self.target_rate_hz is not None
                and not FRAME_RATE_RANGE_HZ[0] <= self.target_rate_hz <= FRAME_RATE_RANGE_HZ[1]
            ),
            f"--cascade_threshold must be one of {', '.join(CASCADE_THRESHOLDS)}": (
                self.cascade_threshold not in CASCADE_THRESHOLDS
            ),
            f"--spike_mode must be one of {', '.join(SPIKE_MODES)}": self.spike_mode not in SPIKE_MODES,
            **export_refusals(self),
            "--inspect and --combine_only cannot go together (--inspect looks at the inputs, --combine_only gathers "
            "finished outputs): run one, then the other": self.inspect and self.combine_only,
        }
        if any(checks.values()):
            raise PipelineError("; ".join(message for message, bad in checks.items() if bad))

    def output_params(self, stage: str | None = None) -> dict:
        """The parameters that change the outputs (of one stage: 'cascade' or 'grid'), as JSON values."""
        stages = ("cascade", "grid") if stage is None else (stage,)
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["affects"] in stages}
        return json.loads(json.dumps(params))

    def as_attrs(self) -> dict:
        """Every parameter as HDF5 attributes param_<name>."""
        return {f"param_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}


def settings_for(settings_type, config: PipelineConfig, **values):
    """A stage's settings: the fields of ``settings_type`` not given in ``values`` are the options of that name."""
    fields = (f.name for f in dataclasses.fields(settings_type) if f.name not in values)
    return settings_type(**{name: getattr(config, name) for name in fields}, **values)


def h5_attr_value(value):
    """The one conversion of Python values to HDF5 attributes (None -> '', dict -> JSON, str tuple -> comma list)."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, default=str, sort_keys=True)
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if not value or isinstance(value[0], str) else np.asarray(value)
    return value


# =============================================================================================
# 2. Loading subjects: the input layouts (INPUT_LAYOUTS, at the end of this section) and their validation
# =============================================================================================
# Traces stay in their file and are read a block of cells at a time (by the workers, section 8), so no
# process ever holds a whole fish. Every other field is validated as it is read: a value that
# cannot be right is refused with one PipelineError naming the file, the field, what was found and
# what was expected; a doubtful but usable one is recorded with SubjectData.warn. Doubts only the
# traces reveal are checked after inference. The rules are the table "Doubtful inputs" in docs/inputs.md.

TRACE_READ_CELLS = 4096  # cells per read: a few tens of MB for a 4,000-frame recording
FRAME_RATE_RANGE_HZ = (0.01, 1000.0)  # outside: not a volume rate in Hz (a period, ms, a typo)
SHARED_POSITION_FRACTION = 0.01  # more cells than this sharing one x, y, z is a doubt


class BlockReads:
    """What every trace source offers on top of its read_raw(start, stop): infinite values made NaN, and
    chosen cells read a block at a time."""

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Traces of cells [start, stop) as (cells, T) float32; infinite values become NaN."""
        traces = self.read_raw(start, stop)
        mark_infinite_as_missing(traces)
        return traces

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Traces of chosen cells (ascending rows), read a block of cells at a time: scattered
        single columns would decompress each chunk once per column."""
        rows = np.asarray(rows, dtype=np.int64)
        parts = []
        for first in np.unique(rows // TRACE_READ_CELLS) * TRACE_READ_CELLS:
            wanted = rows[(rows >= first) & (rows < first + TRACE_READ_CELLS)]
            parts.append(self.read(int(wanted[0]), int(wanted[-1]) + 1)[wanted - wanted[0]])  # only their span
        return np.concatenate(parts) if parts else np.zeros((0, self.num_frames), np.float32)


@dataclass(frozen=True)
class TraceFile(BlockReads):
    """Where a subject's traces live: an HDF5 dataset with cells on rows (N, T) or columns (T, N); ``rows``
    (ascending) picks the stored rows that are cells (CaImAn's accepted components), None: all of them."""

    path: str
    dataset: str
    cells_on_columns: bool  # Chen's CellResp is (T, N)
    num_cells: int
    num_frames: int
    rows: np.ndarray | None = None

    def _stored(self, h5, first: int, last: int) -> np.ndarray:
        data = h5[self.dataset]
        return data[:, first:last].T if self.cells_on_columns else data[first:last]

    def read_raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Traces of cells [start, stop) as stored, as (cells, T) float32."""
        stop = self.num_cells if stop is None else min(stop, self.num_cells)
        traces = np.empty((max(0, stop - start), self.num_frames), dtype=np.float32)
        try:
            with h5py.File(self.path, "r") as h5:
                for first in range(start, stop, TRACE_READ_CELLS):
                    last = min(first + TRACE_READ_CELLS, stop)
                    if self.rows is None:
                        block = self._stored(h5, first, last)
                    else:  # the span of stored rows, then the cells among them
                        chosen = self.rows[first:last]
                        block = self._stored(h5, int(chosen[0]), int(chosen[-1]) + 1)[chosen - chosen[0]]
                    traces[first - start : last - start] = block
        except OSError as exc:  # e.g. a damaged compressed chunk
            raise PipelineError(f"cannot read {self.dataset} from {self.path} ({exc}): the file is damaged") from None
        return traces


@dataclass(frozen=True)
class Suite2pTraces(BlockReads):
    """suite2p's accepted ROIs of every plane as one recording: F - c * Fneu, read from the planes'
    memory-mapped F.npy and Fneu.npy a block of cells at a time (planes in order, ROIs ascending)."""

    path: str  # the folder holding the plane folders (messages)
    planes: tuple  # plane folders (str), in plane order
    rows: tuple  # per plane, its accepted ROIs (ascending int64 arrays)
    coefficients: tuple  # per plane, the neuropil coefficient c
    num_frames: int
    dataset: str = "F.npy - c * Fneu.npy"

    @property
    def num_cells(self) -> int:
        return sum(len(rows) for rows in self.rows)

    def read_raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """F - c * Fneu of cells [start, stop) as (cells, T) float32."""
        stop = self.num_cells if stop is None else min(stop, self.num_cells)
        traces = np.empty((max(0, stop - start), self.num_frames), dtype=np.float32)
        first = 0
        for plane, rows, coefficient in zip(self.planes, self.rows, self.coefficients):
            low, high, first = max(start, first), min(stop, first + len(rows)), first + len(rows)
            if low < high:
                chosen = rows[low - (first - len(rows)) : high - (first - len(rows))]
                span = slice(int(chosen[0]), int(chosen[-1]) + 1)
                try:
                    f, fneu = (np.load(Path(plane) / name, mmap_mode="r")[span, : self.num_frames][chosen - chosen[0]]
                               for name in ("F.npy", "Fneu.npy"))  # fmt: skip
                except (OSError, ValueError) as exc:
                    raise PipelineError(
                        f"cannot read {plane}: F.npy, Fneu.npy ({exc}): the files are damaged"
                    ) from None
                traces[low - start : high - start] = f.astype(np.float32) - np.float32(coefficient) * fneu.astype(
                    np.float32
                )
        return traces


def mark_infinite_as_missing(traces: np.ndarray) -> np.ndarray:
    """Infinite values -> NaN, in place; returns the count per cell (they are reported)."""
    infinite = np.isinf(traces)
    traces[infinite] = np.nan
    return infinite.sum(axis=1).astype(np.int32)


@dataclass(frozen=True)
class LoadOptions:
    """What loading a subject takes from the command line (fields named after the options)."""

    coordinates: str = "raw"  # 'raw' or 'registered' (layouts that have no registered positions refuse it)
    neuropil_coefficient: float | None = None  # suite2p: c in F - c * Fneu (None: the recording's neucoeff, else 0.7)
    iscell_threshold: float | None = (
        None  # suite2p: cells are ROIs of classifier probability >= this (None: iscell[:, 0])
    )


@dataclass(frozen=True, eq=False)
class Covariates:
    """What the experiment showed and what the fish did, row i at index i of their clock: the recording's frames as
    loaded, or the run's timepoints once resampled to the time base (TimeBase.resample_covariates); None or empty
    where the input does not hold it. Writers take them at the grid's rows with ``at``."""

    stimulus: np.ndarray | None = None  # (rows,) stimulus code per row of its clock (Chen's stim_full)
    condition: np.ndarray | None = None  # (rows,) int16 index into condition_names, -1 in no list
    condition_names: tuple = ()  # Chen's timelists_names
    condition_periods: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # (conditions,)
    behavior: np.ndarray | None = None  # (frames, 5) float32 (Chen's Behavior_full, 5 x T)
    eye: np.ndarray | None = None  # (frames, 2) float32 (Chen's Eye_full, 2 x T)
    extra: dict = dataclasses.field(default_factory=dict)  # name -> (frames, ...): the generic layout's covariates/
    stimulus_sets: tuple = ()  # (name, stimulus codes) per stimulus set (Chen's stimset), as recorded
    clock: str = "frames"  # what a row is: "frames" (the recording's) or "timepoints" (the run's time base)

    def arrays(self) -> dict:
        """name -> (frames, ...) array of every covariate present."""
        named = {"stimulus": self.stimulus, "condition": self.condition, "behavior": self.behavior, "eye": self.eye}
        return {name: array for name, array in {**named, **self.extra}.items() if array is not None}

    def at(self, indices) -> dict:
        """name -> array at the given rows of their clock: row t is ``indices[t]`` (e.g. timepoint_indices)."""
        indices = np.asarray(indices, dtype=np.int64)
        return {name: np.asarray(array)[indices] for name, array in self.arrays().items()}

    def period_of(self, condition: int) -> int | None:
        """Frames of one repetition of a condition, or None when its period is unknown."""
        return int(self.condition_periods[condition]) if condition < len(self.condition_periods) else None


@dataclass
class SubjectData:
    """One subject: where its traces are, and its cells' positions (N, 3) as [x, y, z]. ``trace_file`` is
    anything with num_cells, num_frames, path, dataset and read / read_raw / read_rows as TraceFile has,
    which pickles small (the workers read their own cells from it)."""

    name: str
    folder: str
    trace_file: TraceFile
    positions: np.ndarray  # (N, 3) float64: x (CellXYZ col 1), y (col 2), z (col 3)
    frame_rate_hz: float
    cell_ids: np.ndarray  # (N,) int64: 1-based row in CellXYZ (Chen) or 0-based index
    trace_type_hint: str | None = None
    source_files: tuple = ()
    warnings: list = dataclasses.field(default_factory=list)
    trace_type_reason: str = ""  # set where the layout itself says what its traces are (trace_type_hint)
    stored_cells: int | None = None  # ROIs or components in the files, accepted or not (None: num_cells)
    covariates: Covariates = dataclasses.field(default_factory=Covariates)  # on the recording's frames
    raw_positions: np.ndarray | None = None  # (N, 3) as the layout stores them (Chen: CellXYZ), for cell_activity.h5
    registered_positions: np.ndarray | None = None  # (N, 3) in a shared frame where the layout has one (CellXYZ_norm)
    doubts: list = dataclasses.field(default_factory=list)  # the loader's doubts, made warnings by load_subject
    layout: str = ""  # the InputLayout's name (set by load_subject)

    @property
    def num_cells(self) -> int:
        return self.trace_file.num_cells

    @property
    def num_frames(self) -> int:
        return self.trace_file.num_frames

    def read_traces(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(cells, T) float32 traces of cells [start, stop); the whole subject by default."""
        return self.trace_file.read(start, stop)

    def warn(self, message: str) -> None:
        """A doubt about the input: logged now, stored in the outputs' `warnings` attribute."""
        log.warning("%s: %s", self.name, message)
        self.warnings.append(message)


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_subjects(input_dir, only: Sequence[str] = (), skip: Sequence[str] = ()) -> list:
    """Subject folders under input_dir or input_dir/Subjects, in natural order: every folder that holds a layout
    of INPUT_LAYOUTS, and every ``subject_<n>`` (even a file or an empty folder: load_subject refuses it in plain
    words rather than skip it unseen). Other folders are named once in the log."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise PipelineError(f"input folder {input_dir} does not exist")
    folders, others = {}, []
    for root in (input_dir, input_dir / "Subjects"):
        for child in root.iterdir() if root.is_dir() else ():
            if re.fullmatch(r"subject_\d+", child.name) or (child.is_dir() and layouts_in(child)):
                folders.setdefault(child.name, child)
            elif child.is_dir() and not child.name.startswith(".") and child != input_dir / "Subjects":
                others.append(str(child.relative_to(input_dir)))
    if others:
        log.warning(f"not subjects (no layout this pipeline reads): {', '.join(sorted(others, key=_natural_key))}")
    names = sorted(folders, key=_natural_key)
    if unknown := [name for name in only if name not in folders]:
        found = ", ".join(names) or "none"
        raise PipelineError(f"--subjects names {', '.join(unknown)}, not found under {input_dir} (found: {found})")
    return [folders[name] for name in names if (not only or name in only) and name not in skip]


def _as_text(value) -> str | None:
    """The text a field or attribute holds (str, bytes, arrays of them), or None if not text."""
    items = [value] if isinstance(value, (str, bytes)) else np.asarray(value).ravel()
    if len(items) == 0 or not all(isinstance(item, (str, bytes)) for item in items):
        return None
    return ", ".join(item.decode(errors="replace") if isinstance(item, bytes) else item for item in items)


def _describe(array: np.ndarray) -> str:
    """What a field holds, in words, for messages."""
    if (text := _as_text(array)) is not None:
        return f"the text {text[:40]!r}"
    if array.dtype.kind == "c":
        return f"complex numbers ({array.dtype})"
    if array.dtype.kind not in "biuf":
        return f"{array.dtype} data of shape {array.shape} (a struct, cell or empty value?)"
    shown = ", ".join(f"{v:g}" for v in array.ravel()[:4]) + (", ..." if array.size > 4 else "")
    return f"{array.size} values ({shown})" if array.size != 1 else f"{array.item():g}"


def _numbers(value, where: str, expected: str) -> np.ndarray:
    """``value`` as float64, or a PipelineError '<where> holds <what was found>, expected <expected>'."""
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise PipelineError(f"{where} holds {_describe(array)}, expected {expected}")
    return array.astype(np.float64)


def _whole_numbers(value, where: str) -> np.ndarray:
    """1-based MATLAB indices (absIX, IX_inval_anat) as int64: whole numbers or a PipelineError."""
    numbers = _numbers(value, where, "1-based cell indices (whole numbers)").ravel()
    bad = ~np.isfinite(numbers) | (numbers != np.round(numbers))
    if bad.any():
        example = f"{int(bad.sum())} value(s) that are not whole numbers (e.g. {numbers[bad][0]:g})"
        raise PipelineError(f"{where} holds {example}, expected 1-based cell indices")
    return numbers.astype(np.int64)


def _frame_rate(value, where: str, doubts: list) -> float:
    """One frame rate in Hz from a field or attribute as stored; a number stored as text is read (a doubt)."""
    if (text := _as_text(value)) is not None:
        try:
            value = float(text.strip())
        except ValueError:
            raise PipelineError(f"{where} is the text {text[:40]!r}, expected a frame rate in Hz (a number)") from None
        doubts.append(f"{where} is stored as text ({text.strip()!r}), read as {value:g} Hz")
    rates = np.unique(_numbers(value, where, "a frame rate in Hz (a number)"))
    if rates.size != 1:
        found = "holds " + _describe(rates) if rates.size else "is empty"
        raise PipelineError(f"{where} {found}, expected one frame rate in Hz")
    rate, (low, high) = float(rates[0]), FRAME_RATE_RANGE_HZ
    if not low <= rate <= high:
        expected = f"a volume rate between {low:g} and {high:g} Hz (frames per second)"
        raise PipelineError(f"{where} is {rate:g} Hz, expected {expected}")
    return rate


def _check_file(path: Path, kind: str, needed: str) -> None:
    """Refuse a path that is not a readable, non-empty file of its kind ('an HDF5' or 'a MATLAB')."""
    if path.is_dir():
        raise PipelineError(f"{path} is a folder, expected {kind} file")
    if not path.is_file():
        raise PipelineError(f"{path} is {'a broken link' if path.is_symlink() else 'missing'} ({needed})")
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        denied = exc.errno in (errno.EACCES, errno.EPERM)
        raise PipelineError(f"cannot open {path}: {exc.strerror}" + (" (check its permissions)" * denied)) from None
    if not head:
        raise PipelineError(f"{path} is empty (0 bytes), expected {kind} file")
    if kind == "an HDF5" and not h5py.is_hdf5(path):
        raise PipelineError(f"{path} is not an HDF5 file (it starts with {head!r})")


def _check_positions(positions: np.ndarray, where: str, doubts: list) -> None:
    """Cells' [x, y, z]: finite and not all at one x, y; a flat axis or many shared positions are doubts."""
    num_cells, bad = len(positions), ~np.isfinite(positions).all(axis=1)
    if bad.any():
        first = f"first: trace {int(np.flatnonzero(bad)[0])}"
        raise PipelineError(
            f"{where}: {int(bad.sum())} of {num_cells} cells have NaN or infinite positions ({first}), expected finite coordinates"
        )
    flat = [axis for axis in (0, 1) if num_cells > 1 and np.ptp(positions[:, axis]) == 0]
    if len(flat) == 2:
        raise PipelineError(
            f"{where}: all {num_cells} cells are at one x, y position ({positions[0, 0]:g}, {positions[0, 1]:g}): every cell would fall in one voxel per plane, expected positions spread over the brain"
        )
    if flat:
        doubts.append(
            f"{where}: every cell has the same {'xy'[flat[0]]} ({positions[0, flat[0]]:g}): the grid is one line"
        )
    shared = num_cells - len(np.unique(positions, axis=0))
    if num_cells > 1 and shared > SHARED_POSITION_FRACTION * num_cells:
        doubts.append(f"{where}: {shared} cells share their x, y, z position with another cell (positions copied?)")


def _v73_value(node):
    """A MATLAB v7.3 value as numpy: matrices transposed back, char -> str, [] -> empty; a cell array (object
    references) -> an object array of its elements; a struct -> dict of its fields (a struct array's fields
    are cells, one element per struct)."""
    if isinstance(node, h5py.Group):
        return {key: _v73_value(child) for key, child in node.items()}
    if node.attrs.get("MATLAB_empty", 0):
        return np.empty(0)
    value = np.asarray(node[()])
    if h5py.check_dtype(ref=node.dtype) is not None:
        items = np.empty(value.shape, dtype=object)
        for index, reference in np.ndenumerate(value):
            items[index] = _v73_value(node.file[reference])
        return items.T
    if _as_text(node.attrs.get("MATLAB_class", b"")) == "char":
        return "".join(map(chr, value.ravel()))
    return value.T


def _mat_items(value) -> list:
    """The elements of a MATLAB cell or struct array as read (scipy squeezes a 1x1 cell to its element)."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return list(value.ravel())
    return [] if value is None else [value]


def _mat_struct_fields(path: Path) -> dict:
    """Fields of the struct ``data`` in data_full.mat: MATLAB v5 (scipy) or v7.3 (HDF5 after a
    512-byte text header; matrices stored transposed, char arrays as codes, [] as an empty marker)."""
    import scipy.io

    expected = "expected a struct with fields CellXYZ, fpsec, ..."
    if not h5py.is_hdf5(path):
        try:
            mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        except Exception as exc:
            raise PipelineError(f"cannot read {path} ({exc}): expected a complete MATLAB .mat file") from None
        if "data" not in mat:
            found = ", ".join(k for k in mat if not k.startswith("__"))
            raise PipelineError(f"{path} has no struct 'data' (found {found or 'nothing'})")
        if not hasattr(data := mat["data"], "_fieldnames"):
            raise PipelineError(f"{path}: variable 'data' holds {_describe(np.asarray(data))}, {expected}")
        return {name: np.asarray(getattr(data, name)) for name in data._fieldnames}
    fields = {}
    try:
        with h5py.File(path, "r") as h5:
            if "data" not in h5:
                raise PipelineError(f"{path} has no struct 'data' (found {', '.join(h5) or 'nothing'})")
            if not isinstance(h5["data"], h5py.Group):
                raise PipelineError(f"{path}: variable 'data' is an array, not a struct: {expected}")
            for key, node in h5["data"].items():
                fields[key] = _v73_value(node)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"cannot read {path} as MATLAB v7.3 ({exc})") from None
    return fields


def _open_trace_file(path: Path, dataset: str, cells_on_columns: bool, extra: tuple = (), attrs: tuple = ()) -> tuple:
    """The TraceFile of ``path[dataset]`` (shape and type checked, traces not read) and those of the
    file attributes named in ``attrs`` and the small datasets named in ``extra`` that are present."""
    try:
        h5 = h5py.File(path, "r")
    except Exception as exc:
        raise PipelineError(f"cannot open {path} ({exc}): the file is corrupt or truncated") from None
    with h5:
        if dataset not in h5:
            raise PipelineError(f"{path} has no dataset '{dataset}' (found {', '.join(h5) or 'nothing'})")
        if not isinstance(data := h5[dataset], h5py.Dataset):
            raise PipelineError(f"{path}: {dataset} is a group, expected a dataset")
        if data.ndim != 2:
            expected = "(T, N): frames x cells" if cells_on_columns else "(N, T): cells x frames"
            raise PipelineError(f"{path}: {dataset} has shape {data.shape}, expected {expected}")
        if data.dtype.kind not in "fiu":
            raise PipelineError(
                f"{path}: {dataset} holds {data.dtype} values, expected real numbers (fluorescence or dF/F)"
            )
        frames, cells = data.shape if cells_on_columns else data.shape[::-1]
        for key in extra:
            if key in h5 and not isinstance(h5[key], h5py.Dataset):
                raise PipelineError(f"{path}: {key} is a group, expected a dataset")
        found = {}
        for key in (*attrs, *extra):  # only what is asked for: other contents may be unreadable, no matter
            try:
                if key in attrs and key in h5.attrs:
                    found[key] = h5.attrs[key]
                elif key in extra and key in h5:
                    found[key] = np.asarray(h5[key][()])
            except Exception as exc:
                raise PipelineError(f"{path}: cannot read {'attribute ' * (key in attrs)}{key} ({exc})") from None
    return TraceFile(str(path), dataset, cells_on_columns, int(cells), int(frames)), found


def _chen_cell_ids(abs_ix, invalid_field, trace_file: TraceFile, num_rows: int, paths: tuple, doubts: list):
    """Each trace's 1-based row in CellXYZ: absIX (whole numbers, in range, each cell once) or,
    without absIX, the cells not listed in IX_inval_anat."""
    (series_path, anatomy_path), num_cells, num_frames = paths, trace_file.num_cells, trace_file.num_frames
    invalid = None
    if invalid_field is not None:  # only needed without absIX: unreadable, it is then ignored
        with contextlib.suppress(PipelineError) if abs_ix is not None else contextlib.nullcontext():
            invalid = _whole_numbers(invalid_field, f"{anatomy_path}: data.IX_inval_anat")
    if abs_ix is None:
        cell_ids = np.setdiff1d(np.arange(1, num_rows + 1), invalid if invalid is not None else [])
        if len(cell_ids) != num_cells:
            hint = " (is CellResp transposed?)" if len(cell_ids) == num_frames else ""
            raise PipelineError(
                f"{series_path} has no absIX and CellResp's {num_cells} cells do not match the {len(cell_ids)} valid cells of {anatomy_path}{hint}"
            )
        return cell_ids
    where = f"{series_path}: absIX"
    if np.ndim(abs_ix) > 2 or (np.ndim(abs_ix) == 2 and min(np.shape(abs_ix)) > 1):
        raise PipelineError(f"{where} has shape {np.shape(abs_ix)}, expected (1, N): one cell index per trace")
    cell_ids = _whole_numbers(abs_ix, where)
    if len(cell_ids) != num_cells:
        hint = f" (CellResp is {num_frames} x {num_cells}: is it transposed? expected frames x cells)"
        raise PipelineError(
            f"{where} lists {len(cell_ids)} cells but CellResp has {num_cells}" + hint * (len(cell_ids) == num_frames)
        )
    low, high = int(cell_ids.min(initial=1)), int(cell_ids.max(initial=1))
    if low < 1 or high > num_rows:
        zero_based = " (it looks 0-based: add 1)" if low == 0 and high < num_rows else ""
        raise PipelineError(
            f"{where} holds indices {low}..{high}, expected 1-based rows of data.CellXYZ (1..{num_rows}){zero_based}"
        )
    unique, counts = np.unique(cell_ids, return_counts=True)
    if len(unique) < len(cell_ids):
        raise PipelineError(
            f"{where} lists {int((counts > 1).sum())} cell(s) more than once (cell {unique[counts.argmax()]} {counts.max()} times), expected each trace to be a different cell"
        )
    if invalid is not None and (listed := int(np.isin(cell_ids, invalid).sum())):
        doubts.append(
            f"{where}: {listed} traces are cells that data.IX_inval_anat marks anatomically invalid (Chen's absIX leaves them out)"
        )
    return cell_ids


# Chen's per-frame fields, what they become, and the channels a (channels x T) one holds (None: a (T,) vector)
CHEN_SERIES = {"stim_full": ("stimulus", None), "Behavior_full": ("behavior", 5), "Eye_full": ("eye", 2)}
CHEN_COVARIATE_FIELDS = (*CHEN_SERIES, "timelists", "timelists_names", "periods", "stimset")


def _frame_series(value, num_frames: int, channels: int | None, where: str, doubts: list) -> np.ndarray | None:
    """A per-frame field as (frames,) or (frames, channels), or None (a doubt: left out, never misaligned)."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        doubts.append(f"{where} holds {_describe(array)}, expected numbers per frame: left out")
        return None
    array = array.astype(np.float64)
    expected = (num_frames,) if channels is None else (channels, num_frames)
    if channels is None and array.ndim == 2 and 1 in array.shape:
        array = array.ravel()  # MATLAB's 1 x T or T x 1
    elif channels is not None and array.shape == expected[::-1] != expected:
        array = array.T  # stored frames x channels
    if array.shape != expected:
        what = "one value per frame" if channels is None else f"{channels} channels x {num_frames} frames"
        doubts.append(f"{where} has shape {array.shape}, expected {what} ({expected}): left out")
        return None
    if channels is None and np.isfinite(array).all() and (array == np.round(array)).all() and abs(array).max() < 2**15:
        return array.astype(np.int16)  # stimulus codes
    return (array if channels is None else array.T).astype(np.float32)


def _chen_conditions(fields: dict, num_frames: int, where: str, doubts: list) -> tuple:
    """(condition (frames,) int16 or None, names, periods) from timelists (1-based frames per stimulus set),
    timelists_names and periods; doubtful ones are left out with a warning."""
    lists = _mat_items(fields.get("timelists"))
    names = [_as_text(name) for name in _mat_items(fields.get("timelists_names"))]
    if not lists:
        return None, (), np.zeros(0, np.int64)
    if "timelists_names" not in fields:
        names = [f"set_{index + 1}" for index in range(len(lists))]
    if len(names) != len(lists) or None in names:
        doubts.append(
            f"{where}: data.timelists_names holds {len(names)} names for {len(lists)} timelists: conditions left out"
        )
        return None, (), np.zeros(0, np.int64)
    condition = np.full(num_frames, -1, dtype=np.int16)
    for index, frames in enumerate(lists):
        frames = np.asarray(frames).ravel()
        whole = frames.dtype.kind in "iuf" and np.isfinite(frames).all() and (frames == np.round(frames)).all()
        if not whole or (frames.size and (frames.min() < 1 or frames.max() > num_frames)):
            doubts.append(
                f"{where}: data.timelists{{{index + 1}}} ({names[index]}) holds {_describe(frames)}, expected 1-based frames 1..{num_frames}: conditions left out"
            )
            return None, (), np.zeros(0, np.int64)
        frames = frames.astype(np.int64) - 1
        if (taken := condition[frames] >= 0).any():
            doubts.append(
                f"{where}: {plural(int(taken.sum()), 'frame')} of timelists{{{index + 1}}} ({names[index]}) {'is' if taken.sum() == 1 else 'are'} in an earlier list: kept there"
            )
        condition[frames[~taken]] = index
    periods = np.zeros(0, np.int64)
    if "periods" in fields:
        found = np.asarray(fields["periods"]).ravel()
        if (
            found.dtype.kind in "iuf"
            and found.size == len(lists)
            and (found >= 1).all()
            and (found == np.round(found)).all()
        ):
            periods = found.astype(np.int64)
        else:
            doubts.append(
                f"{where}: data.periods holds {_describe(found)}, expected one period (frames) per timelist: left out"
            )
    return condition, tuple(names), periods


def _chen_stimulus_sets(value) -> tuple:
    """(name, stimulus codes) per element of Chen's stimset (a struct array: name, pattern), as read."""
    if isinstance(value, dict):  # MATLAB v7.3: a struct of fields, cells for a struct array
        names, patterns = _mat_items(value.get("name")), _mat_items(value.get("pattern"))
    else:
        items = _mat_items(value)
        names, patterns = [getattr(i, "name", None) for i in items], [getattr(i, "pattern", None) for i in items]
    sets = []
    for name, pattern in zip(names, patterns):
        codes = np.asarray(pattern if pattern is not None else []).ravel()
        if _as_text(name) is None or codes.dtype.kind not in "iuf":
            return ()
        sets.append((_as_text(name), tuple(float(code) for code in np.unique(codes))))
    return tuple(sets)


def _chen_covariates(fields: dict, num_frames: int, where: str, doubts: list) -> Covariates:
    """Chen's stimulus, conditions and behaviour, per frame. A missing field is skipped (one INFO line);
    one of the wrong length or kind is a doubt and left out."""
    if missing := [name for name in CHEN_COVARIATE_FIELDS if name not in fields]:
        log.info(f"{where}: no data.{', data.'.join(missing)}: those covariates are skipped")
    series = {
        covariate: _frame_series(fields[name], num_frames, channels, f"{where}: data.{name}", doubts)
        for name, (covariate, channels) in CHEN_SERIES.items()
        if name in fields
    }
    condition, names, periods = _chen_conditions(fields, num_frames, where, doubts)
    stimulus_sets = _chen_stimulus_sets(fields["stimset"]) if "stimset" in fields else ()
    if "stimset" in fields and not stimulus_sets:
        doubts.append(f"{where}: data.stimset is not a struct array of name and pattern: left out")
    return Covariates(condition=condition, condition_names=names, condition_periods=periods,
                      stimulus_sets=stimulus_sets, **series)  # fmt: skip


def _chen_position_sets(fields: dict, cell_ids: np.ndarray, anatomy_path: Path) -> tuple:
    """(CellXYZ, CellXYZ_norm) of the traces' cells, each None when the file lacks it as (cells, 3) numbers
    (logged: only cell_activity.h5 misses it; the positions the grid uses are checked above)."""
    found = []
    for key in ("CellXYZ", "CellXYZ_norm"):
        xyz = np.asarray(fields.get(key, np.empty(0)))
        xyz = xyz.T if xyz.ndim == 2 and xyz.shape[1] != 3 else xyz
        if xyz.dtype.kind in "iuf" and xyz.ndim == 2 and xyz.shape[1] == 3 and len(xyz) >= cell_ids.max(initial=0):
            found.append(xyz[cell_ids - 1].astype(np.float64))
        else:
            log.info("%s: no data.%s as (cells, 3) numbers: cell_activity.h5 goes without it", anatomy_path, key)
            found.append(None)
    return tuple(found)


def load_chen2018_subject(folder: Path, options: LoadOptions) -> SubjectData:
    """A fish in the Chen et al. 2018 layout (TimeSeries.h5 + data_full.mat)."""
    series_path, anatomy_path = folder / "TimeSeries.h5", folder / "data_full.mat"
    for path, kind in ((series_path, "an HDF5"), (anatomy_path, "a MATLAB")):
        _check_file(path, kind, "the Chen 2018 layout needs TimeSeries.h5 and data_full.mat")
    trace_file, datasets = _open_trace_file(series_path, "CellResp", True, extra=("absIX",))
    fields = _mat_struct_fields(anatomy_path)
    key = "CellXYZ_norm" if options.coordinates == "registered" else "CellXYZ"
    for name, meaning in ((key, "cell positions"), ("fpsec", "frame rate")):
        if name not in fields:
            raise PipelineError(f"{anatomy_path}: struct data has no {name} ({meaning})")
    where = f"{anatomy_path}: data.{key}"
    cell_xyz = _numbers(fields[key], where, "numbers (cells x 3 positions)")
    if cell_xyz.ndim != 2 or 3 not in cell_xyz.shape:
        raise PipelineError(f"{where} has shape {cell_xyz.shape}, expected (cells, 3)")
    cell_xyz = cell_xyz if cell_xyz.shape[1] == 3 else cell_xyz.T
    doubts: list = []
    frame_rate_hz = _frame_rate(fields["fpsec"], f"{anatomy_path}: data.fpsec", doubts)
    paths = (series_path, anatomy_path)
    cell_ids = _chen_cell_ids(
        datasets.get("absIX"), fields.get("IX_inval_anat"), trace_file, len(cell_xyz), paths, doubts
    )
    positions = cell_xyz[cell_ids - 1]
    _check_positions(positions, where, doubts)
    covariates = _chen_covariates(fields, trace_file.num_frames, str(anatomy_path), doubts)
    sources = (str(series_path), str(anatomy_path))
    subject = SubjectData(
        folder.name, str(folder), trace_file, positions, frame_rate_hz, cell_ids, None, sources, covariates=covariates,
        doubts=doubts,
    )  # fmt: skip
    subject.raw_positions, subject.registered_positions = _chen_position_sets(fields, cell_ids, anatomy_path)
    return subject


def _generic_covariates(path: Path, num_frames: int, doubts: list) -> Covariates:
    """traces.h5's optional covariates/ group: (frames, ...) datasets, passed through; others are doubts."""
    extra = {}
    with h5py.File(path, "r") as h5:
        group = h5.get("covariates")
        if not isinstance(group, h5py.Group):
            if group is not None:
                doubts.append(f"{path}: covariates is a dataset, expected a group of (frames, ...) datasets: left out")
            return Covariates()
        for name, dataset in group.items():
            is_dataset = isinstance(dataset, h5py.Dataset)
            if (
                not is_dataset
                or not dataset.shape
                or dataset.shape[0] != num_frames
                or dataset.dtype.kind not in "biuf"
            ):
                found = f"shape {dataset.shape} of {dataset.dtype}" if is_dataset else "a group"
                doubts.append(f"{path}: covariates/{name} has {found}, expected numbers ({num_frames}, ...): left out")
            else:
                extra[name] = dataset[()]
    return Covariates(extra=extra)


def load_generic_subject(folder: Path, options: LoadOptions) -> SubjectData:
    """The generic layout: traces.h5 with traces (N, T), positions (N, 3), attr frame_rate_hz."""
    path = folder / "traces.h5"
    _check_file(path, "an HDF5", "the generic layout needs traces.h5")
    trace_file, found = _open_trace_file(path, "traces", False, ("positions",), ("frame_rate_hz", "trace_type"))
    for name in ("positions", "attribute frame_rate_hz"):
        if name.split()[-1] not in found:
            raise PipelineError(f"{path} lacks {name}")
    positions = _numbers(found["positions"], f"{path}: positions", "numbers (cells x 3 positions)")
    if positions.shape != (trace_file.num_cells, 3):
        shapes = f"traces {(trace_file.num_cells, trace_file.num_frames)} and positions {positions.shape}"
        raise PipelineError(f"{path}: {shapes} must be (N, T) and (N, 3)")
    doubts: list = []
    frame_rate_hz = _frame_rate(found["frame_rate_hz"], f"{path}: attribute frame_rate_hz", doubts)
    hint = (_as_text(found["trace_type"]) or "?").strip().lower() if "trace_type" in found else None
    if hint not in (None, "dff", "fluorescence"):
        doubts.append(
            f"{path}: attribute trace_type is {_describe(np.asarray(found['trace_type']))}, expected 'dff' or 'fluorescence': ignored (the type is decided from the data, or set --trace_type)"
        )
        hint = None
    _check_positions(positions, f"{path}: positions", doubts)
    cell_ids = np.arange(trace_file.num_cells, dtype=np.int64)
    covariates = _generic_covariates(path, trace_file.num_frames, doubts)
    subject = SubjectData(
        folder.name, str(folder), trace_file, positions, frame_rate_hz, cell_ids, hint, (str(path),),
        covariates=covariates, doubts=doubts,
    )  # fmt: skip
    subject.raw_positions = positions
    return subject


# --- suite2p: plane folders suite2p/plane<k>/ (or plane<k>/ directly); never combined/, whose positions are
# shifted by the GUI's tiling and whose planes are zero-padded
SUITE2P_NEUROPIL_COEFFICIENT = 0.7  # suite2p's own default c, for recordings that do not record theirs
_PLANE_RE = re.compile(r"plane(\d+)")


def _suite2p_planes(folder: Path) -> tuple:
    """The folder holding the plane folders, and (index, plane folder) of each plane<k>, in plane order."""
    root = folder / "suite2p" if (folder / "suite2p").is_dir() else folder
    planes = []
    with contextlib.suppress(OSError):
        planes = [(int(m[1]), p) for p in root.iterdir() if (m := _PLANE_RE.fullmatch(p.name)) and p.is_dir()]
    return root, sorted(planes)


def _load_npy(path: Path, what: str, mmap: bool = False):
    """An .npy file as suite2p writes it (stat, ops, settings and db are pickled objects)."""
    if not path.is_file():
        raise PipelineError(f"{path} is {'a folder' if path.is_dir() else 'missing'} ({what})")
    try:
        value = np.load(path, mmap_mode="r") if mmap else np.load(path, allow_pickle=True)
    except Exception as exc:
        raise PipelineError(f"cannot read {path} ({exc}): expected the .npy file suite2p writes") from None
    return value.item() if value.dtype == object and value.ndim == 0 else value


def _suite2p_settings(plane: Path) -> tuple:
    """(fs, neucoeff or None, the file they are from): ops.npy (suite2p <= 0.14) or settings.npy + db.npy (1.x)."""
    names = ("ops.npy",) if (plane / "ops.npy").exists() else ("settings.npy", "db.npy")
    if not (plane / names[0]).exists():
        raise PipelineError(
            f"{plane} has neither ops.npy (suite2p <= 0.14) nor settings.npy (suite2p 1.x): its frame rate is unknown"
        )
    found = [_load_npy(plane / name, "suite2p's settings") if (plane / name).exists() else {} for name in names]
    for name, value in zip(names, found):
        if not isinstance(value, dict):
            raise PipelineError(f"{plane / name} holds {_describe(np.asarray(value))}, expected suite2p's dict")
    if names[0] == "ops.npy":
        return found[0].get("fs"), found[0].get("neucoeff"), plane / "ops.npy"
    settings, db = found
    extraction = settings.get("extraction") if isinstance(settings.get("extraction"), dict) else {}
    where = plane / ("settings.npy" if "fs" in settings or "fs" not in db else "db.npy")
    return settings.get("fs", db.get("fs")), extraction.get("neuropil_coefficient"), where


def _suite2p_plane(index: int, plane: Path, options: LoadOptions, doubts: list) -> tuple:
    """One plane: its accepted ROIs, their [x, y, z] (x = med[0], y = med[1], z = the plane index), its frames,
    frame rate and neuropil coefficient."""
    shapes = {}
    for name in ("F.npy", "Fneu.npy"):
        array = _load_npy(plane / name, "suite2p's fluorescence traces", mmap=True)
        if array.ndim != 2 or array.dtype.kind not in "fiu":
            raise PipelineError(f"{plane / name} holds {array.dtype} of shape {array.shape}, expected (ROIs, frames)")
        shapes[name] = array.shape
    if shapes["F.npy"] != shapes["Fneu.npy"]:
        raise PipelineError(f"{plane}: F.npy {shapes['F.npy']} and Fneu.npy {shapes['Fneu.npy']} differ in shape")
    num_rois, num_frames = shapes["F.npy"]
    where = plane / "iscell.npy"
    iscell = _numbers(_load_npy(where, "which ROIs are cells"), str(where), "numbers (ROIs x 2)")
    if iscell.ndim != 2 or iscell.shape[0] != num_rois or iscell.shape[1] < 2:
        raise PipelineError(f"{where} has shape {iscell.shape}, expected ({num_rois}, 2): F.npy has {num_rois} ROIs")
    threshold = options.iscell_threshold
    rows = np.flatnonzero(iscell[:, 0] > 0.5 if threshold is None else iscell[:, 1] >= threshold)
    stat = _load_npy(plane / "stat.npy", "the ROIs' positions")
    if np.ndim(stat) != 1 or len(stat) != num_rois:
        raise PipelineError(
            f"{plane / 'stat.npy'} holds {np.shape(stat)} entries, expected one dict per ROI ({num_rois})"
        )
    try:
        centres = np.array([np.asarray(stat[row]["med"], dtype=float)[:2] for row in rows]).reshape(-1, 2)
    except (KeyError, TypeError, ValueError, IndexError):
        raise PipelineError(
            f"{plane / 'stat.npy'}: an ROI has no 'med' (its y, x centre), expected suite2p's stat"
        ) from None
    fs, neucoeff, settings_path = _suite2p_settings(plane)
    if fs is None:
        raise PipelineError(f"{settings_path} has no fs (the frame rate per plane, which is the volume rate)")
    rate = _frame_rate(fs, f"{settings_path}: fs", doubts)
    coefficient = options.neuropil_coefficient
    if coefficient is None:
        coefficient = SUITE2P_NEUROPIL_COEFFICIENT if neucoeff is None else float(neucoeff)
    return rows, np.c_[centres, np.full(len(rows), float(index))], num_frames, rate, coefficient


def load_suite2p_subject(folder: Path, options: LoadOptions) -> SubjectData:
    """suite2p's plane folders: every plane's accepted ROIs, traces F - c * Fneu (raw fluorescence)."""
    root, planes = _suite2p_planes(folder)
    if not planes:
        raise PipelineError(f"{root} has no plane<k> folders (suite2p writes suite2p/plane0, plane1, ...)")
    doubts: list = []
    rows, positions, frames, rates, coefficients = zip(*(_suite2p_plane(k, p, options, doubts) for k, p in planes))
    if len(set(rates)) > 1:
        raise PipelineError(
            f"{root}: the planes' fs differ ({', '.join(f'{r:g}' for r in rates)} Hz), expected one volume rate"
        )
    if len(set(frames)) > 1:
        doubts.append(
            f"{root}: the planes have {min(frames)} to {max(frames)} frames: the first {min(frames)} of each are used"
        )
    if not sum(map(len, rows)):
        chosen = (
            "iscell.npy column 1"
            if options.iscell_threshold is None
            else f"--iscell_threshold {options.iscell_threshold:g}"
        )
        raise PipelineError(
            f"{root}: no ROI of {len(planes)} plane(s) is a cell by {chosen}: lower --iscell_threshold P"
        )
    positions = np.concatenate(positions)
    _check_positions(positions, f"{root}: stat.npy med", doubts)
    traces = Suite2pTraces(str(root), tuple(str(p) for _, p in planes), rows, coefficients, min(frames))
    files = ("F.npy", "Fneu.npy", "iscell.npy", "stat.npy", "ops.npy", "settings.npy", "db.npy")
    sources = tuple(str(p / name) for _, p in planes for name in files if (p / name).is_file())
    c_values = ", ".join(f"{c:g}" for c in dict.fromkeys(coefficients))
    return SubjectData(
        folder.name, str(folder), traces, positions, rates[0], np.arange(traces.num_cells), "fluorescence", sources,
        trace_type_reason=f"suite2p's F - c * Fneu (c = {c_values}) is raw fluorescence",
        stored_cells=_suite2p_size(folder) // max(min(frames), 1) if len(set(frames)) == 1 else None, doubts=doubts,
    )  # fmt: skip


def _suite2p_size(folder: Path) -> int:
    sizes = (np.load(p / "F.npy", mmap_mode="r").size for _, p in _suite2p_planes(folder)[1] if (p / "F.npy").is_file())
    with contextlib.suppress(Exception):
        return int(sum(sizes))
    return 0


# --- CaImAn: the .hdf5 file cnm.save() writes (groups estimates/ and params/; None stored as the text 'NoneType')


def _the_file(folder: Path, suffix: str, tool: str) -> Path:
    """The one file of a suffix in a subject folder (several: which is the subject's is unknown)."""
    found = sorted(p for p in folder.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4])
        raise PipelineError(f"{folder} holds {len(found)} {tool} files ({names}): expected one per subject folder")
    return found[0]


def _caiman_dataset(h5, key: str, path: Path):
    """A dataset of a CaImAn file, or None where it is absent or saved as None ('NoneType')."""
    item = h5.get(key)
    if item is None or not isinstance(item, h5py.Dataset):
        return None
    try:
        value = item[()]
    except Exception as exc:
        raise PipelineError(f"{path}: cannot read {key} ({exc})") from None
    return None if _as_text(value) == "NoneType" else value


def _caiman_centres(h5, path: Path, dims: np.ndarray, components: np.ndarray) -> np.ndarray:
    """[x, y, z] centres of mass of the chosen columns of estimates/A (pixels x components, CSC, pixels in
    Fortran order over dims; 2-D dims give z = 0)."""
    group = h5.get("estimates/A")
    if not isinstance(group, h5py.Group) or not {"data", "indices", "indptr", "shape"} <= set(group):
        raise PipelineError(
            f"{path}: estimates/A is not the sparse matrix cnm.save writes (data, indices, indptr, shape)"
        )
    data, indices, indptr = (np.asarray(group[key][()]) for key in ("data", "indices", "indptr"))
    num_pixels, num_components = (int(v) for v in group["shape"][()])
    if num_pixels != int(np.prod(dims)) or len(indptr) != num_components + 1:
        raise PipelineError(
            f"{path}: estimates/A is {num_pixels} x {num_components}, expected pixels of params/data/dims {tuple(dims)} x components"
        )
    column = np.repeat(np.arange(num_components), np.diff(indptr))
    coords = np.unravel_index(indices, tuple(int(d) for d in dims), order="F")
    weight = np.bincount(column, weights=data, minlength=num_components)
    with np.errstate(all="ignore"):
        centres = [np.bincount(column, weights=data * c, minlength=num_components) / weight for c in coords]
    centres += [np.zeros(num_components)] * (3 - len(centres))
    return np.c_[tuple(centres)][components]


def load_caiman_subject(folder: Path, options: LoadOptions) -> SubjectData:
    """CaImAn's results: estimates/F_dff (dF/F) of the accepted components, centres of estimates/A, params/data/fr."""
    path = _the_file(folder, ".hdf5", "CaImAn")
    _check_file(path, "an HDF5", "CaImAn's cnm.save('....hdf5')")
    with h5py.File(path, "r") as h5:
        f_dff = h5.get("estimates/F_dff")
        if not isinstance(f_dff, h5py.Dataset) or f_dff.dtype.kind not in "fiu":  # None is saved as 'NoneType'
            raise PipelineError(
                f"{path} has no estimates/F_dff (dF/F; estimates/C is denoised, not for CASCADE): run "
                "cnm.estimates.detrend_df_f(...) then cnm.save(...) again"
            )
        fr, dims = (_caiman_dataset(h5, f"params/data/{key}", path) for key in ("fr", "dims"))
        accepted = _caiman_dataset(h5, "estimates/idx_components", path)
        shape = f_dff.shape
        if len(shape) != 2:
            raise PipelineError(f"{path}: estimates/F_dff has shape {shape}, expected (components, frames)")
        if dims is None or np.size(dims) not in (2, 3):
            raise PipelineError(f"{path}: params/data/dims is {dims!r}, expected the field of view (2 or 3 sizes)")
        rows = (
            np.arange(shape[0]) if accepted is None else _whole_numbers(accepted, f"{path}: estimates/idx_components")
        )
        if len(rows) and (rows.min() < 0 or rows.max() >= shape[0] or len(np.unique(rows)) < len(rows)):
            raise PipelineError(
                f"{path}: estimates/idx_components holds {_describe(rows)}, expected distinct 0-based components below {shape[0]}"
            )
        rows = np.sort(rows)
        positions = _caiman_centres(h5, path, np.asarray(dims).ravel(), rows)
    if fr is None:
        raise PipelineError(f"{path} has no params/data/fr (the frame rate)")
    doubts: list = []
    rate = _frame_rate(fr, f"{path}: params/data/fr", doubts)
    _check_positions(positions, f"{path}: centres of estimates/A", doubts)
    trace_file = TraceFile(
        str(path), "estimates/F_dff", False, len(rows), int(shape[1]), None if accepted is None else rows
    )
    return SubjectData(
        folder.name, str(folder), trace_file, positions, rate, np.arange(len(rows)), "dff", (str(path),),
        trace_type_reason="CaImAn's estimates/F_dff is dF/F", stored_cells=int(shape[0]), doubts=doubts,
    )  # fmt: skip


def _caiman_size(folder: Path) -> int:
    with contextlib.suppress(Exception):
        return _dataset_size(_the_file(folder, ".hdf5", "CaImAn"), "estimates/F_dff")
    return 0


# --- NWB (read with pynwb): processing/ophys's DfOverF (preferred) or Fluorescence, found by type, not by name

NWB_REGULAR_INTERVAL_FRACTION = 0.01  # timestamps whose intervals stray further from their median are irregular


def _nwb_series(ophys, path: Path) -> tuple:
    """The one RoiResponseSeries of DfOverF (else of Fluorescence), and the trace type it holds."""
    from pynwb.ophys import DfOverF, Fluorescence

    for kind, trace_type in ((DfOverF, "dff"), (Fluorescence, "fluorescence")):
        containers = [c for c in ophys.data_interfaces.values() if isinstance(c, kind)]
        series = [(c.name, s) for c in containers for s in c.roi_response_series.values()]
        if len(series) > 1:
            names = ", ".join(f"{c}/{s.name}" for c, s in series[:4])
            raise PipelineError(
                f"{path}: processing/ophys holds {len(series)} {kind.__name__} series ({names}), expected one"
            )
        if series:
            return series[0][0], series[0][1], trace_type
    found = ", ".join(ophys.data_interfaces) or "nothing"
    raise PipelineError(f"{path}: processing/ophys holds no DfOverF or Fluorescence series (found: {found})")


def _nwb_centres(table, path: Path) -> np.ndarray:
    """Each ROI's weighted centre [x, y, z] from the plane segmentation's voxel, pixel or image masks (z = 0
    unless voxel masks give it)."""
    columns = set(table.colnames)
    if columns & {"voxel_mask", "pixel_mask"}:
        index = table["voxel_mask" if "voxel_mask" in columns else "pixel_mask"]
        ends, entries = np.asarray(index.data[:], dtype=np.int64), np.asarray(index.target.data[:])
        roi = np.repeat(np.arange(len(ends)), np.diff(np.r_[0, ends]))
        axes = [entries[name].astype(float) for name in ("x", "y", "z") if name in entries.dtype.names]
        weight = entries["weight"].astype(float)
        total = np.bincount(roi, weights=weight, minlength=len(ends))
        with np.errstate(all="ignore"):
            centres = [np.bincount(roi, weights=weight * a, minlength=len(ends)) / total for a in axes]
    elif "image_mask" in columns:
        masks, centres = table["image_mask"].data, []
        for first in range(0, len(masks), 256):  # a block of ROIs at a time: masks are whole images
            block = np.asarray(masks[first : first + 256], dtype=float)
            total = block.reshape(len(block), -1).sum(axis=1)
            sums = [np.tensordot(block.sum(axis=tuple(a for a in range(1, block.ndim) if a != axis)), np.arange(block.shape[axis]), 1) for axis in range(1, block.ndim)]  # fmt: skip
            with np.errstate(all="ignore"):
                centres.append(np.c_[tuple(s / total for s in sums)])
        centres = list(np.concatenate(centres).T) if centres else [np.zeros(0)] * 2
    else:
        raise PipelineError(f"{path}: plane segmentation {table.name} has no voxel_mask, pixel_mask or image_mask")
    return np.c_[tuple(centres + [np.zeros(len(centres[0]))] * (3 - len(centres)))]


def _nwb_rate(series, path: Path, doubts: list) -> float:
    """The series' rate, or that of its timestamps when they are regular."""
    where = f"{path}: {series.name}"
    if series.rate is not None:
        return _frame_rate(series.rate, f"{where}: rate", doubts)
    times = np.asarray(series.timestamps[:], dtype=float)
    intervals = np.diff(times)
    if len(times) < 2 or not np.isfinite(intervals).all() or np.median(intervals) <= 0:
        raise PipelineError(f"{where}: timestamps are not increasing times in seconds, expected a frame rate")
    median = float(np.median(intervals))
    if np.abs(intervals - median).max() > NWB_REGULAR_INTERVAL_FRACTION * median:
        raise PipelineError(
            f"{where}: the timestamps are irregular (frames {intervals.min():.3g} to {intervals.max():.3g} s apart): "
            "CASCADE needs a constant frame rate; resample the traces to regular frames first"
        )
    return _frame_rate((len(times) - 1) / (times[-1] - times[0]), f"{where}: timestamps", doubts)


def _nwb_contents(nwb, path: Path, doubts: list) -> tuple:
    """(TraceFile, positions, rate, trace type, where) of the file's ophys series."""
    from pynwb.ophys import PlaneSegmentation

    ophys = nwb.processing.get("ophys")
    if ophys is None:
        raise PipelineError(f"{path} has no processing/ophys module (found: {', '.join(nwb.processing) or 'none'})")
    container, series, trace_type = _nwb_series(ophys, path)
    data, rois = series.data, np.asarray(series.rois.data[:], dtype=np.int64)
    where = f"{path}: {container}/{series.name}"
    if not isinstance(data, h5py.Dataset) or data.ndim != 2 or data.dtype.kind not in "fiu":
        raise PipelineError(f"{where}: data is {getattr(data, 'shape', '?')}, expected (time, rois) real numbers")
    if data.shape[1] != len(rois):
        flipped = " (it looks transposed: NWB stores time first)" if data.shape[0] == len(rois) else ""
        raise PipelineError(
            f"{where}: data is {data.shape} but rois lists {len(rois)} ROIs, expected (time, {len(rois)}){flipped}"
        )
    if (series.conversion, series.offset) != (1.0, 0.0):
        doubts.append(
            f"{where}: data stored with conversion {series.conversion:g}, offset {series.offset:g}: read as stored"
        )
    table = series.rois.table
    centres = _nwb_centres(table, path)[rois]
    if "voxel_mask" not in table.colnames:  # z: the plane segmentation's place among the file's, in name order
        tables = [t for c in ophys.data_interfaces.values() for t in getattr(c, "plane_segmentations", {}).values()]
        names = sorted((t.name for t in tables if isinstance(t, PlaneSegmentation)), key=_natural_key)
        centres[:, 2] = names.index(table.name) if table.name in names else 0
    rate = _nwb_rate(series, path, doubts)
    trace_file = TraceFile(str(path), data.name, True, len(rois), int(data.shape[0]))
    return trace_file, centres, rate, trace_type, f"{container}/{series.name}"


def load_nwb_subject(folder: Path, options: LoadOptions) -> SubjectData:
    """An NWB file: the ophys series of DfOverF (dF/F) or Fluorescence (raw), centres of its ROIs' masks."""
    from pynwb import NWBHDF5IO

    path, doubts = _the_file(folder, ".nwb", "NWB"), []
    _check_file(path, "an HDF5", "an NWB file")
    try:
        with warnings.catch_warnings(), NWBHDF5IO(str(path), "r") as io:
            warnings.simplefilter("ignore")  # pynwb's notes about cached namespaces
            trace_file, positions, rate, trace_type, where = _nwb_contents(io.read(), path, doubts)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"cannot read {path} as NWB ({type(exc).__name__}: {exc})") from None
    _check_positions(positions, f"{path}: ROI mask centres", doubts)
    return SubjectData(
        folder.name, str(folder), trace_file, positions, rate, np.arange(trace_file.num_cells), trace_type,
        (str(path),), trace_type_reason=f"NWB {where} is {'dF/F' if trace_type == 'dff' else 'raw fluorescence'}",
        doubts=doubts,
    )  # fmt: skip


def _nwb_size(folder: Path) -> int:
    """cells x frames of the largest RoiResponseSeries under processing/ophys (h5py: no pynwb needed)."""
    sizes = [0]
    with contextlib.suppress(Exception), h5py.File(_the_file(folder, ".nwb", "NWB"), "r") as h5:
        h5["processing/ophys"].visititems(
            lambda name, item: sizes.append(item["data"].size)
            if _as_text(item.attrs.get("neurodata_type", b"")) == "RoiResponseSeries" else None
        )  # fmt: skip
    return int(max(sizes))


def _dataset_size(path: Path, dataset: str) -> int:
    """Elements of an HDF5 dataset (cells x frames), read from its header; 0 when unreadable."""
    with contextlib.suppress(Exception), h5py.File(path, "r") as h5:
        return int(np.prod(h5[dataset].shape))
    return 0


@dataclass(frozen=True)
class InputLayout:
    """One input layout: the only place to touch to read another one. Messages, --help's epilog,
    shard balancing and docs/inputs.md's list come from this table."""

    name: str  # recorded as the outputs' `layout` attribute
    files: str  # what it reads, in words
    recognise: Callable[[set], bool]  # from the names of the entries of a subject folder
    load: Callable[[Path, LoadOptions], SubjectData]  # open and validate (traces are not read), doubts in .doubts
    size: Callable[[Path], int]  # cells x frames without reading traces (balances shards); 0 if unreadable
    registered: bool = False  # holds positions in a shared (atlas) frame, for --coordinates registered


INPUT_LAYOUTS = (  # the first that a folder holds is used
    InputLayout(
        "chen2018", "TimeSeries.h5 + data_full.mat (Chen et al. 2018)",
        lambda names: bool(names & {"TimeSeries.h5", "data_full.mat"}), load_chen2018_subject,
        lambda folder: _dataset_size(folder / "TimeSeries.h5", "CellResp"), registered=True,
    ),
    InputLayout(
        "generic", "traces.h5 (traces (N, T), positions (N, 3), attribute frame_rate_hz)",
        lambda names: "traces.h5" in names, load_generic_subject,
        lambda folder: _dataset_size(folder / "traces.h5", "traces"),
    ),
    InputLayout(
        "suite2p", "suite2p/plane<k>/ or plane<k>/ (F.npy, Fneu.npy, iscell.npy, stat.npy, ops.npy or settings.npy)",
        lambda names: "suite2p" in names or any(_PLANE_RE.fullmatch(name) for name in names), load_suite2p_subject,
        _suite2p_size,
    ),
    InputLayout(
        "caiman", "<name>.hdf5 of CaImAn's cnm.save (estimates/F_dff, estimates/A, estimates/idx_components, params/data)",
        lambda names: any(name.endswith(".hdf5") for name in names), load_caiman_subject, _caiman_size,
    ),
    InputLayout(
        "nwb", "<name>.nwb (processing/ophys: DfOverF or Fluorescence RoiResponseSeries (time, rois), ROI masks)",
        lambda names: any(name.endswith(".nwb") for name in names), load_nwb_subject, _nwb_size,
    ),
)  # fmt: skip


def layouts_in(folder: Path) -> list:
    """The layouts a folder holds, in the table's order (empty when it cannot be listed)."""
    with contextlib.suppress(OSError):
        names = {path.name for path in folder.iterdir()}
        return [layout for layout in INPUT_LAYOUTS if layout.recognise(names)]
    return []


def load_subject(folder, options: LoadOptions | None = None) -> SubjectData:
    """Open and validate a subject folder in whichever supported layout it has, without reading
    the traces (those are read a block at a time during inference, and checked then)."""
    folder, options = Path(folder), options or LoadOptions()
    known = " or ".join(layout.files for layout in INPUT_LAYOUTS)
    if not folder.is_dir():
        found = "a file" if folder.exists() else "a broken link"
        raise PipelineError(f"{folder} is {found}, expected a folder of {known}")
    try:
        present = sorted(path.name for path in folder.iterdir())
    except OSError as exc:
        raise PipelineError(f"cannot list {folder}: {exc.strerror} (check its permissions)") from None
    if not (layouts := layouts_in(folder)):
        raise PipelineError(
            f"{folder} holds no layout this pipeline reads ({known}); found: {', '.join(present[:5]) or 'nothing'}"
        )
    layout = layouts[0]
    if options.coordinates == "registered" and not layout.registered:
        with_positions = " or ".join(
            f"{entry.name} ({entry.files.split(' (')[0]})" for entry in INPUT_LAYOUTS if entry.registered
        )
        raise PipelineError(
            f"{folder}: --coordinates registered needs registered positions, which the {layout.name} layout does not "
            f"hold (layouts that do: {with_positions}); use --coordinates raw for this subject"
        )
    subject = dataclasses.replace(layout.load(folder, options), layout=layout.name)
    for message in subject.doubts:
        subject.warn(message.replace(f"{folder}{os.sep}", ""))  # the subject's name says where
    if len(layouts) > 1:
        ignored = " and ".join(layout.files.split(" (")[0] for layout in layouts[1:])
        subject.warn(f"the folder holds several layouts: {layouts[0].files.split(' (')[0]} used, {ignored} ignored")
    if subject.num_cells == 0 or subject.num_frames == 0:
        raise PipelineError(f"{folder}: empty recording ({subject.num_cells} cells x {subject.num_frames} frames)")
    return subject


# =============================================================================================
# 3. dF/F: deciding what the traces are, and a vectorised sliding-percentile baseline
# =============================================================================================


@dataclass(frozen=True)
class TraceType:
    """What a subject's traces are, and why we think so (logged and recorded in every output)."""

    kind: str  # 'fluorescence' (converted to dF/F) or 'dff'
    reason: str


def decide_trace_type(traces: np.ndarray, hint: str | None = None, max_cells: int = 2000) -> TraceType:
    """'fluorescence' or 'dff' from the data, with the reason. Raw fluorescence sits on a positive baseline
    far above its own fluctuations; dF/F hovers around zero, so we compare each cell's baseline (8th
    percentile) with its noise (MAD of diffs)."""
    if hint in ("fluorescence", "dff"):
        return TraceType(hint, f"file attribute trace_type={hint}")
    sample = traces[np.linspace(0, len(traces) - 1, min(len(traces), max_cells)).astype(int)]
    sample = sample[np.fmax.reduce(sample, axis=1) > np.fmin.reduce(sample, axis=1)]  # flat cells say nothing
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN or flat: 'dff', then refused
        baseline = np.nanpercentile(sample, 8, axis=1)
        noise = np.nanmedian(np.abs(np.diff(sample, axis=1)), axis=1)
        ratio = np.nanmedian(baseline / np.maximum(noise, 1e-12))
        positive = np.nanmean(baseline > 0)
    if positive > 0.95 and ratio > 5:
        return TraceType("fluorescence", f"baselines positive in {positive:.0%} of cells, {ratio:.0f}x the noise")
    return TraceType("dff", f"baselines near zero (median baseline/noise {ratio:.1f}, positive in {positive:.0%})")


# sliding_percentile's running minima below this rank (the 8th percentile of 600 frames), np.partition above:
# measured faster up to rank ~60 (2,048 x 4,000 traces: 5x at rank 4, 2x at rank 24, 1.8x at rank 48)
SMALL_RANK_MAX = 50


def _running_smallest(blocks: np.ndarray, count: int, backwards: bool) -> np.ndarray:
    """(W, R, B) frames of R rows cut into B blocks -> (count, R, B * W): at each frame, the ``count`` smallest
    values of its block up to it (from it, ``backwards``), ascending; inf where the block has fewer."""
    out = np.empty((len(blocks), count, *blocks.shape[1:]), blocks.dtype)
    smallest = np.full((count, *blocks.shape[1:]), np.inf, blocks.dtype)
    value, larger = np.empty(blocks.shape[1:], blocks.dtype), np.empty(blocks.shape[1:], blocks.dtype)
    for frame in reversed(range(len(blocks))) if backwards else range(len(blocks)):
        value[...] = blocks[frame]
        for slot in smallest:  # insertion by exchange: each slot keeps the smaller value and passes the larger on
            np.maximum(slot, value, out=larger)
            np.minimum(slot, value, out=slot)
            value, larger = larger, value
        out[frame] = smallest
    return out.transpose(1, 2, 3, 0).reshape(count, blocks.shape[1], -1)


def _sliding_small_rank(padded: np.ndarray, window_frames: int, rank: int) -> np.ndarray:
    """The rank-th smallest value (0-based) of every window of ``window_frames`` in (R, L) rows, for a small rank
    (van Herk-Gil-Werman's trick for order statistics): cut into blocks of one window, each window is the end
    of one block and the start of the next; the rank + 1 smallest of each, merged, hold its rank-th smallest."""
    count, (rows, length) = rank + 1, padded.shape
    blocks = np.full((rows, -(-length // window_frames) * window_frames), np.inf, padded.dtype)
    blocks[:, :length] = padded
    blocks = np.ascontiguousarray(blocks.reshape(rows, -1, window_frames).transpose(2, 0, 1))
    num_windows = length - window_frames + 1
    ends = _running_smallest(blocks, count, backwards=True)[:, :, :num_windows]  # window start -> end of its block
    starts = _running_smallest(blocks, count, backwards=False)[:, :, window_frames - 1 :][:, :, :num_windows]
    starts[:, :, ::window_frames] = np.inf  # a window that starts a block is that block: nothing from the next
    # the count-th smallest of two ascending lists a, b: min over i of max(a[i - 1], b[count - 1 - i])
    result = np.minimum(ends[count - 1], starts[count - 1])
    for i in range(1, count):
        np.minimum(result, np.maximum(ends[i - 1], starts[count - 1 - i]), out=result)
    return result


def sliding_percentile(
    traces: np.ndarray, window_frames: int, percentile: float, max_chunk_values: int = 1 << 23, threads: int = 1
) -> np.ndarray:
    """Centred sliding percentile per row (edges repeat the end values), exactly as
    scipy.ndimage.percentile_filter(size=(1, w), mode='nearest') for rows without NaN, but faster: for low (or
    high) ranks, running minima over blocks (_sliding_small_rank: 15x scipy for the 8th percentile of 30 s at
    2 Hz), else np.partition over a strided window view (~3x). A block of rows at a time so memory stays
    bounded (``threads`` blocks at once: NumPy lets go of the GIL; a row's result never depends on the blocks)."""
    window_frames = int(window_frames) | 1
    half, rank = window_frames // 2, min(int(window_frames * percentile / 100.0), window_frames - 1)
    sign, low_rank = (-1, window_frames - 1 - rank) if 2 * rank > window_frames else (1, rank)  # high: negated low
    small = low_rank < SMALL_RANK_MAX
    out = np.empty(traces.shape, dtype=np.float32)
    per_row = (traces.shape[1] + window_frames) * (4 * low_rank + 6) if small else traces.shape[1] * window_frames
    rows_per_block = max(1, max_chunk_values // max(1, per_row))

    def fill(start: int) -> None:
        block = np.pad(traces[start : start + rows_per_block], ((0, 0), (half, half)), mode="edge")
        if small:
            out[start : start + rows_per_block] = sign * _sliding_small_rank(sign * block, window_frames, low_rank)
        else:
            windows = np.lib.stride_tricks.sliding_window_view(block, window_frames, axis=1)
            out[start : start + rows_per_block] = np.partition(windows, rank, axis=2)[:, :, rank]

    starts = range(0, len(traces), rows_per_block)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fill, starts))
    else:
        for start in starts:
            fill(start)
    return out


def compute_dff(
    fluorescence: np.ndarray, frame_rate_hz: float, window_s: float = 30.0, percentile: float = 8.0, threads: int = 1
) -> np.ndarray:
    """dF/F = (F - F0) / F0, F0 the ``percentile`` over a centred ``window_s`` window (in frames at the
    subject's real rate). NaN frames are filled with the cell's median for the baseline only. A
    non-positive F0 (background-subtracted data) is floored at 1% of the cell's median F0 (or 1e-6).
    ``threads``: for the baseline (a worker's share of the cores; the result does not depend on it)."""
    window_frames = max(3, int(round(window_s * frame_rate_hz)) | 1)  # odd, centred
    traces = filled = np.asarray(fluorescence, dtype=np.float32)
    if np.isnan(traces).any():
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: reported, left out
            filled = np.nan_to_num(np.where(np.isnan(traces), np.nanmedian(traces, axis=1, keepdims=True), traces))
    baseline = sliding_percentile(filled, window_frames, percentile, threads=threads)
    baseline = np.maximum(baseline, np.maximum(0.01 * np.abs(np.median(baseline, axis=1, keepdims=True)), 1e-6))
    return ((traces - baseline) / baseline).astype(np.float32)


# =============================================================================================
# 4. CASCADE models: loading a model folder into plain arrays
# =============================================================================================
#
# A CASCADE model folder holds ``config.yaml`` and one Keras HDF5 file per noise level and
# ensemble member (``Model_NoiseLevel_<N>_Ensemble_<E>.h5``). The official files were written by
# Keras 2.1-2.4 and Keras 3 refuses to load them, so we read the weights with h5py and never
# depend on the Keras version. Layer names carry random suffixes: we go by layer order.

MODEL_FILE_PATTERN = re.compile(r"Model_NoiseLevel_(\d+)_Ensemble_(\d+)\.h5$")
# The layer stack CASCADE trains (cascade2p's define_model); anything else is rejected.
CASCADE_LAYER_CLASSES = ("Conv1D", "Conv1D", "MaxPooling1D", "Conv1D", "MaxPooling1D", "Dense", "Flatten", "Dense")
# The source of a builtin model that stands in for an unavailable one starts with this (see resolve_model).
FALLBACK_SOURCE_PREFIX = "builtin (fallback: "


@dataclass(frozen=True)
class NetworkWeights:
    """Weights of one ensemble member, in Keras's layout (kernel: (width, in, out))."""

    conv1_kernel: np.ndarray
    conv1_bias: np.ndarray
    conv2_kernel: np.ndarray
    conv2_bias: np.ndarray
    conv3_kernel: np.ndarray
    conv3_bias: np.ndarray
    dense_kernel: np.ndarray  # (filters3, dense_expansion), applied at each position
    dense_bias: np.ndarray
    output_kernel: np.ndarray  # (positions * dense_expansion, 1), flattened position-major
    output_bias: np.ndarray


@dataclass(frozen=True)
class CascadeModel:
    """A CASCADE model: its configuration, the weights of every ensemble member and its provenance."""

    name: str
    folder: str
    sampling_rate_hz: float
    noise_levels: tuple  # model noise levels, ascending ints
    smoothing_s: float
    causal_kernel: bool
    window_size: int
    before_frac: float
    filter_sizes: tuple
    filter_numbers: tuple
    dense_expansion: int
    ensemble_size: int
    ensembles: dict  # noise level -> tuple of NetworkWeights
    source: str = "model_dir"  # model_dir, cache, downloaded, builtin or builtin (fallback: <reason>)
    requested: str = ""  # what the user asked for: a model name, 'auto', 'builtin' or the --model_dir
    digest: str = ""  # sha256 of config.yaml and the weight files, 16 hex digits: which weights made a file

    # Frame t is predicted from dff[t - window_offset : t - window_offset + W] (CASCADE: int(b*W - 1));
    # the first frames_before (int(b*W)) and last frames_after (int((1-b)*W)) frames get no prediction.
    @property
    def window_offset(self) -> int:
        return int(self.before_frac * self.window_size - 1)

    @property
    def frames_before(self) -> int:
        return int(self.before_frac * self.window_size)

    @property
    def frames_after(self) -> int:
        return int((1 - self.before_frac) * self.window_size)

    @property
    def smoothing_frames(self) -> float:
        return self.smoothing_s * self.sampling_rate_hz

    @property
    def multiply_adds_per_frame(self) -> int:
        """The network's multiply-adds per predicted frame, every ensemble member (each layer once per frame)."""
        w = self.ensembles[self.noise_levels[0]][0]
        (k1, c1, f1), (k2, _, f2), (k3, _, f3) = w.conv1_kernel.shape, w.conv2_kernel.shape, w.conv3_kernel.shape
        member = k1 * c1 * f1 + k2 * f1 * f2 + k3 * f2 * f3 + f3 * w.dense_kernel.shape[1] + w.output_kernel.shape[0]
        return member * self.ensemble_size

    @property
    def is_fallback(self) -> bool:
        """True when the builtin model stands in for a model that could not be had."""
        return self.source.startswith(FALLBACK_SOURCE_PREFIX)

    def provenance(self) -> dict:
        """What outputs record about the model, so a file says how it was made."""
        fields = "source requested folder sampling_rate_hz smoothing_s noise_levels ensemble_size digest".split()
        record = {"cascade_model": self.name, **{f"model_{field}": getattr(self, field) for field in fields}}
        return {**record, "model_noise_levels": list(self.noise_levels)}


def _as_int(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _check_architecture(layers: list, config: dict, path: Path) -> None:
    """Fail clearly if the saved network is not the CASCADE stack the engine implements."""
    classes = tuple(layer.get("class_name") for layer in layers)
    if classes != CASCADE_LAYER_CLASSES:
        raise PipelineError(
            f"{path}: layer stack {classes} is not CASCADE's {CASCADE_LAYER_CLASSES}; this engine cannot run it"
        )
    for i, conv in enumerate(layers[layer]["config"] for layer in (0, 1, 3)):
        expected = (int(config["filter_numbers"][i]), int(config["filter_sizes"][i]))
        found = (int(conv["filters"]), _as_int(conv["kernel_size"]))
        steps = (_as_int(conv.get("strides", 1)), _as_int(conv.get("dilation_rate", 1)))
        layout = (conv.get("activation"), conv.get("padding", "valid"), *steps)
        if found != expected or layout != ("relu", "valid", 1, 1):
            raise PipelineError(
                f"{path}: convolution {i + 1} is {found} {conv.get('activation')}, config.yaml says {expected} relu valid"
            )
    for pool in (layers[2]["config"], layers[4]["config"]):
        size_and_stride = (_as_int(pool.get("pool_size", 2)), _as_int(pool.get("strides", 2)))
        if (*size_and_stride, pool.get("padding", "valid")) != (2, 2, "valid"):
            raise PipelineError(f"{path}: max-pooling layers must be size 2, stride 2, valid")
    hidden, output = layers[5]["config"], layers[7]["config"]
    if hidden.get("activation") != "relu" or int(hidden["units"]) != int(config["dense_expansion"]):
        raise PipelineError(f"{path}: hidden dense layer is not relu x dense_expansion")
    if output.get("activation") != "linear" or int(output["units"]) != 1:
        raise PipelineError(f"{path}: output layer must be a single linear unit")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_network_weights(path: Path, config: dict) -> NetworkWeights:
    """One ensemble member's weights, from a Keras HDF5 file checked to hold the CASCADE network."""
    try:
        with h5py.File(path, "r") as h5:
            if (raw_config := h5.attrs.get("model_config")) is None:
                raise PipelineError(f"{path} has no 'model_config' attribute: not a Keras model file saved by CASCADE")
            model_config = json.loads(_text(raw_config)).get("config", {})  # Sequential or functional, Keras 2 or 3
            layers = model_config.get("layers", model_config) if isinstance(model_config, dict) else model_config
            _check_architecture([layer for layer in layers if layer.get("class_name") != "InputLayer"], config, path)
            group = h5["model_weights"] if "model_weights" in h5 else h5
            arrays = []
            for layer in (group[_text(name)] for name in group.attrs["layer_names"]):
                weights = [
                    np.asarray(layer[_text(name)], dtype=np.float32) for name in layer.attrs.get("weight_names", [])
                ]
                if weights:  # (kernel, bias)
                    arrays += [next(w for w in weights if w.ndim >= 2), next(w for w in weights if w.ndim == 1)]
    except PipelineError:
        raise
    except (OSError, KeyError, StopIteration, ValueError) as exc:
        raise PipelineError(
            f"cannot read CASCADE weights from {path} ({exc}); "
            "the file is missing, truncated or not a Keras HDF5 model: "
            "re-download the model folder"
        ) from None
    if len(arrays) != 10:
        raise PipelineError(f"{path}: expected 5 weighted layers, found {len(arrays) // 2}")
    return NetworkWeights(*arrays)


def _one_line(value) -> str:
    return " ".join(str(value).split())


def _read_model_config(path: Path) -> tuple:
    """(config, engine parameters) from config.yaml, or a PipelineError naming the file."""
    if not path.is_file():
        raise PipelineError(
            f"CASCADE model folder {path.parent} has no config.yaml: point --model_dir at a folder as CASCADE distributes it"
        )
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
        params = dict(
            noise_levels=tuple(sorted(int(n) for n in config["noise_levels"])),
            sampling_rate_hz=float(config["sampling_rate"]),
            smoothing_s=float(config["smoothing"]),
            causal_kernel=bool(config.get("causal_kernel", 0)),
            window_size=int(config["windowsize"]),
            before_frac=float(config["before_frac"]),
            filter_sizes=tuple(int(v) for v in config["filter_sizes"]),
            filter_numbers=tuple(int(v) for v in config["filter_numbers"]),
            dense_expansion=int(config["dense_expansion"]),
        )
        if not params["noise_levels"] or not params["sampling_rate_hz"] > 0:
            raise ValueError("no noise_levels, or sampling_rate is not positive")
    except KeyError as exc:
        raise PipelineError(f"{path} lacks {exc}: not a CASCADE model config") from None
    except (OSError, yaml.YAMLError, TypeError, ValueError) as exc:
        raise PipelineError(f"{path} is not a valid CASCADE config ({_one_line(exc)}): re-download it") from None
    return config, params


def read_model_folder(folder, source: str = "model_dir", requested: str = "") -> CascadeModel:
    """Load and check a CASCADE model folder: the one validation of a model.

    A missing folder, config.yaml or weight file, a bad config, a truncated file or another network
    is one PipelineError naming the file and the fix. The digest says which weights made an output.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PipelineError(f"CASCADE model folder {folder} does not exist")
    config, params = _read_model_config(folder / "config.yaml")
    found = sorted(
        (int(m[1]), int(m[2]), path) for path in folder.glob("*.h5") if (m := MODEL_FILE_PATTERN.search(path.name))
    )
    paths = {level: [path for n, _, path in found if n == level] for level in params["noise_levels"]}
    if absent := [level for level in paths if not paths[level]]:
        raise PipelineError(
            f"CASCADE model folder {folder} has no Model_NoiseLevel_{absent[0]}_Ensemble_*.h5 file although "
            "config.yaml lists that noise level: the download is incomplete, fetch the model again"
        )
    ensembles = {level: tuple(_read_network_weights(path, config) for path in paths[level]) for level in paths}
    sha = hashlib.sha256()
    for path in [folder / "config.yaml", *(path for level in paths for path in paths[level])]:
        sha.update(path.name.encode() + b"\0" + path.read_bytes())
    provenance = dict(source=source, requested=requested, digest=sha.hexdigest()[:16])
    size = min(len(members) for members in ensembles.values())
    name = str(config.get("model_name", folder.name))
    return CascadeModel(name, str(folder.resolve()), ensembles=ensembles, ensemble_size=size, **params, **provenance)


# =============================================================================================
# 4b. Model resolution: --model_dir, builtin, auto, cache, download, builtin fallback
# =============================================================================================
#
# resolve_model turns what the user asked for into one loaded (so checked) model:
#   --model_dir DIR   that folder, or its only sub-folder (as CASCADE's zips unpack); unusable: an error
#   'builtin'         the builtin model (models/builtin_<rate>Hz_smoothing<ms>ms) nearest the frame rate
#   'auto'            the official Global_EXC model nearest the frame rate, cached or downloaded;
#                     with --offline and not cached, the nearest builtin model
#   an official name  <cache>/<name> (neuralib's cache by default), else downloaded into it
#   anything else     an error naming the closest official names: a typo must not run silently
# An official model that cannot be had is replaced by the builtin model with a WARNING and the model's
# source says so; strict makes that an error. PROCESS_CACHE remembers models, choices and downloads,
# so the subjects of a run share one model object and a failed download is tried once per process.
# The one way to get a model: ModelRequest (what the command line asks for) -> model_for_subject, which
# resolves it for the subject's frame rate and checks the match. The steps, in the order they run:
# resolve_model -> _official_name -> _cached_or_downloaded (download_model) -> _chosen_model (logs the
# choice once) -> read_model_folder_once -> read_model_folder (reads and validates a folder).

DEFAULT_MODEL_CACHE_DIR = Path("~/.cache/neuralib/cascade")  # neuralib's: models are shared with it
# The builtin family and official_models.yaml: beside this file, or in share/ when pip-installed.
MODEL_SEARCH_DIRS = (REPO_DIR / "models", Path(sys.prefix) / "share" / "unified_spike_processing_coo" / "models")
BUILTIN_MODEL_KEYWORD, AUTO_MODEL_KEYWORD = "builtin", "auto"
RATE_MISMATCH_WARN_FRACTION = 0.05  # beyond 5 % CASCADE resamples its ground truth to the frame rate
DOWNLOAD_TIMEOUT_S = 60.0  # per blocking socket operation
MAX_DOWNLOAD_BYTES = 1 << 30  # official models are 10-40 MB; a far larger download is not one
PROCESS_CACHE: dict = {}  # the one global mutable state: models, choices, downloads, TensorFlow, engine
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # a cache sub-folder, never a path
_GLOBAL_EXC_RE = re.compile(r"^Global_EXC_(\d+(?:\.\d+)?)Hz_smoothing(\d+(?:\.\d+)?)ms(.*)$")


class ModelResolutionError(PipelineError):
    """No usable CASCADE model; the message is one actionable line."""


class ModelDownloadError(ModelResolutionError):
    """Fetching, checking or installing a model download failed; ``short`` says why in a few words (the
    model's source and the fallback WARNING), the message says it all (DEBUG, --strict_model's error)."""

    def __init__(self, message: str, short: str = "invalid download"):
        super().__init__(message)
        self.short = short


def _download_failure(exc: BaseException) -> str:
    """Why a download failed, in a few words: 'HTTP 404', 'no connection', 'cache not writable' or 'invalid download'."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)):
        return "no connection"  # DNS, refused, timed out, cut: the usual offline node
    if isinstance(exc, OSError):
        return "cache not writable"  # mkdir, a full disk, permissions
    return "invalid download"  # a short, oversized, unsafe or corrupt zip, or no valid model in it


def rate_mismatch(model: CascadeModel, frame_rate_hz: float) -> float:
    """How far the model's sampling rate is from the frame rate, as a fraction of the frame rate."""
    return abs(model.sampling_rate_hz - frame_rate_hz) / frame_rate_hz


def parse_model_sampling_rate_hz(name: str) -> float:
    """Sampling rate in a model name, e.g. ``Global_EXC_2.5Hz_smoothing400ms_high_noise`` -> 2.5."""
    if (match := re.search(r"(?:^|_)(\d+(?:\.\d+)?)Hz(?:_|$)", str(name))) is None:
        raise ValueError(f"no sampling rate ('<rate>Hz') in CASCADE model name {name!r}")
    return float(match.group(1))


def choose_auto_model_name(frame_rate_hz: float, names: Iterable[str]) -> str:
    """The official Global_EXC_<rate>Hz_smoothing<ms>ms model best matching the frame rate.

    Keys, in order (so the order of ``names`` never matters): nearest sampling rate; plain variant,
    then _high_noise, _causalkernel, any other (symmetric kernels keep spike timing unbiased);
    smoothing nearest one frame interval (500 ms at 2 Hz, the builtin's), then the smaller one;
    the lower rate; the name.
    """
    rate = float(frame_rate_hz)
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"frame rate must be a positive number of Hz, got {frame_rate_hz!r}")
    matches = [match for match in map(_GLOBAL_EXC_RE.match, map(str, names)) if match]
    if not matches:
        raise ValueError("no official Global_EXC_<rate>Hz_smoothing<ms>ms model among the candidates")

    def key(match) -> tuple:
        model_rate, smoothing_ms = float(match[1]), float(match[2])
        variant = {"": 0, "_high_noise": 1, "_causalkernel": 2}.get(match[3], 3)
        rate_gap, smoothing_gap = round(abs(model_rate - rate), 9), round(abs(smoothing_ms - 1000 / rate), 9)
        return (rate_gap, variant, smoothing_gap, smoothing_ms, model_rate, match[0])

    return min(matches, key=key)[0]


def official_models(cache_dir=None) -> dict:
    """Official CASCADE model name -> download link: models/official_models.yaml (CASCADE's index
    as shipped), updated by neuralib's copy of the index in the cache where there is one."""
    paths = [*(d / "official_models.yaml" for d in reversed(MODEL_SEARCH_DIRS))]
    links: dict = {}
    for path in [*paths, Path(cache_dir or DEFAULT_MODEL_CACHE_DIR).expanduser() / "available_models.yaml"]:
        try:
            text = path.read_text(encoding="utf-8") if path.is_file() else "{}"
            index = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}  # C: 7x faster
            links.update((str(k), v["Link"]) for k, v in index.items() if isinstance(v, dict) and v.get("Link"))
        except (OSError, ValueError, yaml.YAMLError, AttributeError) as exc:
            log.warning("ignoring the unreadable CASCADE model index %s (%s)", path, _one_line(exc))
    return links


def builtin_models() -> dict:
    """The builtin family, {folder name: folder}, ordered by the sampling rate in the name."""
    family: dict = {}
    for base in reversed(MODEL_SEARCH_DIRS):  # the first search folder wins a name
        family.update((f.name, f) for f in Path(base).glob("builtin_*Hz_smoothing*ms") if f.is_dir())
    return dict(sorted(family.items(), key=lambda item: (parse_model_sampling_rate_hz(item[0]), item[0])))


def nearest_builtin_folder(frame_rate_hz: float | None = None) -> Path:
    """The builtin model trained nearest the frame rate (2 Hz, the original default, when unknown)."""
    rate = frame_rate_hz if frame_rate_hz is not None and math.isfinite(frame_rate_hz) else 2.0
    if not (family := builtin_models()):
        raise PipelineError(f"no builtin_<rate>Hz_smoothing<ms>ms folder in {', '.join(map(str, MODEL_SEARCH_DIRS))}")
    return family[min(family, key=lambda name: round(abs(parse_model_sampling_rate_hz(name) - rate), 9))]


def find_model_folder(folder) -> Path:
    """``folder``, or its only sub-folder when it has no config.yaml (as CASCADE's zips unpack)."""
    folder = Path(folder).expanduser()
    if folder.is_dir() and not (folder / "config.yaml").exists():
        inner = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
        return inner[0] if len(inner) == 1 else folder
    return folder  # the loader says what is wrong with it, if anything


def read_model_folder_once(folder, source: str = "model_dir", requested: str = "") -> CascadeModel:
    """read_model_folder once per process and folder (subjects and worker batches share it)."""
    models = PROCESS_CACHE.setdefault("models", {})
    key = str(Path(folder).expanduser().resolve())
    if key not in models:
        models[key] = read_model_folder(key)
    return dataclasses.replace(models[key], source=source, requested=requested)


def _chosen_model(folder: Path, source: str, requested: str, why: str = "") -> CascadeModel:
    """The model in ``folder`` with its provenance; each choice is made and logged once per process.

    A fallback (``why``: the official name it stands in for) is one short WARNING per run, not one per
    builtin model: the sample's subjects at 2 and 2.6 Hz use two builtin models for one missing model."""
    choices, fallbacks = PROCESS_CACHE.setdefault("choices", {}), PROCESS_CACHE.setdefault("fallbacks", set())
    key = (str(Path(folder).resolve()), source, requested)
    if key not in choices:
        model = choices[key] = read_model_folder_once(folder, source, requested)
        if model.is_fallback and (source, requested) not in fallbacks:
            fallbacks.add((source, requested))
            log.warning(
                f"CASCADE model {why} unavailable ({source[len(FALLBACK_SOURCE_PREFIX) : -1]}): using {model.name}; "
                "to avoid this, pass --cascade_model builtin or run once online to cache it"
            )
        elif model.is_fallback:
            log.info(f"CASCADE model {model.name} stands in for {why} too (the builtin nearest the frame rate)")
        else:
            log.info(
                f"CASCADE model {model.name} (source: {source}{'; ' + why if why else ''}; "
                f"{model.sampling_rate_hz:g} Hz, smoothing {model.smoothing_s:g} s; digest {model.digest}) from {model.folder}"
            )
    return choices[key]


def _download_zip(url: str, dest: Path, timeout_s: float) -> None:
    """Fetch ``url`` into ``dest``; refuse a short or oversized body, and anything but a safe zip."""
    request = urllib.request.Request(url, headers={"User-Agent": "unified-spike-processing"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response, open(dest, "wb") as out:
        expected, written = response.headers.get("Content-Length"), 0
        while (chunk := response.read(1 << 20)) and written <= MAX_DOWNLOAD_BYTES:
            written += out.write(chunk)
    if written > MAX_DOWNLOAD_BYTES or (expected or "").strip().isdigit() and int(expected) != written:
        raise ModelDownloadError(f"incomplete or oversized download from {url}: {written} of {expected} bytes")
    with zipfile.ZipFile(dest) as archive:
        for info in archive.infolist():
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if not parts or info.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise ModelDownloadError(f"unsafe path {info.filename!r} in model archive")
        if sum(info.file_size for info in archive.infolist()) > 4 * MAX_DOWNLOAD_BYTES:
            raise ModelDownloadError("model archive too large when extracted")
        if (bad := archive.testzip()) is not None:
            raise ModelDownloadError(f"corrupt member {bad!r} in model archive")
        archive.extractall(dest.parent / "unzipped")


def _install_folder(folder: Path, target: Path) -> Path:
    """Move the checked model ``folder`` to ``target`` atomically; a complete ``target`` installed meanwhile wins."""
    for _attempt in range(3):
        if target.exists():  # another process (a SLURM array task sharing the cache) was faster
            try:
                return Path(read_model_folder_once(find_model_folder(target)).folder)
            except PipelineError:
                aside = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
                with contextlib.suppress(FileNotFoundError):
                    os.replace(target, aside)
                    log.warning(f"moved the incomplete CASCADE model folder {target} aside and removed it")
                    remove_quietly(aside)
        with contextlib.suppress(OSError):  # fails when another process installed it meanwhile
            os.replace(folder, target)
            return target
    raise ModelDownloadError(f"could not install the CASCADE model into {target}")


def download_model(name: str, link: str, cache_dir, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download model ``name`` from ``link`` into ``<cache_dir>/<name>``; returns its folder.

    The zip is fetched, checked, unpacked and loaded (so validated) inside a temporary folder
    ``<cache_dir>/.<name>.<random>.tmp`` and then moved into place: whatever happens, the cache
    entry is absent, as it was, or complete. Temporaries older than a day (killed runs) are removed.
    """
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.glob(f".{name}.*.tmp"):
            if time.time() - stale.lstat().st_mtime > 86400:
                remove_quietly(stale)
        log.info(f"downloading CASCADE model {name} from {link}")
        with tempfile.TemporaryDirectory(prefix=f".{name}.", suffix=".tmp", dir=cache_dir) as temporary:
            _download_zip(link, Path(temporary) / "model.zip", timeout_s)
            folder = find_model_folder(Path(temporary) / "unzipped")
            read_model_folder(folder)
            return _install_folder(folder, cache_dir / name)
    except Exception as exc:  # URLError, HTTPException, BadZipFile, the checks' errors, ...
        raise ModelDownloadError(
            f"download of CASCADE model '{name}' from {link} failed: {type(exc).__name__}: {_one_line(exc)}",
            short=_download_failure(exc),
        ) from None


def _cached_or_downloaded(name: str, cache_dir: Path, offline: bool) -> tuple:
    """(folder, 'cache' or 'downloaded', ''), or (None, why not, why not in a few words); per process: a
    failed download is not retried. Why not in full is logged at DEBUG (--verbose)."""
    fetched = PROCESS_CACHE.setdefault("fetched", {})
    key, target, problem, short_problem = (name, str(cache_dir), offline), cache_dir / name, "", "not cached"
    if key not in fetched and target.exists():
        try:
            fetched[key] = Path(read_model_folder_once(find_model_folder(target)).folder), "cache", ""
        except PipelineError as exc:
            problem, short_problem = f"cache entry {target} is incomplete ({exc}); ", "cache entry incomplete"
            log.warning(f"{problem}it will be replaced by a fresh download")
    if key not in fetched:
        link = official_models(cache_dir).get(name)
        if offline or link is None:
            why = "--offline forbids downloads" if offline else "it is not an official CASCADE model"
            short = f"{short_problem}, " + ("--offline" if offline else "no download link")
            fetched[key] = None, f"{problem}'{name}' is not in the cache {cache_dir} and {why}", short
        else:
            try:
                fetched[key] = download_model(name, link, cache_dir), "downloaded", ""
            except ModelDownloadError as exc:
                fetched[key] = None, f"{problem}{exc}", f"{short_problem}, download failed: {exc.short}"
        if fetched[key][0] is None:
            log.debug(f"CASCADE model '{name}' unavailable: {fetched[key][1]}")
    return fetched[key]


def _builtin(frame_rate_hz: float | None, source: str, requested: str, why: str = "") -> CascadeModel:
    try:
        return _chosen_model(nearest_builtin_folder(frame_rate_hz), source, requested, why)
    except PipelineError as exc:
        raise ModelResolutionError(f"builtin CASCADE model: {exc}; restore models/ or pass --model_dir DIR") from None


def _official_name(name: str, cache: Path, frame_rate_hz: float | None) -> str:
    """The official (or cached) model name that ``name`` stands for ('auto': chosen by frame rate)."""
    if name.lower() == AUTO_MODEL_KEYWORD:
        if frame_rate_hz is None or not math.isfinite(frame_rate_hz) or frame_rate_hz <= 0:
            raise ModelResolutionError("--cascade_model auto needs the subject's frame rate; pass a model name")
        try:
            return choose_auto_model_name(frame_rate_hz, official_models(cache))
        except ValueError as exc:
            raise ModelResolutionError(f"--cascade_model auto: {exc}; pass a model name or --model_dir DIR") from None
    if not _MODEL_NAME_RE.match(name) or ".." in name:
        raise ModelResolutionError(f"invalid CASCADE model name {name!r}: use an official name, 'auto' or 'builtin'")
    if not (cache / name).exists() and name not in (links := official_models(cache)):
        close = " or ".join(difflib.get_close_matches(name, links, n=3))
        raise ModelResolutionError(
            f"unknown CASCADE model '{name}' (not official, not in the cache {cache}); "
            + (f"did you mean {close}? " if close else "")
            + "Official names are in models/official_models.yaml; or use 'auto', 'builtin' or --model_dir DIR"
        )
    return name


def resolve_model(
    requested: str = "builtin",
    *,
    model_dir=None,
    cache_dir=None,
    frame_rate_hz: float | None = None,
    strict: bool = False,
    offline: bool = False,
) -> CascadeModel:
    """The CASCADE model for ``requested`` (a name, 'auto' or 'builtin'; ``model_dir`` wins), loaded (see above).

    ``frame_rate_hz`` (the subject's) picks the 'builtin' and 'auto' models; the caller compares it with
    the model's rate (rate_mismatch). ``strict``: no builtin fallback. ``offline``: never download.
    """
    if model_dir not in (None, ""):
        try:
            return _chosen_model(find_model_folder(model_dir), "model_dir", str(model_dir))
        except PipelineError as exc:
            raise ModelResolutionError(f"--model_dir {model_dir} is not a usable CASCADE model: {exc}") from None
    name = str(requested or BUILTIN_MODEL_KEYWORD).strip()
    if name.lower() == BUILTIN_MODEL_KEYWORD:
        return _builtin(frame_rate_hz, "builtin", name)
    cache, is_auto = Path(cache_dir or DEFAULT_MODEL_CACHE_DIR).expanduser(), name.lower() == AUTO_MODEL_KEYWORD
    name = _official_name(name, cache, frame_rate_hz)
    folder, found, short = _cached_or_downloaded(name, cache, offline)
    if folder is not None:
        return _chosen_model(folder, found, str(requested))
    if is_auto and offline:  # by design, not a fallback: the best model this machine has
        return _builtin(frame_rate_hz, "builtin", str(requested), why=f"'auto' chose {name}, but {found}")
    if strict:
        raise ModelResolutionError(
            f"--strict_model: CASCADE model '{name}' is unavailable: {found}. Fix: run once where the internet "
            f"can be reached (without --offline), or unzip the model's download into {cache / name} (copy that "
            "folder to machines without internet), or pass --model_dir DIR"
        )
    return _builtin(frame_rate_hz, f"{FALLBACK_SOURCE_PREFIX}{short})", str(requested), why=name)


@dataclass(frozen=True)
class ModelRequest:
    """The model the command line asks for, and how far from a subject's frame rate it may be (fields
    named after the options)."""

    cascade_model: str
    model_dir: str | None
    model_cache: str | None
    strict_model: bool
    offline: bool
    max_rate_mismatch: float

    def resolve(self, frame_rate_hz: float | None = None) -> CascadeModel:
        """The model for a subject recorded at ``frame_rate_hz`` (None: before any subject is read)."""
        return resolve_model(
            self.cascade_model, model_dir=self.model_dir, cache_dir=self.model_cache,
            frame_rate_hz=frame_rate_hz, strict=self.strict_model, offline=self.offline,
        )  # fmt: skip


def model_for_subject(subject: SubjectData, request: ModelRequest) -> CascadeModel:
    """The subject's CASCADE model; refuse a frame rate too far from it, warn beyond CASCADE's 5 %."""
    model = request.resolve(subject.frame_rate_hz)
    if model.is_fallback:
        reason = model.source[len(FALLBACK_SOURCE_PREFIX) : -1]
        subject.warnings.append(f"model fallback: {model.name} used instead of {model.requested} ({reason})")
    mismatch = rate_mismatch(model, subject.frame_rate_hz)
    rate = f"frame rate {subject.frame_rate_hz:.3g} Hz"
    model_rate = f"model {model.name}'s {model.sampling_rate_hz:g} Hz"
    if mismatch > request.max_rate_mismatch:
        raise PipelineError(
            f"{rate} is {mismatch:.0%} away from {model_rate}: pick a matching model "
            "(--cascade_model auto or --model_dir) or raise --max_rate_mismatch"
        )
    if mismatch > RATE_MISMATCH_WARN_FRACTION:
        subject.warn(f"{rate} differs from {model_rate} by {mismatch:.0%} (CASCADE's tolerance: 5%)")
    if subject.num_frames < 2 * model.window_size:  # fewer predicted frames than edge frames dropped
        raise PipelineError(
            f"{subject.trace_file.path}: {subject.trace_file.dataset} has {subject.num_frames} frames, of which "
            f"CASCADE's {model.window_size}-frame window predicts {max(0, subject.num_frames - model.window_size)}: "
            f"expected at least {2 * model.window_size} frames"
        )
    return model


# =============================================================================================
# 5. Inference: noise levels, the fully-convolutional CASCADE engine, thresholds
# =============================================================================================


def calculate_noise_levels(dff: np.ndarray, frame_rate_hz: float) -> np.ndarray:
    """CASCADE's noise level per trace: nanmedian(|diff|) / sqrt(the model's frame rate) * 100; NaN if all NaN."""
    diffs = np.abs(np.diff(np.asarray(dff, dtype=np.float64), axis=1))
    noise = np.full(diffs.shape[0], np.nan)
    has_data = ~np.all(np.isnan(diffs), axis=1) if diffs.shape[1] else np.zeros(len(noise), bool)
    if has_data.any():
        noise[has_data] = np.nanmedian(diffs[has_data], axis=1) / np.sqrt(frame_rate_hz) * 100
    return noise


def assign_model_noise_levels(noise_levels: np.ndarray, model_levels: Sequence[int]) -> np.ndarray:
    """Nearest model noise level per trace, ties up, NaN -> the lowest: CASCADE's +-0.5 bins around its
    consecutive integer levels, and with gaps between levels still a model for every trace."""
    levels = np.asarray(sorted(model_levels), dtype=np.float64)
    noise = np.where(np.isnan(noise_levels), levels[0], noise_levels)
    midpoints = (levels[:-1] + levels[1:]) / 2  # side="right": half-up rounding between neighbours
    return levels[np.searchsorted(midpoints, noise, side="right")].astype(int)


@contextlib.contextmanager
def _stderr_silenced():
    """fd 2 to /dev/null: TensorFlow's C++ start-up chatter (oneDNN, cuInit) comes before its log settings apply."""
    sys.stderr.flush()
    saved_stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(devnull)


def _import_tensorflow():
    """``import tensorflow``, quietly (~3 s). Touches no device, so the process may still fork."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _stderr_silenced():
        import tensorflow as tf
    return tf


def _tensorflow():
    """TensorFlow, imported once per process (~700 MB: only workers need it), its device logged once.
    Every GPU gets memory growth before first use, so that several workers can share one GPU."""
    if "tensorflow" not in PROCESS_CACHE:
        tf = _import_tensorflow()
        with _stderr_silenced():
            gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError as exc:  # TensorFlow already used the GPU in this process
                log.warning("cannot enable memory growth on %s: %s", gpu.name, exc)
        device = f"{gpus[0].name} (of {len(gpus)} GPU(s), memory growth on)" if gpus else "the CPU (no GPU found)"
        log.info("TensorFlow %s in process %d runs on %s", tf.__version__, os.getpid(), device)
        PROCESS_CACHE["tensorflow"] = tf
    return PROCESS_CACHE["tensorflow"]


def configure_tensorflow_threads(num_threads: int | None) -> None:
    """Cap TensorFlow's CPU threads (workers share the cores); no-op once TF has started."""
    if num_threads:
        tf = _tensorflow()
        with contextlib.suppress(RuntimeError):  # already initialised in this process: keep its settings
            tf.config.threading.set_intra_op_parallelism_threads(int(num_threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)


def _polyphase_kernel(kernel: np.ndarray) -> np.ndarray:
    """(K, C, F) -> (M * 2C, 2F) with M = K // 2 + 1: out[2i+q] = sum over m, p of k[2m+p-q] x[2(i+m)+p], so one
    product over pairs of frames gives both output phases (ConvolutionalCascade's conv 2, MatmulCascade's convs 1-2)."""
    width, channels, filters = kernel.shape
    taps = width // 2 + 1
    poly = np.zeros((taps, 2, channels, 2, filters), np.float32)
    for m, p, q in itertools.product(range(taps), range(2), range(2)):
        if 0 <= 2 * m + p - q < width:
            poly[m, p, :, q] = kernel[2 * m + p - q]
    return poly.reshape(taps * 2 * channels, 2 * filters)


class ConvolutionalCascade:
    """CASCADE's network evaluated on whole traces at once, never building windows.

    CASCADE predicts frame t from dff[t-o : t-o+W] (o = window_offset) with conv, conv, maxpool(2), conv,
    maxpool(2), per-position dense, flatten, dense. Sliding the window by one frame shifts every layer by one
    sample, so a trace is one convolutional pass whose stride-2 poolings become dilations: pool 1 is
    max(h[s], h[s+1]), conv 3 reads every 2nd sample, pool 2 is max(h[s], h[s+2]), the output every 4th.
    Tensors are (B, 1, T, C) so that oneDNN fuses each conv with its bias and ReLU. Conv 2 runs polyphase:
    (T, C) reshaped (free) to (T/2, 2C) puts frames 2i and 2i+1 side by side, and one (K//2 + 1, 2C, 2C')
    kernel gives both output phases (wider channel blocks vectorise better). Members are summed in float64
    in NumPy (an in-graph sum changed the last bit with the chunk's shape), so a row's arithmetic never
    depends on the other rows of its chunk (tests/test_inference.py checks it bit for bit).
    """

    def __init__(self):
        tf = _tensorflow()

        def conv(h, kernel, bias, dilation=1):
            return tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(h, kernel, 1, "VALID", dilations=[1, dilation]), bias))

        def forward(traces, k1, b1, k2, b2, k3, b3, kd, bd, ko, bo):
            h = conv(traces[:, None, :, None], k1, b1)  # (B, 1, T, C); T - conv 1 width + 1 is even
            h = conv(tf.reshape(h, [tf.shape(h)[0], 1, -1, k2.shape[2]]), k2, b2)  # polyphase conv 2
            h = tf.nn.max_pool2d(tf.reshape(h, [tf.shape(h)[0], 1, -1, k3.shape[2]]), (1, 2), 1, "VALID")
            h = conv(h, k3, b3, 2)
            h = conv(tf.maximum(h[:, :, :-2], h[:, :, 2:]), kd, bd)  # pool 2, per-position dense
            return tf.nn.bias_add(tf.nn.conv2d(h, ko, 1, "VALID", dilations=[1, 4]), bo)[:, 0, :, 0]

        self._forward = tf.function(forward, reduce_retracing=True, autograph=False)  # plain ops: no autograph pass
        self._tf = tf
        self._prepared = {}

    def _constants(self, members: tuple, dense_expansion: int) -> list:
        """Each member's weights as TensorFlow constants in the engine's layout, made once per model."""
        if id(members) not in self._prepared:
            prepared = []
            for w in members:
                width, channels, filters = w.conv2_kernel.shape  # polyphase (M, 2C, 2C') as a conv kernel
                poly = _polyphase_kernel(w.conv2_kernel).reshape(width // 2 + 1, 2 * channels, 2 * filters)
                ko = w.output_kernel.reshape(-1, dense_expansion, 1)
                arrays = (w.conv1_kernel, w.conv1_bias, poly, np.tile(w.conv2_bias, 2), w.conv3_kernel, w.conv3_bias)
                arrays += (w.dense_kernel[None], w.dense_bias, ko, w.output_bias)
                prepared.append(tuple(self._tf.constant(a[None] if a.ndim == 3 else a) for a in arrays))
            self._prepared[id(members)] = (members, prepared)  # holding members keeps their id unique
        return self._prepared[id(members)][1]

    def __call__(self, traces: np.ndarray, members: tuple, dense_expansion: int) -> np.ndarray:
        """Sum of the members' raw outputs, float64 (B, T - W + 1 or more), for float32 traces (B, T)."""
        # conv 1's output must split into 2 phases; an even-width conv 2 loses one frame polyphase
        first = members[0]
        pad = (traces.shape[1] - first.conv1_kernel.shape[0] + 1) % 2 + 2 * (first.conv2_kernel.shape[0] % 2 == 0)
        if pad:
            traces = np.pad(traces, ((0, 0), (0, pad)))
        traces = self._tf.constant(traces)
        outputs = [self._forward(traces, *weights).numpy() for weights in self._constants(members, dense_expansion)]
        total = outputs[0].astype(np.float64)
        for output in outputs[1:]:
            total += output
        return total


def _im2col(h: np.ndarray, taps: int, step: int = 1) -> np.ndarray:
    """(blocks, n, C) -> (blocks * n_out, taps * C): each output sample's input taps side by side, taps-major."""
    blocks, n, channels = h.shape
    out_n, s = n - (taps - 1) * step, h.strides
    view = as_strided(h, (blocks, out_n, taps, channels), (s[0], s[1], step * s[1], s[2]))
    return np.ascontiguousarray(view).reshape(blocks * out_n, taps * channels)


def _relu_affine(x: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    h = x @ weights
    h += bias
    return np.maximum(h, 0, out=h)


@dataclass(frozen=True)
class MatmulWeights:
    """One member's weights in MatmulCascade's layout: convs 1 and 2 polyphase, conv 3 im2col-shaped."""

    conv1: np.ndarray
    conv1_bias: np.ndarray
    conv2: np.ndarray
    conv2_bias: np.ndarray
    conv3: np.ndarray
    conv3_bias: np.ndarray
    dense: np.ndarray
    dense_bias: np.ndarray
    output: np.ndarray  # (dense_expansion, positions)
    output_bias: np.ndarray

    @classmethod
    def of(cls, w: NetworkWeights) -> MatmulWeights:
        dense = w.dense_kernel.shape[1]
        return cls(
            _polyphase_kernel(w.conv1_kernel), np.tile(w.conv1_bias, 2),
            _polyphase_kernel(w.conv2_kernel), np.tile(w.conv2_bias, 2),
            w.conv3_kernel.reshape(-1, w.conv3_kernel.shape[2]), w.conv3_bias, w.dense_kernel, w.dense_bias,
            np.ascontiguousarray(w.output_kernel.reshape(-1, dense).T), w.output_bias,
        )  # fmt: skip

    def forward(self, blocks: np.ndarray, taps: tuple) -> np.ndarray:
        """Raw outputs (blocks, n') for float32 input blocks (blocks, n), n even; the layers of ConvolutionalCascade."""
        num_blocks, n = blocks.shape
        h = _relu_affine(_im2col(blocks.reshape(num_blocks, n // 2, 2), taps[0]), self.conv1, self.conv1_bias)
        pairs = n // 2 - taps[0] + 1  # conv 2 reads conv 1's phases as they lie in memory: no reshuffle
        h = _relu_affine(_im2col(h.reshape(num_blocks, pairs, -1), taps[1]), self.conv2, self.conv2_bias)
        h = h.reshape(num_blocks, 2 * (pairs - taps[1] + 1), -1)
        h = np.maximum(h[:, :-1], h[:, 1:])  # pool 1
        length = h.shape[1] - 2 * (taps[2] - 1)
        h = _relu_affine(_im2col(h, taps[2], 2), self.conv3, self.conv3_bias).reshape(num_blocks, length, -1)
        h = np.maximum(h[:, :-2], h[:, 2:])  # pool 2
        length -= 2
        h = _relu_affine(h.reshape(num_blocks * length, -1), self.dense, self.dense_bias)
        z = (h @ self.output).reshape(num_blocks, length, -1)  # one column per position, read 4 frames apart
        last = z.shape[2] - 1
        out = z[:, : length - 4 * last, 0].copy()
        for position in range(1, last + 1):
            out += z[:, 4 * position : length - 4 * (last - position), position]
        return out + self.output_bias


class MatmulCascade:
    """The same network as float32 matrix products through numpy's BLAS (OpenBLAS), no TensorFlow.

    Each row is cut at fixed offsets into blocks of predicted frames (input: the block plus the window), and
    each block goes through the layers as products of its own: a frame's arithmetic depends only on its row and
    the recording's length, never on the other rows of a chunk, nor on how the BLAS tiles a larger product (with
    two blocks per product, a short recording's row got other bits in the other slot). Blocks run on ``threads``
    threads, BLAS single-threaded inside each."""

    BLOCK_FRAMES = 2048  # most predicted frames per block: 4-7 % faster than four 512-frame blocks per product

    def __init__(self, threads: int = 1):
        self.threads = max(1, int(threads))
        self._prepared = {}

    def _weights(self, members: tuple) -> list:
        if id(members) not in self._prepared:  # holding members keeps their id unique
            self._prepared[id(members)] = (members, [MatmulWeights.of(w) for w in members])
        return self._prepared[id(members)][1]

    def __call__(self, traces: np.ndarray, members: tuple, dense_expansion: int = 0) -> np.ndarray:
        """Sum of the members' raw outputs, float64 (B, T - W + 1 or more), for float32 traces (B, T)."""
        from threadpoolctl import threadpool_limits

        first, (rows, frames) = members[0], traces.shape
        taps = (first.conv1_kernel.shape[0] // 2 + 1, first.conv2_kernel.shape[0] // 2 + 1, first.conv3_kernel.shape[0])
        positions = first.output_kernel.shape[0] // first.dense_kernel.shape[1]
        window = 2 * sum(taps) + 4 * positions - 7  # input frames per predicted frame, polyphase taps included
        window += window % 2  # blocks split into pairs of frames
        predicted = max(1, frames - window + 1)
        per_row = -(-predicted // self.BLOCK_FRAMES)
        block = -(-predicted // per_row)  # blocks split a row evenly: little padding whatever its length
        block += block % 2  # even, at most BLOCK_FRAMES
        padded = np.zeros((rows, per_row * block + window), np.float32)
        padded[:, :frames] = traces
        s = padded.strides
        blocks = as_strided(padded, (rows, per_row, block + window), (s[0], block * s[1], s[1]))
        blocks = blocks.reshape(-1, 1, block + window)  # a copy: each block with its window
        weights = self._weights(members)

        def run(one_block: np.ndarray) -> np.ndarray:
            total = np.zeros((1, block))
            for member in weights:
                total += member.forward(one_block, taps)[:, :block]
            return total

        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(self.threads) as pool:
            sums = np.concatenate(list(pool.map(run, blocks)))
        return sums.reshape(rows, per_row * block)


@dataclass(frozen=True)
class CascadeEngine:
    """A way to evaluate CASCADE's network (--engine): the only place to touch to add one. ``make`` takes the
    process's thread count and returns a callable (float32 traces (B, T), members, dense_expansion) -> the
    members' float64 sum; engines agree to ~1e-6 (tests/test_inference.py), each bit for bit across chunkings."""

    description: str
    make: Callable[[int], Callable]
    needs_tensorflow: bool = False


def _tensorflow_engine(threads: int) -> ConvolutionalCascade:
    configure_tensorflow_threads(threads)
    return ConvolutionalCascade()


CASCADE_ENGINES = {
    "tensorflow": CascadeEngine("TensorFlow's oneDNN convolutions (and a GPU where TensorFlow finds one)",
                                _tensorflow_engine, needs_tensorflow=True),
    "numpy": CascadeEngine("float32 matrix products through numpy's BLAS, without TensorFlow", MatmulCascade),
}  # fmt: skip
AUTO_ENGINE = "auto"


@dataclass(frozen=True)
class EngineChoice:
    name: str  # a key of CASCADE_ENGINES
    why: str


def cpu_flags() -> set:
    """The CPU's feature flags (/proc/cpuinfo; empty where the OS has none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def choose_engine(requested: str = AUTO_ENGINE) -> EngineChoice:
    """--engine: a name, or auto. auto is the engine measured fastest on this kind of host (benchmarks/
    RESULTS_inference.md): TensorFlow where there is a GPU or AVX-512 (oneDNN at the matrix-product rate), numpy
    on the rest (on an AVX2-only EPYC oneDNN's convolutions reached about 0.3 of it). By the CPU's flags, never by
    a timing, so every run on one host makes the same choice."""
    if requested != AUTO_ENGINE:
        return EngineChoice(requested, "--engine " + requested)
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()) and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1"):
        return EngineChoice("tensorflow", "auto: an NVIDIA GPU is present")
    flags = cpu_flags()
    if "avx512f" in flags or not flags:
        return EngineChoice("tensorflow", "auto: the CPU has AVX-512" if flags else "auto: the CPU's flags are unknown")
    return EngineChoice("numpy", "auto: the CPU has no AVX-512 (oneDNN's convolutions are slow there)")


def use_engine(name: str, threads: int):
    """This process's engine from now on (made once per name and thread count)."""
    key = (name, max(1, int(threads)))
    if PROCESS_CACHE.get("engine", (None,))[0] != key:
        PROCESS_CACHE["engine"] = (key, CASCADE_ENGINES[name].make(key[1]))
    return PROCESS_CACHE["engine"][1]


def _engine():
    """The engine set by use_engine, else the automatic choice with all the CPUs."""
    if "engine" not in PROCESS_CACHE:
        use_engine(choose_engine().name, available_cpus())
    return PROCESS_CACHE["engine"][1]


def _nan_window_mask(nan_frames: np.ndarray, window_size: int, num_windows: int) -> np.ndarray:
    """True for every window start whose window holds at least one NaN frame."""
    counts = np.pad(np.cumsum(nan_frames, axis=1, dtype=np.int32), ((0, 0), (1, 0)))
    return (counts[:, window_size : window_size + num_windows] - counts[:, :num_windows]) > 0


def predict_raw_rates(dff: np.ndarray, model: CascadeModel, *, max_chunk_frames: int = 1 << 18) -> tuple:
    """(rates (N, T) float64: the ensemble-mean output, NaN where no prediction exists, no threshold or
    padding; noise_levels (N,); model_noise_levels (N,)), in chunks of about ``max_chunk_frames``
    neuron-frames so that memory stays a small multiple of one chunk whatever N is."""
    dff = np.asarray(dff)
    if dff.ndim != 2:
        raise ValueError(f"dF/F must be 2-D (neurons, frames), got shape {dff.shape}")
    num_neurons, num_frames = dff.shape
    rates = np.full((num_neurons, num_frames), np.nan)
    noise = calculate_noise_levels(dff, model.sampling_rate_hz)
    model_noise = assign_model_noise_levels(noise, model.noise_levels)
    num_windows = num_frames - model.window_size + 1
    if num_neurons == 0 or num_windows <= 0:
        return rates, noise, model_noise
    rows_per_chunk = max(1, max_chunk_frames // num_frames)
    for level in model.noise_levels:
        rows, members = np.flatnonzero(model_noise == level), model.ensembles[level]
        for start in range(0, len(rows), rows_per_chunk):
            chunk_rows = rows[start : start + rows_per_chunk]
            traces = dff[chunk_rows].astype(np.float32)
            nan_frames = np.isnan(traces)
            traces[nan_frames] = 0.0  # masked below: any NaN in a window gives NaN
            total = _engine()(traces, members, model.dense_expansion)[:, :num_windows] / np.float64(len(members))
            if nan_frames.any():
                total[_nan_window_mask(nan_frames, model.window_size, num_windows)] = np.nan
            rates[chunk_rows, model.window_offset : model.window_offset + num_windows] = total
    return rates, noise, model_noise


def apply_cascade_threshold(rates: np.ndarray, model: CascadeModel, threshold) -> np.ndarray:
    """CASCADE's post-processing, in place. threshold False: raw; 0: negative rates -> 0; 1: as 0, after
    CASCADE's noise-floor cut: frames farther than int(smoothing*rate) frames from any rate above 1/e of
    a single smoothed spike's peak (NaN included, as in CASCADE) -> 0."""
    if threshold is False or threshold is None:
        return rates
    if threshold not in (0, 1):
        raise ValueError(f"threshold must be 0, 1 or False, got {threshold!r}")
    if threshold == 1:
        from scipy.ndimage import gaussian_filter1d, maximum_filter1d

        unit_spike = np.zeros(1001)
        unit_spike[501] = 1.0  # smoothed by CASCADE's Gaussian (scipy's gaussian_filter of a delta)
        threshold_value = float(gaussian_filter1d(unit_spike, sigma=model.smoothing_frames).max()) / math.e
        with np.errstate(invalid="ignore"):
            active = rates > threshold_value
        reach = int(model.smoothing_frames)
        if reach > 0:
            active = maximum_filter1d(active.view(np.uint8), size=2 * reach + 1, axis=1, mode="constant").astype(bool)
        else:  # scipy's binary_dilation with iterations=0 dilates until nothing changes
            active = np.repeat(active.any(axis=1, keepdims=True), rates.shape[1], axis=1)
        rates[~active] = 0.0
    with np.errstate(invalid="ignore"):
        rates[rates < 0] = 0.0
    return rates


def predict_spike_rates(
    dff: np.ndarray, model: CascadeModel, threshold=0, padding=np.nan, *, return_noise=False, max_chunk_frames=1 << 19
):
    """CASCADE spike rates (spikes per frame) for dF/F traces shaped (neurons, frames).

    As ``cascade2p.cascade.predict``: dF/F as fractions; each neuron uses the ensemble of its nearest model
    noise level; ensemble mean; ``threshold`` 0, 1 or False; the first int(before_frac*W) and last
    int((1-before_frac)*W) frames set to ``padding``. Unlike CASCADE (whose max-pooling can swallow a NaN),
    any NaN inside a window gives NaN. ``return_noise`` adds a report {'noise_level', 'model_noise_level'}.
    """
    rates, noise, model_noise = predict_raw_rates(dff, model, max_chunk_frames=max_chunk_frames)
    apply_cascade_threshold(rates, model, threshold)
    num_frames = rates.shape[1]
    rates[:, : min(model.frames_before, num_frames)] = padding
    if model.frames_after > 0:
        rates[:, max(0, num_frames - model.frames_after) :] = padding
    return (rates, {"noise_level": noise, "model_noise_level": model_noise}) if return_noise else rates


def predict_rates_keeping_nan(dff: np.ndarray, model: CascadeModel, threshold) -> tuple:
    """predict_spike_rates(..., padding=NaN, return_noise=True), but frames without a prediction stay NaN after
    the threshold (CASCADE's threshold 1 sets those far from activity to 0): what cell_activity.h5 records."""
    rates, noise, model_noise = predict_raw_rates(dff, model)  # NaN at the edges and in windows touching NaN
    missing = np.isnan(rates)
    missing[:, : model.frames_before] = True  # CASCADE's padding (one frame more than the raw edges)
    missing[:, max(0, rates.shape[1] - model.frames_after) :] = model.frames_after > 0
    apply_cascade_threshold(rates, model, threshold)
    rates[missing] = np.nan
    return rates, {"noise_level": noise, "model_noise_level": model_noise}


# =============================================================================================
# 6. Time base and spikes: rates re-binned to --target_rate_hz; rates -> discrete spike counts, or binary
# spikes reproducible whatever the batching
# =============================================================================================
# With --target_rate_hz, frame i (seconds [i/f, (i+1)/f)) gives each bin j (seconds [j/R, (j+1)/R)) the
# fraction of its duration that falls in the bin, so a bin's rate is its expected spike count and the
# counts are conserved. Only bins wholly inside the recording exist (a trailing part-bin is dropped).
# A bin that any frame without a value touches (CASCADE's edges, windows with NaN) is NaN: a partial sum
# would look like low activity. Spikes are then drawn from the bins' rates, as from frames' rates.

OVERLAP_TOLERANCE = 1e-9  # a frame touching a bin by less than this fraction (float rounding) does not count


@dataclass(frozen=True)
class TimeBase:
    """The timepoints rates, spikes and the grid are on: the recording's frames, or bins at --target_rate_hz.
    Timepoint i covers seconds [i / rate_hz, (i + 1) / rate_hz) from the first frame's start."""

    frame_rate_hz: float  # the recording's
    num_frames: int  # the recording's
    target_rate_hz: float | None = None

    @property
    def rate_hz(self) -> float:
        return self.target_rate_hz or self.frame_rate_hz

    @property
    def num_timepoints(self) -> int:
        if self.target_rate_hz is None:
            return self.num_frames
        return int(math.floor(self.num_frames * self.target_rate_hz / self.frame_rate_hz + OVERLAP_TOLERANCE))

    def times_s(self) -> np.ndarray:
        """(timepoints,) start of each timepoint in seconds."""
        return np.arange(self.num_timepoints) / self.rate_hz

    @functools.cached_property
    def overlap(self):
        """(frames, bins) scipy CSR matrix: the fraction of frame i that lies in bin j."""
        from scipy.sparse import csr_matrix

        frames, ratio = np.arange(self.num_frames), self.target_rate_hz / self.frame_rate_hz
        rows, columns, weights = [], [], []
        for step in range(int(math.ceil(ratio)) + 1):  # the bins a frame can touch
            bins = np.floor(frames * ratio).astype(np.int64) + step
            start = np.maximum(frames, bins / ratio)  # in frames
            fraction = np.minimum(frames + 1, (bins + 1) / ratio) - start
            keep = (fraction > OVERLAP_TOLERANCE) & (bins < self.num_timepoints)
            rows, columns, weights = rows + [frames[keep]], columns + [bins[keep]], weights + [fraction[keep]]
        shape = (self.num_frames, self.num_timepoints)
        return csr_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(columns))), shape=shape)

    def rebin(self, rates: np.ndarray) -> np.ndarray:
        """(cells, frames) rates per frame -> (cells, timepoints) expected spikes per timepoint (float64);
        NaN in any frame a bin touches makes the bin NaN. Unchanged without --target_rate_hz."""
        if self.target_rate_hz is None:
            return rates
        missing = np.isnan(rates)
        out = np.asarray((self.overlap.T @ np.where(missing, 0.0, rates).T).T, dtype=np.float64)
        if missing.any():
            touched = self.overlap.astype(bool).astype(np.int32)
            out[(missing.astype(np.int32) @ touched) > 0] = np.nan
        return out

    def predicted(self, frames_predicted: np.ndarray) -> np.ndarray:
        """(timepoints,) bool: timepoints whose every frame has a prediction."""
        if self.target_rate_hz is None:
            return np.asarray(frames_predicted, bool)
        return ~np.isnan(self.rebin(np.where(frames_predicted, 0.0, np.nan)[None])[0])

    def first_frames(self) -> np.ndarray:
        """(timepoints,) int64 the recording frame in which each timepoint starts."""
        frames = np.floor(self.times_s() * self.frame_rate_hz + OVERLAP_TOLERANCE)
        return np.minimum(frames, self.num_frames - 1).astype(np.int64)

    def bin_means(self, array: np.ndarray) -> np.ndarray:
        """(frames, ...) values -> (timepoints, ...) their means over each bin, weighted by overlap (NaN where
        a frame the bin touches is NaN), in the array's dtype."""
        flat = np.asarray(array, dtype=np.float64).reshape(len(array), -1)
        sums = np.asarray(self.overlap.T @ flat) / np.asarray(self.overlap.sum(axis=0)).reshape(-1, 1)
        return sums.reshape(-1, *np.shape(array)[1:]).astype(np.asarray(array).dtype)

    def resample_covariates(self, covariates: Covariates) -> Covariates:
        """Covariates per timepoint of this time base (per frame without --target_rate_hz: unchanged). In a bin,
        codes (stimulus, condition, integer extras) are the value of the frame it starts in; behaviour, eye and
        real-valued extras their mean over the bin; condition periods are counted in bins (fractional)."""
        if self.target_rate_hz is None:
            return dataclasses.replace(covariates, clock="timepoints")  # the same rows: timepoints are the frames
        first = self.first_frames()

        def at_bins(array, codes: bool):
            if array is None:
                return None
            return np.asarray(array)[first] if codes or np.asarray(array).dtype.kind in "biu" else self.bin_means(array)

        return dataclasses.replace(
            covariates, stimulus=at_bins(covariates.stimulus, True), condition=at_bins(covariates.condition, True),
            behavior=at_bins(covariates.behavior, False), eye=at_bins(covariates.eye, False),
            extra={name: at_bins(array, False) for name, array in covariates.extra.items()},
            condition_periods=np.asarray(covariates.condition_periods) * (self.rate_hz / self.frame_rate_hz),
            clock="timepoints",
        )  # fmt: skip


def _segment_positions(starts: np.ndarray, lengths: np.ndarray, pad: int) -> np.ndarray:
    """Flat indices of every segment, each extended by ``pad`` on both sides, concatenated."""
    extended = lengths + 2 * pad
    block_start = np.repeat(starts - pad - np.concatenate([[0], np.cumsum(extended)[:-1]]), extended)
    return block_start + np.arange(extended.sum())


def infer_discrete_spikes(rates: np.ndarray, model: CascadeModel) -> np.ndarray:
    """Integer spike counts per frame whose Gaussian-smoothed train best matches the rates.

    CASCADE's idea: the rate is split into supported segments (rate > 0.03/sigma, dilated by 4 sigma), and
    spikes smoothed with CASCADE's Gaussian (sigma = smoothing * sampling_rate frames) are added while a
    segment holds fewer than its rounded summed rate and each new spike fits the rate about as well or
    better (L1). Where CASCADE samples positions by Monte-Carlo, each round here adds, in every unfinished
    segment of every neuron at once, the spike that lowers the error most. NaN rates get no spikes.
    """
    from scipy.ndimage import maximum_filter1d

    rates = np.nan_to_num(np.asarray(rates, dtype=np.float64), nan=0.0)
    num_neurons, num_frames = rates.shape
    if rates.size == 0:
        return np.zeros((num_neurons, num_frames), dtype=np.int32)
    sigma = max(model.smoothing_frames, 1e-6)
    radius = max(1, int(4.0 * sigma + 0.5))  # scipy.ndimage's Gaussian (truncate=4) as explicit taps
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    supported = (rates > 0.03 / sigma).view(np.uint8)
    support = maximum_filter1d(supported, size=max(1, round(4 * sigma)), axis=1, mode="constant")
    # Rows laid end to end with `radius` zeros between them, so no kernel reaches a neighbour.
    rate_flat = np.pad(rates, ((0, 0), (radius, radius))).ravel()
    edges = np.diff(np.pad(np.pad(support, ((0, 0), (radius, radius))).ravel().astype(np.int8), 1))
    starts = np.flatnonzero(edges == 1)
    lengths = np.flatnonzero(edges == -1) - starts
    segment_sum = np.add.reduceat(rate_flat, starts) if len(starts) else np.zeros(0)
    budget = np.floor(segment_sum + 0.5)  # at most the spikes the segment's rate mass stands for
    placed = np.zeros(len(starts), dtype=np.int64)
    approximation, spikes_flat = np.zeros_like(rate_flat), np.zeros(rate_flat.shape, dtype=np.int32)
    active = np.flatnonzero(placed < budget)
    while active.size:
        seg_length = lengths[active]
        positions = _segment_positions(starts[active], seg_length, radius)
        error = rate_flat[positions] - approximation[positions]
        gain = np.zeros(len(positions) - 2 * radius)  # L1 error change of one smoothed spike at each position
        for tap, weight in enumerate(kernel):
            window_error = error[tap : tap + len(gain)]
            gain += np.abs(window_error) - np.abs(window_error - weight)
        # each segment's first best frame among its own (un-padded) frames
        padded_start = np.concatenate([[0], np.cumsum(seg_length + 2 * radius)[:-1]])
        core_gain = gain[_segment_positions(padded_start, seg_length, 0)]
        core_offset = np.concatenate([[0], np.cumsum(seg_length)[:-1]])
        best = np.maximum.reduceat(core_gain, core_offset)
        owner = np.repeat(np.arange(len(active)), seg_length)
        is_best = np.flatnonzero(core_gain == best[owner])
        first_owner, first_index = np.unique(owner[is_best], return_index=True)
        # A spike may raise the L1 error by up to 10% of its own mass: CASCADE's Monte-Carlo search,
        # with its prune-and-refill passes, ends with about that many spikes (checked on its reference).
        accept = best[first_owner] > -0.1
        chosen = active[first_owner[accept]]
        spike_at = starts[chosen] + (is_best[first_index] - core_offset[first_owner])[accept]
        np.add.at(approximation, (spike_at[:, None] + offsets).ravel(), np.tile(kernel, len(spike_at)))
        np.add.at(spikes_flat, spike_at, 1)
        placed[chosen] += 1
        active = chosen[placed[chosen] < budget[chosen]]
    return spikes_flat.reshape(num_neurons, -1)[:, radius : radius + num_frames].copy()


def sample_spikes(rates: np.ndarray, cell_ids: np.ndarray, seed: int) -> np.ndarray:
    """Bernoulli(clip(rate, 0, 1)) per frame from a random stream keyed by (seed, cell id), so a cell gets
    the same spikes whatever --workers or --batch_size."""
    probability = np.clip(np.nan_to_num(rates, nan=0.0), 0.0, 1.0)
    spikes = np.zeros(rates.shape, dtype=bool)
    for row, cell_id in enumerate(np.asarray(cell_ids, dtype=np.int64)):
        stream = np.random.Generator(np.random.Philox(key=[int(seed) & (2**64 - 1), int(cell_id)]))
        spikes[row] = stream.random(rates.shape[1]) < probability[row]
    return spikes


@dataclass(frozen=True)
class SpikeContext:
    """What a spike mode may use besides the rates."""

    cell_ids: np.ndarray  # (N,) keys of each cell's random stream
    seed: int
    spike_threshold: float  # spikes/frame
    model: CascadeModel | None  # its smoothing, for discrete spikes


def _discrete_spikes(rates: np.ndarray, context: SpikeContext) -> np.ndarray:
    if context.model is None:
        raise ValueError("discrete spikes need the CASCADE model (its smoothing)")
    return infer_discrete_spikes(rates, context.model) > 0


@dataclass(frozen=True)
class SpikeMode:
    """One way to turn rates into binary spikes: the only place to touch to add one (--spike_mode's
    choices and help come from this table)."""

    description: str
    binarize: Callable[[np.ndarray, SpikeContext], np.ndarray]  # (N, T) rates -> (N, T) bool, NaN never spikes


SPIKE_MODES = {
    "sample": SpikeMode("seeded Bernoulli(rate)", lambda rates, c: sample_spikes(rates, c.cell_ids, c.seed)),
    "discrete": SpikeMode("inferred spike counts > 0", _discrete_spikes),
    "threshold": SpikeMode(
        "rate >= --spike_threshold", lambda rates, c: np.nan_to_num(rates, nan=0.0) >= c.spike_threshold
    ),
}


def binarize_spikes(
    rates: np.ndarray, cell_ids: np.ndarray, mode: str, *, seed: int = 42, spike_threshold: float = 0.5, model=None
) -> np.ndarray:
    """Binary spikes (N, T) bool from CASCADE rates (spikes/frame) by a mode of SPIKE_MODES."""
    if mode not in SPIKE_MODES:
        raise ValueError(f"unknown spike mode {mode!r}")
    return SPIKE_MODES[mode].binarize(rates, SpikeContext(np.asarray(cell_ids), seed, spike_threshold, model))


# =============================================================================================
# 7. Gridding: cells -> voxels, spikes -> unique sorted COO coordinates, train/test split
# =============================================================================================
# The grid is built a block of timepoints at a time: entries are sorted by t first, so blocks
# written one after the other give exactly the array a single pass would, and memory grows with
# one block's spikes, never with the dense grid.

SPIKES_PER_GRID_BLOCK = 1 << 22  # ~4 M spikes (~100 MB of temporaries) per block


@dataclass(frozen=True)
class GridSpec:
    """The (T, Z, H, W) grid of one subject and where each cell falls in it."""

    num_timepoints: int
    num_z_planes: int
    height: int
    width: int
    z_values: np.ndarray  # (Z,) distinct z positions (atlas frame: each slab's centre), ascending
    cell_voxels: np.ndarray  # (N, 3) int32 [z, x, y] per cell
    cells_outside: np.ndarray | None = None  # (N,) bool: outside the atlas extent, no spikes placed (atlas frame)

    @property
    def shape(self) -> tuple:
        return (self.num_timepoints, self.num_z_planes, self.height, self.width)


@dataclass(frozen=True)
class GridSettings:
    """What gridding takes from the command line (fields named after the options)."""

    grid_shape: tuple  # (H, W)
    z_markers: bool
    keep_edge_frames: bool
    split_block: int
    split_ratio: float
    seed: int
    coordinates: str  # 'registered': the atlas frame (make_atlas_grid_spec)
    atlas_shape: tuple  # (X, Y, Z) voxels
    z_planes: int
    split: str  # 'blocks' (block_split), 'conditions' (condition_split) or 'zapbench' (zapbench_split)
    holdout_condition: str | None
    val_ratio: float | None = None
    test_ratio: float | None = None
    condition_padding: int | None = None


def make_grid_spec(positions, num_timepoints: int, height: int, width: int, z_markers=True, valid=None) -> GridSpec:
    """x (column 1) -> [0, H-1], y (column 2) -> [0, W-1], one plane per distinct z value. Scaling and planes
    come from the ``valid`` cells only (all by default); other cells get their clipped position's voxel (no spikes)."""
    valid = np.ones(len(positions), bool) if valid is None else np.asarray(valid, bool)
    reference = positions[valid]
    z_values = np.unique(reference[:, 2])
    if z_markers and len(z_values) + 1 > width:
        raise PipelineError(
            f"{len(z_values)} z-planes need a grid width of at least "
            f"{len(z_values) + 1} for the z markers (--grid_shape or --no_z_markers)"
        )
    voxels = np.zeros((len(positions), 3), dtype=np.int32)
    voxels[:, 0] = np.clip(np.searchsorted(z_values, positions[:, 2]), 0, len(z_values) - 1)
    for axis, size in enumerate((height, width)):
        low, high = reference[:, axis].min(), reference[:, axis].max()
        if high > low:  # min-max scaled to [0, size-1] and floored (the original's mapping), clipped
            scaled = np.floor((positions[:, axis] - low) / (high - low) * (size - 1))
            voxels[:, axis + 1] = np.clip(scaled, 0, size - 1)
    return GridSpec(num_timepoints, len(z_values), height, width, z_values, voxels)


def make_atlas_grid_spec(positions, num_timepoints: int, settings: GridSettings) -> GridSpec:
    """--coordinates registered: the fixed atlas extent (--atlas_shape, n voxels per axis) onto the grid, the same
    for every fish and shard. Positions are 1-based atlas voxel indices (Chen's CellXYZ_norm, into Z-Brain); voxel v
    of an axis falls in grid index floor((v - 1) * size / n), size H (x), W (y) or --z_planes (z: equal slabs), so
    one atlas voxel is one grid voxel in every fish. Cells outside [1, n] on an axis are marked (no spikes placed)."""
    (height, width), depth = settings.grid_shape, settings.z_planes
    if settings.z_markers and depth + 1 > width:
        raise PipelineError(f"--z_planes {depth} needs a grid width of at least {depth + 1} for the z markers")
    extent, sizes = np.asarray(settings.atlas_shape, np.float64), np.array([height, width, depth])
    positions = np.asarray(positions, np.float64)
    outside = ~np.all((positions >= 1) & (positions <= extent), axis=1)
    index = np.clip(np.floor((positions - 1) * sizes / extent), 0, sizes - 1).astype(np.int32)
    z_values = 0.5 + (np.arange(depth) + 0.5) * extent[2] / depth  # each slab's centre, in atlas voxel indices
    return GridSpec(num_timepoints, depth, height, width, z_values, index[:, [2, 0, 1]].copy(), outside)


def z_marker_coords(grid: GridSpec, timepoints: range | None = None) -> np.ndarray:
    """The original's 'preaugmented' z markers: rows 0-1, columns W-(z+2)..W-1 for every (t, z)."""
    timepoints = range(grid.num_timepoints) if timepoints is None else timepoints
    width = grid.width
    pixels = [(z, x, y) for z in range(grid.num_z_planes) for x in (0, 1) for y in range(width - (z + 2), width)]
    plane_pixels = np.array(pixels, dtype=np.int32).reshape(-1, 3)  # (P, 3) [z, x, y]
    t = np.repeat(np.asarray(timepoints, dtype=np.int32), len(plane_pixels))
    return np.column_stack([t, np.tile(plane_pixels, (len(timepoints), 1))])


@dataclass
class CooCounts:
    """What went into a COO grid (or one block of it): entries of each kind and collisions."""

    spike_pixels: int = 0  # active voxels made by spikes
    marker_pixels: int = 0  # z-marker voxels
    marker_spike_overlap: int = 0  # voxels that are both
    spikes_in_grid: int = 0  # spikes in kept frames
    collisions: int = 0  # spikes that fell on a voxel already active at that time

    def __iadd__(self, other: CooCounts) -> CooCounts:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self


def build_coo(
    spike_cells, spike_timepoints, grid: GridSpec, row_of_timepoint, z_markers=True, timepoints=None
) -> tuple:
    """Unique, sorted [t, z, x, y] int32 coordinates of every active voxel, and CooCounts. ``spike_timepoints`` are
    timepoints of the time base (those mapped to -1, dropped, are skipped); several cells in one voxel at one time give
    one active voxel (counted as collisions). ``timepoints`` limits the z markers to a block of timepoints (all by
    default); the spikes given must then fall in that block."""
    timepoint = row_of_timepoint[spike_timepoints]
    keep = timepoint >= 0
    if grid.cells_outside is not None:
        keep &= ~grid.cells_outside[spike_cells]
    cell_linear = np.ravel_multi_index(tuple(grid.cell_voxels.T.astype(np.int64)), grid.shape[1:])
    # unique by sorting: 10x faster here than NumPy 2's hash-based np.unique on millions of ints; stable (timsort)
    # merges the runs of timepoints the events come in, 1.7x faster than the default sort
    spike_linear = np.sort(timepoint[keep] * math.prod(grid.shape[1:]) + cell_linear[spike_cells[keep]], kind="stable")
    spike_linear = spike_linear[np.diff(spike_linear, prepend=-1) != 0]
    marker_linear = np.zeros(0, np.int64)
    if z_markers:
        marker_linear = np.ravel_multi_index(tuple(z_marker_coords(grid, timepoints).T.astype(np.int64)), grid.shape)
    # the sorted union in one pass (np.union1d would sort both again)
    where = np.searchsorted(spike_linear, marker_linear)
    present = where < len(spike_linear)
    present[present] = spike_linear[where[present]] == marker_linear[present]
    all_linear = np.insert(spike_linear, where[~present], marker_linear[~present])
    coords = np.empty((len(all_linear), 4), dtype=np.int32)
    for column, values in enumerate(np.unravel_index(all_linear, grid.shape)):
        coords[:, column] = values
    num_spikes, num_markers, in_grid = len(spike_linear), len(marker_linear), int(keep.sum())
    overlap = num_spikes + num_markers - len(all_linear)
    return coords, CooCounts(num_spikes, num_markers, overlap, in_grid, in_grid - num_spikes)


# Split codes of every output with a time axis (`split` (T,) int8 beside the seed's is_train, which is split == 0)
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2, "none": -1}
TRAIN, VALIDATION, TEST, NO_SPLIT = SPLIT_CODES.values()
ZAPBENCH_VAL_FRACTION, ZAPBENCH_TEST_FRACTION, ZAPBENCH_CONDITION_PADDING = 0.1, 0.2, 1  # ZAPBench's constants


def block_split(num_timepoints: int, block_frames: int = 330, split_ratio: float = 0.95, seed: int = 42,
                val_ratio: float = 0.0) -> tuple:  # fmt: skip
    """The original's split: blocks of ``block_frames`` shuffled with RandomState(seed); the first
    max(1, int(num_blocks*(1-split_ratio))) shuffled blocks are test, the next max(1, int(num_blocks*val_ratio))
    validation (none when val_ratio is 0), the rest and any leftover frames train. Returns (split codes (T,) int8,
    test block indices, validation block indices)."""
    num_blocks = max(1, num_timepoints // block_frames)
    order = np.random.RandomState(seed).permutation(num_blocks)
    num_test = max(1, int(num_blocks * (1 - split_ratio)))
    num_val = min(max(1, int(num_blocks * val_ratio)) if val_ratio > 0 else 0, num_blocks - num_test)
    test_blocks, val_blocks = np.sort(order[:num_test]), np.sort(order[num_test : num_test + num_val])
    split = np.full(num_timepoints, TRAIN, dtype=np.int8)
    for blocks, code in ((val_blocks, VALIDATION), (test_blocks, TEST)):
        for block in blocks:
            split[block * block_frames : (block + 1) * block_frames] = code
    return split, test_blocks, val_blocks


def train_test_split(num_timepoints: int, block_frames: int = 330, split_ratio: float = 0.95, seed: int = 42) -> tuple:
    """The original's split as it returned it: (is_train (T,) uint8, test block indices) (block_split)."""
    split, test_blocks, _ = block_split(num_timepoints, block_frames, split_ratio, seed)
    return (split == TRAIN).astype(np.uint8), test_blocks


def condition_split(condition: np.ndarray, kept_timepoints: np.ndarray, periods, split_ratio: float,
                    val_ratio: float = 0.0) -> np.ndarray:  # fmt: skip
    """--split conditions: (T,) int8 split codes. ``condition`` is per timepoint of the time base (-1: in no condition). Within
    each condition, its frames in order form repetitions of its period; of R repetitions the last
    max(1, round(R * (1 - split_ratio))) are test (none when split_ratio is 1), whole, so no repetition is cut, and
    the max(1, round(R * val_ratio)) before them validation (none when val_ratio is 0). A condition of one
    repetition (spontaneous activity) or without a period is split in contiguous parts: its last
    round(n * (1 - split_ratio)) timepoints are test, the round(n * val_ratio) before them validation. Frames in
    no condition are train."""
    split = np.full(len(kept_timepoints), TRAIN, dtype=np.int8)
    kept_condition = condition[kept_timepoints]
    for index in np.unique(kept_condition[kept_condition >= 0]):
        frames = np.flatnonzero(condition == index)
        period = float(periods[index]) if index < len(periods) else len(frames)  # in bins: may be fractional
        repetitions = math.ceil(len(frames) / period)
        codes = np.full(len(condition), TRAIN, dtype=np.int8)
        if repetitions > 1:
            num_test = max(1, round(repetitions * (1 - split_ratio))) if split_ratio < 1 else 0
            num_val = max(1, round(repetitions * val_ratio)) if val_ratio > 0 else 0
            repetition = np.arange(len(frames)) // period
            codes[frames[repetition >= repetitions - num_test - num_val]] = VALIDATION
            codes[frames[repetition >= repetitions - num_test]] = TEST
        else:
            kept = kept_timepoints[kept_condition == index]
            num_test, num_val = round(len(kept) * (1 - split_ratio)), round(len(kept) * val_ratio)
            codes[kept[len(kept) - num_test - num_val :]] = VALIDATION
            codes[kept[len(kept) - num_test :]] = TEST
        split[kept_condition == index] = codes[kept_timepoints][kept_condition == index]
    return split


@dataclass(frozen=True)
class ConditionSegments:
    """The run's timepoints cut into contiguous runs of one condition (ZAPBench's condition_offsets): segment s is
    rows offsets[s]:offsets[s+1] of condition conditions[s] (-1: in no condition), named names[s]."""

    offsets: tuple  # (S+1,) 0 = offsets[0] < ... < offsets[S] = T
    conditions: tuple  # (S,) condition index per segment, -1 for none
    names: tuple  # (S,)

    @classmethod
    def of(cls, condition_rows: np.ndarray | None, condition_names: Sequence[str], num_rows: int) -> ConditionSegments:
        """Segments of a (T,) condition per row; one segment 'all' without conditions."""
        if condition_rows is None or num_rows == 0:
            return cls((0, num_rows), (-1,), ("all",))
        changes = np.flatnonzero(np.diff(condition_rows)) + 1
        offsets = (0, *map(int, changes), num_rows)
        conditions = tuple(int(condition_rows[start]) for start in offsets[:-1])
        names = tuple(condition_names[c] if 0 <= c < len(condition_names) else "none" for c in conditions)
        return cls(offsets, conditions, names)


def zapbench_split(segments: ConditionSegments, val_fraction: float, test_fraction: float, padding: int,
                   held_out: Sequence[int] = ()) -> np.ndarray:  # fmt: skip
    """--split zapbench: (T,) int8 split codes by ZAPBench's rule (data_utils.get_condition_bounds and
    adjust_condition_bounds_for_split): a segment's bounds are [offset + padding, next offset - padding); of their
    n timepoints int(n * test_fraction) are test, int(n * val_fraction) validation (truncated as ZAPBench's), the
    first n - both train, in that order; the padding is in no split (-1). A held-out condition's segments are all
    test within their bounds. Context is the sampler's business: ZAPBench's own windows reach back before a split."""
    split = np.full(segments.offsets[-1], NO_SPLIT, dtype=np.int8)
    for start, stop, condition in zip(segments.offsets[:-1], segments.offsets[1:], segments.conditions):
        low, high = start + padding, stop - padding
        if high <= low:
            continue
        total = high - low
        num_test, num_val = int(total * test_fraction), int(total * val_fraction)
        num_train = total - num_test - num_val
        if condition >= 0 and condition in held_out:
            split[low:high] = TEST
            continue
        split[low : low + num_train] = TRAIN
        split[low + num_train : low + num_train + num_val] = VALIDATION
        split[low + num_train + num_val : high] = TEST
    return split


def zapbench_fractions(settings) -> tuple:
    """(val_fraction, test_fraction) of --split zapbench: --val_ratio and --test_ratio, else ZAPBench's."""
    val = ZAPBENCH_VAL_FRACTION if settings.val_ratio is None else settings.val_ratio
    return val, ZAPBENCH_TEST_FRACTION if settings.test_ratio is None else settings.test_ratio


def zapbench_padding(settings) -> int:
    return ZAPBENCH_CONDITION_PADDING if settings.condition_padding is None else settings.condition_padding


def _condition_index(covariates: Covariates, name: str) -> int:
    """The index of a condition named on the command line (case ignored), or a PipelineError listing the names."""
    lowered = [known.lower() for known in covariates.condition_names]
    if covariates.condition is None:
        raise PipelineError(
            f"--holdout_condition {name!r}: this subject has no stimulus conditions (no usable timelists in its input)"
        )
    if name.lower() not in lowered:
        known = ", ".join(covariates.condition_names)
        raise PipelineError(
            f"--holdout_condition {name!r} is not a stimulus condition of this subject (its conditions: {known})"
        )
    return lowered.index(name.lower())


def plan_split(kept_timepoints: np.ndarray, covariates: Covariates, settings: GridSettings) -> tuple:
    """(is_train (T,) uint8, test blocks, the rule in words): plan_splits as the seed's train/test mask."""
    split, test_blocks, rule = plan_splits(kept_timepoints, covariates, settings)
    return (split == TRAIN).astype(np.uint8), test_blocks, rule


def plan_splits(kept_timepoints: np.ndarray, covariates: Covariates, settings: GridSettings) -> tuple:
    """(split codes (T,) int8, test blocks, the rule in words): --split, --val_ratio, --test_ratio,
    --condition_padding and --holdout_condition. --split conditions for a subject without conditions falls back to
    blocks (the rule says so; check_split warns); --split zapbench without conditions is one segment."""
    ratio, val = settings.split_ratio, settings.val_ratio or 0.0
    held = None if not settings.holdout_condition else _condition_index(covariates, settings.holdout_condition)
    test_blocks = np.zeros(0, np.int64)  # blocks are used by the block rule only
    if settings.split == "zapbench":
        condition = None if covariates.condition is None else covariates.condition[kept_timepoints]
        segments = ConditionSegments.of(condition, covariates.condition_names, len(kept_timepoints))
        (val, test), padding = zapbench_fractions(settings), zapbench_padding(settings)
        split = zapbench_split(segments, val, test, padding, () if held is None else (held,))
        rule = (
            f"zapbench: each of {len(segments.names)} contiguous condition segments, less {padding} timepoint(s) at "
            f"each edge (none, -1), is train, validation and test in that order: int(n x {test:g}) test, "
            f"int(n x {val:g}) validation, the rest train (ZAPBench's data_utils)"
        )
    elif settings.split == "conditions" and covariates.condition is not None:
        split = condition_split(covariates.condition, kept_timepoints, covariates.condition_periods, ratio, val)
        rule = (
            f"conditions: per condition its last max(1, round(R x {1 - ratio:.3g})) of R whole repetitions (its "
            f"period) are test; a condition of one repetition: its last {1 - ratio:.3g} of timepoints; frames in no "
            "condition: train"
        )
        if val:
            rule += f"; the max(1, round(R x {val:g})) repetitions (or {val:g} of timepoints) before those: validation"
    else:
        split, test_blocks, _ = block_split(len(kept_timepoints), settings.split_block, ratio, settings.seed, val)
        rule = (
            f"blocks: {settings.split_block}-frame blocks shuffled with RandomState({settings.seed}), the first "
            f"max(1, int(blocks x {1 - ratio:.3g})) are test, the rest and leftover frames train"
        )
        if val:
            rule += f"; the next max(1, int(blocks x {val:g})) shuffled blocks: validation"
        if settings.split == "conditions":
            rule += " (--split conditions asked, but the subject has no stimulus conditions)"
    if held is not None:
        in_held = covariates.condition[kept_timepoints] == held
        split[in_held & (split != NO_SPLIT)] = TEST
        rule += f"; every timepoint of condition {covariates.condition_names[held]} is test (--holdout_condition)"
    return split, test_blocks, rule


@dataclass(frozen=True)
class GridPlan:
    """Everything gridding decides before any spike is placed: the grid, kept frames, split."""

    grid: GridSpec
    kept_timepoints: np.ndarray  # (T,) the time base's timepoint of each output row (timepoint_indices)
    row_of_timepoint: np.ndarray  # (timepoints,) output row of each timepoint of the time base, -1 if dropped
    predicted: np.ndarray  # (timepoints,) bool: timepoints CASCADE could predict (every frame they touch)
    is_train: np.ndarray  # (T,) uint8
    test_blocks: np.ndarray
    z_markers: bool
    split_rule: str = ""  # the split in words (recorded as the attribute split_rule)
    timepoint_times_s: np.ndarray | None = None  # (T,) float64 start of each timepoint, seconds
    split: np.ndarray | None = None  # (T,) int8 SPLIT_CODES (is_train is split == 0)


def plan_grid(
    positions, valid, time_base: TimeBase, model: CascadeModel, settings: GridSettings, covariates=None
) -> GridPlan:
    """Kept timepoints (those CASCADE cannot predict, at its edges, are dropped unless --keep_edge_frames), grid
    (the fish's own extent, or the atlas frame with --coordinates registered) and split (plan_split), on the time
    base's timepoints (frames, or bins with --target_rate_hz); ``covariates`` are on the same time base."""
    frames_predicted = np.zeros(time_base.num_frames, dtype=bool)
    frames_predicted[model.frames_before : time_base.num_frames - model.frames_after] = True
    predicted = time_base.predicted(frames_predicted)
    num_timepoints = time_base.num_timepoints
    kept_timepoints = np.arange(num_timepoints) if settings.keep_edge_frames else np.flatnonzero(predicted)
    row_of_timepoint = np.full(num_timepoints, -1, dtype=np.int64)
    row_of_timepoint[kept_timepoints] = np.arange(len(kept_timepoints))
    if settings.coordinates == "registered":
        grid = make_atlas_grid_spec(positions, len(kept_timepoints), settings)
    else:
        grid = make_grid_spec(positions, len(kept_timepoints), *settings.grid_shape, settings.z_markers, valid)
    split, test_blocks, rule = plan_splits(kept_timepoints, covariates or Covariates(), settings)
    times_s, is_train = time_base.times_s()[kept_timepoints], (split == TRAIN).astype(np.uint8)
    return GridPlan(
        grid,
        kept_timepoints,
        row_of_timepoint,
        predicted,
        is_train,
        test_blocks,
        settings.z_markers,
        rule,
        times_s,
        split,
    )


def coo_to_dense_grid(spike_coords: np.ndarray, spike_values=None, grid_shape=None, dtype=np.uint8) -> np.ndarray:
    """Dense (T, Z, H, W) array from COO coordinates (vectorised). Mind the size: T*Z*H*W bytes. The seed's README
    call ``coo_to_dense_grid(spike_coords, spike_values, grid_shape)``; ``spike_values`` None: ones. The 1.2 call
    ``coo_to_dense_grid(spike_coords, grid_shape)`` (two arguments) still works: a lone second argument is the shape."""
    if grid_shape is None:
        spike_values, grid_shape = None, spike_values
    dense = np.zeros(tuple(int(s) for s in grid_shape), dtype=dtype)
    coords = np.asarray(spike_coords, dtype=np.int64)
    dense[tuple(coords.T)] = 1 if spike_values is None else spike_values
    return dense


# =============================================================================================
# 8. Workers: batches of cells -> spikes, across a pool that survives a dead worker
# =============================================================================================
# A worker reads its batch's traces from the subject's file itself and streams them through
# dF/F, CASCADE and spike sampling a chunk of cells at a time, so its memory does not grow with
# --batch_size. It sends back spikes as int32 (frame, cell) events and small per-cell summaries.

CELLS_PER_CHUNK = 1024  # cells streamed through dF/F -> CASCADE -> spikes at once in a worker (~0.2 GB each)
RATE_SUM_SCALE = 2.0**32  # population rate summed in fixed point: exact whatever the batching
PROGRESS_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class InferenceSettings:
    """What a worker needs to turn traces into spikes (the same for every batch of a subject); the
    fields after the first two are named after the options."""

    is_fluorescence: bool
    frame_rate_hz: float
    baseline_window_s: float
    baseline_percentile: float
    cascade_threshold: str  # a name of CASCADE_THRESHOLDS
    spike_mode: str  # a name of SPIKE_MODES
    spike_threshold: float
    seed: int
    target_rate_hz: float | None  # None: spikes on the recording's frames (see TimeBase)
    engine: str  # a key of CASCADE_ENGINES: the parent resolves --engine auto once (choose_engine)


@dataclass(frozen=True)
class BatchTask:
    """One batch of cells [start, stop) of a subject, for a worker."""

    trace_file: TraceFile
    start: int
    stop: int
    cell_ids: np.ndarray  # (B,) ids that key each cell's random stream
    plot_rows: np.ndarray  # subject rows in [start, stop) whose full traces come back for the PDF
    model_folder: str
    model_source: str
    settings: InferenceSettings
    threads: int = 1  # the worker's share of the cores (dF/F and the engine; results never depend on it)
    rates_out: ScratchArray | None = None  # (timepoints, cells) float16: each chunk's rates are written here
    dff_out: ScratchArray | None = None  # (frames, cells) float32: each chunk's dF/F (for --nwb)


@dataclass(frozen=True)
class CellChunk:
    """A chunk of cells inside a worker, from its traces to its spikes: what per-cell fields are made of."""

    traces: np.ndarray  # (B, T) float32 as stored, infinite values made NaN
    infinite_values: np.ndarray  # (B,) int32 infinite values (treated as NaN)
    dff: np.ndarray  # (B, T) float32 the traces as dF/F
    rates: np.ndarray  # (B, T') float64 CASCADE rates on the time base, spikes per timepoint, NaN: no prediction
    noise_level: np.ndarray  # (B,) CASCADE's noise level
    model_noise_level: np.ndarray  # (B,) the model noise level used
    spikes: np.ndarray  # (B, T') bool, on the time base


@dataclass
class CellResults:
    """Per-cell results of the workers, by subject row: those every subject has, read by name by the checks, the
    grid and the files; and the optional ones of CELL_FIELDS (``extra``). cell_activity.h5's cascade/ saves them
    all (re-gridding reads them back); metadata.h5's cells/ has spike_count, noise_level and the in_metadata ones."""

    spike_count: np.ndarray  # (N,) int32 spikes over every timepoint of the time base
    noise_level: np.ndarray  # (N,) float64 CASCADE's noise level of the cell's dF/F
    nan_frames: np.ndarray  # (N,) int32 frames without a value (NaN or infinite)
    infinite_values: np.ndarray  # (N,) int32 infinite values (treated as NaN)
    min_value: np.ndarray  # (N,) float32 smallest value as stored, NaN: no value (fmin skips NaN)
    max_value: np.ndarray  # (N,) float32 largest; = min_value: a constant trace
    extra: dict = dataclasses.field(default_factory=dict)  # CELL_FIELDS name -> (N,) array of its dtype

    @classmethod
    def of_chunk(cls, chunk: CellChunk) -> CellResults:
        traces = chunk.traces
        return cls(
            chunk.spikes.sum(axis=1).astype(np.int32), np.asarray(chunk.noise_level, np.float64),
            np.isnan(traces).sum(axis=1).astype(np.int32), np.asarray(chunk.infinite_values, np.int32),
            np.fmin.reduce(traces, axis=1).astype(np.float32), np.fmax.reduce(traces, axis=1).astype(np.float32),
            {field.name: np.asarray(field.compute(chunk)).astype(field.dtype) for field in CELL_FIELDS},
        )  # fmt: skip

    def arrays(self) -> dict:
        """name -> (N,) array of every result, the required ones and CELL_FIELDS'."""
        required = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**required, **self.extra}

    @classmethod
    def from_arrays(cls, arrays: dict) -> CellResults:
        """The results from arrays(), e.g. read back from cell_activity.h5."""
        required = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        return cls(*(arrays[name] for name in required), {f.name: arrays[f.name] for f in CELL_FIELDS})

    @classmethod
    def names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"] + [f.name for f in CELL_FIELDS]

    @classmethod
    def concatenate(cls, parts: list) -> CellResults:
        return cls.from_arrays({name: np.concatenate([p.arrays()[name] for p in parts]) for name in cls.names()})


@dataclass(frozen=True)
class CellField:
    """An optional per-cell result of the workers: the only place to touch to add one. Workers compute it for
    each chunk, cell_activity.h5 saves it (re-gridding reads it back), metadata.h5 cells/ has it if in_metadata."""

    name: str
    dtype: str
    compute: Callable[[CellChunk], np.ndarray]
    in_metadata: bool = False


CELL_FIELDS = (CellField("model_noise_level", "int64", lambda c: c.model_noise_level, in_metadata=True),)


@dataclass(frozen=True)
class PlotTraces:
    """The PDF's cells (subject rows, ascending) with their dF/F (recording's frames), rates and spikes (time base)."""

    rows: np.ndarray
    dff: np.ndarray  # (n, T) float32
    rates: np.ndarray  # (n, T') float32
    spikes: np.ndarray  # (n, T') bool

    @classmethod
    def concatenate(cls, parts: list) -> PlotTraces:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))


def _sorted_key(major: np.ndarray, minor: np.ndarray, minor_span: int) -> np.ndarray:
    """major * minor_span + minor (int64, made in place, no temporaries) sorted: events in (major, minor) order.
    Stable: timsort merges the runs that events sorted the other way round come in (1.7-3x the default sort)."""
    key = major.astype(np.int64)
    key *= minor_span
    key += minor
    key.sort(kind="stable")
    return key


@dataclass
class BatchResult:
    """A batch's spikes as (timepoint, cell) events sorted by timepoint, and per-cell results (CELL_FIELDS). Its
    rates (and dF/F for --nwb) do not travel back: the worker wrote them to the subject's scratch arrays."""

    start: int
    spike_timepoints: np.ndarray  # (S,) int32 timepoints of the time base, ascending
    spike_cells: np.ndarray  # (S,) int32 subject rows, ascending within a timepoint
    cells: CellResults  # of the batch's cells
    rate_sum_fixed: np.ndarray  # (timepoints,) int64 sum of rates over cells * RATE_SUM_SCALE
    plot: PlotTraces
    seconds: float = 0.0

    @property
    def num_cells(self) -> int:
        return len(self.cells.spike_count)

    @classmethod
    def concatenate(cls, parts: list, seconds: float = 0.0) -> BatchResult:
        """Consecutive parts (ascending cells) as one result, its events in (timepoint, cell) order."""
        cells_span = parts[-1].start + parts[-1].num_cells  # subject rows below this
        key = _sorted_key(np.concatenate([p.spike_timepoints for p in parts]),
                          np.concatenate([p.spike_cells for p in parts]), cells_span)  # fmt: skip
        timepoints, cells = np.empty(len(key), np.int32), np.empty(len(key), np.int32)
        np.divmod(key, cells_span, out=(timepoints, cells), casting="unsafe")  # in place: half argsort's memory
        per_cell = CellResults.concatenate([p.cells for p in parts])
        rate_sum_fixed = sum(p.rate_sum_fixed for p in parts)
        plot = PlotTraces.concatenate([p.plot for p in parts])
        return cls(parts[0].start, timepoints, cells, per_cell, rate_sum_fixed, plot, seconds)


@dataclass(frozen=True)
class ScratchArray:
    """A (rows, columns) array in a raw file beside the outputs, for what would otherwise be held whole in memory
    (a whole fish's rates are 720 MB): workers write their cells' columns into it as they finish a chunk (pwrite:
    disjoint regions, any process), the writers read it back a block of rows at a time (preadv into the block).
    Named like a temporary of this run, so that a killed run's scratch is found and removed (remove_stale_temporaries)."""

    path: Path
    shape: tuple  # (rows, columns)
    dtype: str

    @classmethod
    def create(cls, path: Path, shape: tuple, dtype: str) -> ScratchArray:
        with open(path, "wb") as handle:
            handle.truncate(math.prod(shape) * np.dtype(dtype).itemsize)  # sparse: takes disk as it is written
        return cls(path, tuple(int(size) for size in shape), dtype)

    def write_columns(self, first: int, block: np.ndarray) -> None:
        """Columns [first, first + len(block)) from ``block`` (columns, rows), as a chunk of cells is held."""
        rows = np.ascontiguousarray(np.asarray(block, self.dtype).T)  # (rows, columns of the block)
        itemsize, width = rows.itemsize, self.shape[1]
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for row, values in enumerate(rows):
                os.pwrite(fd, values.data, (row * width + first) * itemsize)
        finally:
            os.close(fd)

    def write_rows(self, first: int, block: np.ndarray) -> None:
        """Rows [first, first + len(block)), every column."""
        data = np.ascontiguousarray(np.asarray(block, self.dtype))
        with open(self.path, "r+b") as handle:
            handle.seek(first * self.shape[1] * data.itemsize)
            handle.write(data.data)

    def read_rows(self, first: int, stop: int) -> np.ndarray:
        """(stop - first, columns) rows [first, stop) (stop clamped to the rows there are)."""
        out = np.empty((max(min(stop, self.shape[0]) - first, 0), self.shape[1]), self.dtype)
        view, offset = memoryview(out.reshape(-1).view(np.uint8)), first * self.shape[1] * out.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while len(view):
                done = os.preadv(fd, [view], offset)
                if done <= 0:
                    raise OSError(errno.EIO, f"{self.path} is shorter than expected")
                view, offset = view[done:], offset + done
        finally:
            os.close(fd)
        return out


@dataclass
class ChunkTraces:
    """Cells [start, stop) of a batch as stored and as dF/F: the part of a chunk made on the reading thread."""

    start: int
    stop: int
    traces: np.ndarray  # (B, T) float32 as stored, infinite values made NaN
    infinite_values: np.ndarray  # (B,) int32 infinite values (treated as NaN)
    dff: np.ndarray  # (B, T) float32


def read_chunk(task: BatchTask, start: int, stop: int) -> ChunkTraces:
    """Cells [start, stop) of a batch: traces -> dF/F."""
    settings = task.settings
    traces = task.trace_file.read_raw(start, stop)
    infinite_values = mark_infinite_as_missing(traces)
    dff = traces
    if settings.is_fluorescence:
        window_s, percentile = settings.baseline_window_s, settings.baseline_percentile
        dff = compute_dff(traces, settings.frame_rate_hz, window_s, percentile, threads=task.threads)
    return ChunkTraces(start, stop, traces, infinite_values, dff)


def infer_chunk(task: BatchTask, model: CascadeModel, read: ChunkTraces) -> CellChunk:
    """A chunk's dF/F -> CASCADE rates -> binary spikes."""
    settings = task.settings
    threshold = CASCADE_THRESHOLDS[settings.cascade_threshold]
    # NaN kept where there is no prediction (cell_activity.h5 says so); spikes treat NaN as 0 as CASCADE's cut does
    rates, report = predict_rates_keeping_nan(read.dff, model, threshold)
    time_base = TimeBase(settings.frame_rate_hz, read.traces.shape[1], settings.target_rate_hz)
    rates = time_base.rebin(rates)
    if settings.target_rate_hz is not None:  # discrete spikes: the model's smoothing counted in bins
        model = dataclasses.replace(model, sampling_rate_hz=time_base.rate_hz)
    ids = task.cell_ids[read.start - task.start : read.stop - task.start]
    spikes = SPIKE_MODES[settings.spike_mode].binarize(
        rates, SpikeContext(ids, settings.seed, settings.spike_threshold, model)
    )
    noise = (report["noise_level"], report["model_noise_level"])
    return CellChunk(read.traces, read.infinite_values, read.dff, rates, *noise, spikes)


def chunk_result(task: BatchTask, chunk: CellChunk, start: int) -> BatchResult:
    """What leaves the worker of a chunk of cells from ``start``: spikes as (timepoint, cell) events, the per-cell
    fields, the summed rates and the plotted cells' traces. The rates (and dF/F) go to the scratch arrays."""
    timepoints, cells = np.nonzero(chunk.spikes.T)  # sorted by timepoint, then cell
    per_cell = CellResults.of_chunk(chunk)
    rate_sum_fixed = np.round(np.nan_to_num(chunk.rates) * RATE_SUM_SCALE).astype(np.int64).sum(axis=0)
    local = task.plot_rows[(task.plot_rows >= start) & (task.plot_rows < start + len(chunk.rates))] - start
    plot = PlotTraces(local + start, chunk.dff[local].astype(np.float32), chunk.rates[local].astype(np.float32),
                      chunk.spikes[local])  # fmt: skip
    if task.rates_out is not None:
        task.rates_out.write_columns(start, chunk.rates)
    if task.dff_out is not None:
        task.dff_out.write_columns(start, chunk.dff)
    events = (timepoints.astype(np.int32), (cells + start).astype(np.int32))
    return BatchResult(start, *events, per_cell, rate_sum_fixed, plot)


def process_batch(task: BatchTask) -> BatchResult:
    """One batch, a chunk of cells at a time; only compact results leave the worker. The next chunk is read and
    turned into dF/F on a second thread while CASCADE runs on this one: the network leaves part of the cores idle
    between its layers, and the first read overlaps loading the engine (TensorFlow's import in one process)."""
    started, parts = time.perf_counter(), []
    bounds = [
        (start, min(start + CELLS_PER_CHUNK, task.stop)) for start in range(task.start, task.stop, CELLS_PER_CHUNK)
    ]
    with ThreadPoolExecutor(1) as reader:
        upcoming = reader.submit(read_chunk, task, *bounds[0])
        model = read_model_folder_once(task.model_folder, task.model_source)
        use_engine(task.settings.engine, task.threads)
        for following in [*bounds[1:], None]:
            read = upcoming.result()
            if following:
                upcoming = reader.submit(read_chunk, task, *following)
            parts.append(chunk_result(task, infer_chunk(task, model, read), read.start))
    result = BatchResult.concatenate(parts, seconds=time.perf_counter() - started)
    del parts, read
    release_free_memory()
    return result


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them): an idle worker would otherwise hold its
    last batch's working memory (~1.3 GB for a whole fish's) while the main process grids and writes."""
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):  # no glibc (macOS, musl): nothing to do
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


@dataclass
class SubjectSpikes:
    """A subject's inference results, gathered from its batches in order of their cells: spike events on the time
    base's timepoints, per-cell results, and the scratch arrays that hold the rates (and dF/F) of every cell."""

    batches: list  # BatchResult per batch, ascending cells; each holds its timepoint-sorted events
    num_timepoints: int  # of the time base (the recording's frames without --target_rate_hz)
    num_frames: int  # of the recording
    rates: ScratchArray | None = None  # (timepoints, cells) float16 spikes per timepoint, NaN: no prediction
    dff: ScratchArray | None = None  # (frames, cells) float32 the traces as dF/F, when --nwb asked for them

    @functools.cached_property
    def cells(self) -> CellResults:
        """The per-cell results of every batch, by subject row."""
        return CellResults.concatenate([batch.cells for batch in self.batches])

    @property
    def num_cells(self) -> int:
        return sum(batch.num_cells for batch in self.batches)

    @property
    def valid(self) -> np.ndarray:
        """Cells with at least one value (all-NaN cells are left out of the grid)."""
        return self.cells.nan_frames < self.num_frames

    @property
    def timepoint_counts(self) -> np.ndarray:
        """(timepoints,) spikes per timepoint over all cells."""
        return sum(np.bincount(b.spike_timepoints, minlength=self.num_timepoints) for b in self.batches)

    @property
    def rate_sum(self) -> np.ndarray:
        """(timepoints,) sum of CASCADE rates over cells (spikes per timepoint), identical whatever the batching."""
        return sum(b.rate_sum_fixed for b in self.batches) / RATE_SUM_SCALE

    def _events(self, span: tuple = (), rows: np.ndarray | None = None) -> Iterator[tuple]:
        """Per batch, (cells, timepoints) of its spikes in timepoints [first, stop), or of the given cells (rows)."""
        for batch in self.batches:
            if rows is None:
                # bounds in the events' own dtype: others make NumPy cast every event first (7 s on a whole fish)
                mine = slice(*np.searchsorted(batch.spike_timepoints, np.asarray(span, batch.spike_timepoints.dtype)))
            else:
                mine = np.isin(batch.spike_cells, rows)
            yield batch.spike_cells[mine], batch.spike_timepoints[mine]

    def events_in_timepoints(self, first: int, stop: int) -> tuple:
        """(cells, timepoints) of every spike in timepoints [first, stop)."""
        return tuple(np.concatenate(parts) for parts in zip(*self._events((first, stop))))

    def spikes_per_cell(self, first: int, stop: int) -> np.ndarray:
        """(cells,) spikes of each cell in timepoints [first, stop), without gathering the events."""
        counts = np.zeros(self.num_cells, dtype=np.int64)
        return sum((np.bincount(cells, minlength=self.num_cells) for cells, _ in self._events((first, stop))), counts)

    def events_of_cells(self, rows: np.ndarray) -> tuple:
        """(cells, timepoints) of every spike of the given cells."""
        return tuple(np.concatenate(parts) for parts in zip(*self._events(rows=rows)))

    def rates_at(self, timepoints: np.ndarray) -> np.ndarray:
        """(len(timepoints), cells) float16 rates of every cell at the given ascending timepoints: rows of
        cell_activity.h5, read from the scratch array (one read of the span they cover)."""
        timepoints = np.asarray(timepoints, np.int64)
        if not len(timepoints):
            return np.zeros((0, self.num_cells), np.float16)
        first = int(timepoints[0])
        block = self.rates.read_rows(first, int(timepoints[-1]) + 1)
        return block if len(block) == len(timepoints) else block[timepoints - first]

    def plot_traces(self) -> PlotTraces:
        """The cells whose traces the workers sent back for the PDF."""
        return PlotTraces.concatenate([batch.plot for batch in self.batches])


def coo_blocks(spikes: SubjectSpikes, plan: GridPlan) -> Iterator[tuple]:
    """build_coo over consecutive blocks of timepoints: yields (coords, counts) in sorted order."""
    bounds, budget = [0], 0
    for t, count in enumerate(spikes.timepoint_counts[plan.kept_timepoints]):
        if budget + count > SPIKES_PER_GRID_BLOCK and t > bounds[-1]:
            bounds.append(t)
            budget = 0
        budget += count
    bounds.append(len(plan.kept_timepoints))
    for t0, t1 in itertools.pairwise(bounds):
        if t1 > t0:
            cells, frames = spikes.events_in_timepoints(plan.kept_timepoints[t0], plan.kept_timepoints[t1 - 1] + 1)
            yield build_coo(cells, frames, plan.grid, plan.row_of_timepoint, plan.z_markers, range(t0, t1))


class Progress:
    """A tqdm bar on a terminal; elsewhere (SLURM and cron logs) a log line per finished batch,
    at most one a minute: batches done, neuron-frames/s, time left and memory. Time left: all batches at
    the workers' own pace per batch, ``workers`` at a time, less the time spent (batches run side by side)."""

    def __init__(self, subject: str, num_batches: int, num_frames: int, workers: int):
        self.subject, self.num_batches, self.num_frames, self.workers = subject, num_batches, num_frames, workers
        self.done_batches = self.done_cells = 0
        self.batch_seconds = 0.0
        self.started = self.last_log = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=num_batches, desc=f"{subject} CASCADE", unit="batch", leave=False)

    def advance(self, result: BatchResult) -> None:
        self.done_batches += 1
        self.done_cells += result.num_cells
        self.batch_seconds += result.seconds
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update()
        elif now - self.last_log >= PROGRESS_LOG_INTERVAL_S and self.done_batches < self.num_batches:
            self.last_log = now
            rate = self.done_cells * self.num_frames / max(now - self.started, 1e-9)
            per_batch_s = self.batch_seconds / self.done_batches
            total_s = self.num_batches * per_batch_s / min(self.workers, self.num_batches)  # batches in parallel
            left_s = max(0.0, total_s - (now - self.started))
            log.info(
                f"{self.subject}: CASCADE {self.done_batches}/{self.num_batches} batches, {rate:.0f} "
                f"neuron-frames/s, about {left_s / 60:.0f} min left, RSS {rss_gb():.2f} GB"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def available_cpus() -> int:
    """CPUs this process may use (respects SLURM/cgroup affinity where the OS reports it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def child_processes_deaf():
    """Processes started in the block (workers, the fork server) inherit SIGTERM and SIGINT blocked: a Ctrl-C or
    SLURM's SIGTERM reaching the whole process group never kills one half way (a fork server gone, multiprocessing
    takes its workers for dead and can no longer stop them) nor prints its traceback; the main process stops them
    itself (end_child_processes)."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # first: starting the tracker (which ignores them) unblocks the signals
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def end_child_processes() -> None:
    """Kill this run's processes at once (workers, the fork server, a worker it was forking) when it stops. The
    resource tracker is left: it exits by itself once they and this process are gone (killed, multiprocessing
    would start it again with a warning)."""
    from multiprocessing import resource_tracker

    import psutil

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    children = [child for child in psutil.Process().children(recursive=True) if child.pid != tracker]
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _init_worker(log_level: int) -> None:
    # The parent stops the workers itself: they start with the signals blocked (child_processes_deaf), and ignore
    # them too, should a pool be started without that
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [worker] %(message)s")


class WorkerDied(PipelineError):
    """A worker process died (killed by the OOM killer, a signal, or a crash) during a batch."""


def _worker_context():
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__"])  # runs the TensorFlow import at the end of this file
    return context


PRELOAD_TENSORFLOW_ENV = "SPIKE_GRIDS_PRELOAD_TENSORFLOW"  # "0": the run's engine needs no TensorFlow


def start_fork_server(preload_tensorflow: bool = True) -> None:
    """Start the fork server now, in the background, with its TensorFlow import if the engine needs it (see
    WorkerPool); the setting travels in the environment, the only thing a fork server inherits."""
    if _worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        os.environ[PRELOAD_TENSORFLOW_ENV] = "1" if preload_tensorflow else "0"
        with child_processes_deaf():
            forkserver.ensure_running()


class WorkerPool:
    """Worker processes for CASCADE (or the calling process when there is one worker).

    Built on concurrent.futures' ProcessPoolExecutor, which reports a worker that died instead of
    waiting for it forever (multiprocessing.Pool hangs); the pool is then rebuilt for the next subject.
    The parent may hold threads and must not fork, and a fresh interpreter spends ~3 s importing
    TensorFlow; so where the OS allows, workers are forked by multiprocessing's fork server, which
    imports this script and TensorFlow (touching no device) once: workers start in milliseconds.
    Elsewhere they are spawned."""

    def __init__(self, workers: int):
        self.workers = workers
        self.threads_per_worker = max(1, available_cpus() // workers)
        self._executor = None
        self._processes: dict = {}  # kept to tell how a worker died once the executor forgets them

    def close(self, kill: bool = False) -> None:
        """Stop the workers; ``kill`` ends them at once (interrupts, dead pools)."""
        executor, self._executor, self._processes = self._executor, None, {}
        processes = list((getattr(executor, "_processes", None) or {}).values())
        # a worker that died while the pool was idle leaves the executor waiting forever for the others at
        # shutdown (they ignore SIGTERM, see _init_worker): end them too
        kill = kill or any(not process.is_alive() for process in processes)
        if kill:
            for process in processes:
                with contextlib.suppress(Exception):
                    process.kill()
        if executor is not None:
            executor.shutdown(wait=not kill, cancel_futures=True)

    def map(self, tasks: Iterator[BatchTask], progress: Progress) -> list:
        """Results of every task in order; at most workers + 1 tasks in flight."""
        if self.workers == 1:
            results = []
            for task in tasks:
                results.append(process_batch(task))
                progress.advance(results[-1])
            return results
        from collections import deque
        from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor

        if self._executor is None:
            initargs = (logging.getLogger().level,)
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=_worker_context(), initializer=_init_worker, initargs=initargs
            )
        pending, results = deque(), []
        try:
            for task in itertools.chain(tasks, [None]):
                if task is not None:
                    with child_processes_deaf():  # submit starts the workers (and the fork server) on demand
                        pending.append((task, self._executor.submit(process_batch, task)))
                        self._processes.update(self._executor._processes or {})
                while pending and (len(pending) > self.workers or task is None):
                    results.append(pending.popleft()[1].result())
                    progress.advance(results[-1])
        except BrokenProcessPool:
            cause = self._death_cause()
            self.close(kill=True)
            raise WorkerDied(
                f"a worker process died during CASCADE inference ({cause}); this is most often the "
                f"out-of-memory killer: use fewer --workers (now {self.workers}) or a smaller "
                "--batch_size, or ask the scheduler for more memory"
            ) from None
        return results

    def _death_cause(self) -> str:
        deadline = time.monotonic() + 2.0  # the dead worker may not be reaped yet: poll its exit code
        while not (codes := [p.exitcode for p in self._processes.values() if p.exitcode not in (None, 0)]):
            if time.monotonic() > deadline:
                return "exit status unknown"
            time.sleep(0.05)
        time.sleep(0.2)  # the other workers, stopped by the broken pool, exit too: the killed one is the cause
        codes = [p.exitcode for p in self._processes.values() if p.exitcode not in (None, 0)]
        codes.sort(key=lambda code: (code != -signal.SIGKILL, code >= 0))  # the OOM killer's SIGKILL first
        signal_names = {-number: number.name for number in signal.Signals}
        return f"killed by {signal_names[codes[0]]}" if codes[0] in signal_names else f"exit status {codes[0]}"


def rss_gb() -> float:
    """Resident memory of this process and its workers, in GB."""
    import psutil

    process = psutil.Process()
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total / 1e9


# =============================================================================================
# 9. Outputs: the files' writers, the finished record and the table of a subject's outputs (SUBJECT_OUTPUTS);
# combined metadata; readers
# =============================================================================================
# Every file is built in memory (or, too large for that, through a Python file object), written to a
# temporary name in its final folder and renamed into place: a crash, a kill or a full disk never leaves half
# a file under a final name, and a failed write is one plain OSError (HDF5 left holding a file whose writes
# fail prints errors at every garbage collection and can crash the interpreter at exit). A subject's
# metadata is its commit record: it is removed before and renamed last after the other files, so
# the presence of metadata.h5 with a matching run id means the subject's set of files is complete.

COO_FILENAME = "preaugmented_grids_coo.h5"
METADATA_FILENAME = "metadata.h5"
COMBINED_FILENAME = "combined_metadata.h5"
CELL_ACTIVITY_FILENAME = "cell_activity.h5"  # per-cell rates for models; CASCADE's results for re-gridding
CELL_RATE_CHUNK_TIMEPOINTS = 16  # spike_rates chunks: 16 timepoints x every cell, stored unfiltered: real rates
# compress by 18 % only, and inflating them made a 48-timepoint window 63-76 ms against ~1 ms read raw (issue 26,
# benchmarks/RESULTS_pipeline.md); files of 1.2 (gzip) are still read, through HDF5
CELL_RATE_BLOCK_TIMEPOINTS = 256  # timepoints written or read at a time (~46 MB of float16 for 90k cells)
COO_BYTES_PER_ENTRY = 4 * 4 + 1  # four int32 coordinates + one uint8 value
COO_CHUNK_ROWS = 1 << 16  # row chunks: a window of timepoints reads only its own chunks
TEMPORARY_MARKER = ".tmp-"
# every compressed dataset; level 1: 1.6x faster to write than 4 for 2-5 % larger files (benchmarks/RESULTS_pipeline.md)
GZIP = dict(compression="gzip", compression_opts=1, shuffle=True)
RATE_UNIT = "expected spikes per timepoint"  # CASCADE's rates on the time base (timepoint_rate_hz says its rate)


def cell_global_ids(subject_name: str, cell_ids) -> np.ndarray:
    """(N,) int64 ids unique across subjects and stable across reruns: blake2b of "<subject>:<cell id>" (8 bytes,
    little-endian) with the sign bit cleared, so they are non-negative int64 (the seed project drew random ones)."""
    digests = (hashlib.blake2b(f"{subject_name}:{int(cell)}".encode(), digest_size=8).digest() for cell in cell_ids)
    ids = np.fromiter((int.from_bytes(d, "little") & (2**63 - 1) for d in digests), np.int64, len(cell_ids))
    return ids


def plan_split_codes(plan) -> np.ndarray:
    """A GridPlan's split codes (T,) int8; a plan made without them (is_train only): train or test."""
    return plan.split if plan.split is not None else np.where(plan.is_train == 1, TRAIN, TEST).astype(np.int8)


class WriteFailed(PipelineError):
    """Writing an output failed (full disk, quota, permissions): the run stops cleanly."""


def pdf_filename(subject_name: str) -> str:
    return f"{subject_name}_visualization.pdf"


def temporary_path(final: Path) -> Path:
    """A hidden sibling of ``final`` naming this host and process (to find leftovers of dead runs)."""
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return final.with_name(f".{final.name}{TEMPORARY_MARKER}{owner}")


class _QuietFailingFile:
    """A file that h5py writes through, which keeps the first failed write (a full disk) to itself and lets HDF5
    finish, so that the failure reaches us once, as a plain OSError, after HDF5 has let go of the file (see above);
    the file is a temporary, discarded then."""

    def __init__(self, path: Path):
        self.handle, self.error = open(path, "w+b", buffering=0), None  # unbuffered: a write fails at once

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self.handle.write(data)
            except OSError as exc:
                self.error = exc
        return memoryview(data).nbytes

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.handle.truncate(size)
            except OSError as exc:
                self.error = exc
        return size or 0

    def __getattr__(self, name: str):  # read, seek, tell, flush
        return getattr(self.handle, name)


@contextlib.contextmanager
def new_h5_file(path: Path, in_memory: bool = True, **h5_options):
    """A new HDF5 file, built in memory and written to ``path`` when the block ends (see above); or, for a file
    too large to hold (``in_memory`` False), built in ``path`` itself through a _QuietFailingFile. ``h5_options``
    go to h5py.File (e.g. libver)."""
    if not in_memory:
        target = _QuietFailingFile(path)
        try:
            with h5py.File(target, "w", **h5_options) as h5:
                yield h5
        finally:
            target.handle.close()
        if target.error is not None:
            raise target.error
        return
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", **h5_options) as h5:
        yield h5
    write_file(path, buffer)


def write_file(path: Path, buffer: io.BytesIO) -> None:
    """A file built in memory (HDF5, or a PDF and its zlib streams), written with one Python write."""
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def _set_attrs(h5, attrs: dict) -> None:
    for key, value in attrs.items():
        h5.attrs[key] = h5_attr_value(value)


def _write_datasets(h5, **datasets) -> None:
    for name, data in datasets.items():
        data = np.asarray(data)
        h5.create_dataset(name, data=data, **(GZIP if data.size > 0 and data.ndim > 0 else {}))


COVARIATES_GROUP = "covariates"


def write_covariates(h5, covariates: Covariates, timepoints: np.ndarray) -> None:
    """The covariates/ group of an output file, aligned to its rows: row t of each dataset is the time base's
    timepoint ``timepoints[t]`` (timepoint_indices; bins of --target_rate_hz: see TimeBase), so ``covariates`` must be
    on the time base (clock "timepoints"). stimulus (T,), condition (T,) int16 (-1: in no condition; attributes
    condition_names, condition_periods), behavior (T, 5), eye (T, 2) and the generic layout's own covariates;
    attribute stimulus_sets (JSON, Chen's stimset). Nothing is written for a subject without covariates."""
    if covariates.clock != "timepoints" and covariates.arrays():
        raise ValueError("covariates must be resampled to the time base (TimeBase.resample_covariates) first")
    arrays = covariates.at(timepoints)
    if not arrays:
        return
    group = h5.create_group(COVARIATES_GROUP)
    _write_datasets(group, **arrays)
    if "condition" in arrays:
        names = np.array(covariates.condition_names, dtype=h5py.string_dtype())
        group["condition"].attrs["condition_names"] = names
        periods = np.asarray(covariates.condition_periods)  # frames, or bins (fractional) with --target_rate_hz
        group["condition"].attrs["condition_periods"] = (
            periods if periods.dtype.kind == "f" else periods.astype(np.int64)
        )
    if covariates.stimulus_sets:
        group.attrs["stimulus_sets"] = json.dumps(dict(covariates.stimulus_sets))


def read_covariates(path, start: int = 0, stop: int | None = None) -> dict:
    """The covariates/ group of an output file at timepoints [start, stop), name -> array, plus
    'condition_names' (a list) when there are conditions; empty when the file has none."""
    with h5py.File(path, "r") as h5:
        group = h5.get(COVARIATES_GROUP)
        if group is None:
            return {}
        found = {name: group[name][start:stop] for name in group}
        if "condition" in group:
            found["condition_names"] = [_as_text(name) for name in group["condition"].attrs["condition_names"]]
    return found


def write_coo_file(
    path: Path | io.BytesIO, blocks: Iterable[tuple], plan: GridPlan, attrs: dict, covariates=None
) -> tuple:
    """Stream COO blocks (coords, counts) into ``path`` (or a buffer); returns (CooCounts, per-plane entries). Datasets:
    spike_coords (E, 4) int32 [t, z, x, y] sorted, spike_values (E,) uint8 ones, timepoint_offsets (T+1,) int64
    (entries of timepoint t are rows offsets[t]:offsets[t+1]), spike_zxy (3, E) the z, x, y of spike_coords again,
    unfiltered (what window readers read), grid_shape, timepoint_indices (time-base timepoint of each t), is_train,
    and the subject's Covariates at those timepoints (write_covariates)."""
    grid, counts = plan.grid, CooCounts()
    plane_entries, per_timepoint = np.zeros(grid.num_z_planes, np.int64), np.zeros(grid.num_timepoints, np.int64)
    with h5py.File(path, "w") if isinstance(path, io.BytesIO) else new_h5_file(path) as h5:
        out = h5.create_dataset("spike_coords", (0, 4), "<i4", maxshape=(None, 4), chunks=(COO_CHUNK_ROWS, 1), **GZIP)
        appender = ChunkAppender(out, available_cpus())
        zxy = h5.create_dataset("spike_zxy", (3, 0), zxy_dtype(grid.shape), maxshape=(3, None),
                                chunks=(1, COO_CHUNK_ROWS))  # fmt: skip
        for coords, block_counts in blocks:
            counts += block_counts
            appender.append(coords)
            zxy.resize(zxy.shape[1] + len(coords), axis=1)
            zxy[:, zxy.shape[1] - len(coords) :] = coords[:, 1:].T
            plane_entries += np.bincount(coords[:, 1], minlength=grid.num_z_planes)
            per_timepoint += np.bincount(coords[:, 0], minlength=grid.num_timepoints)
        appender.close()
        if len(out):
            chunks = (min(COO_CHUNK_ROWS, len(out)),)
            values = h5.create_dataset("spike_values", (len(out),), np.uint8, chunks=chunks, **GZIP)
            write_chunks(values, 0, np.ones(len(out), np.uint8), available_cpus())
        else:
            h5.create_dataset("spike_values", data=np.ones(0, np.uint8))
        _write_datasets(h5, timepoint_offsets=np.concatenate([[0], np.cumsum(per_timepoint)]).astype(np.int64))
        h5.create_dataset("grid_shape", data=np.asarray(grid.shape, dtype=np.int32))
        _write_datasets(
            h5,
            timepoint_indices=plan.kept_timepoints.astype(np.int32),
            is_train=plan.is_train.astype(np.uint8),
            split=plan_split_codes(plan),
        )
        if plan.timepoint_times_s is not None:
            _write_datasets(h5, timepoint_times_s=plan.timepoint_times_s)
        write_covariates(h5, covariates or Covariates(), plan.kept_timepoints)
        _set_attrs(h5, {**attrs, **coo_attrs(counts, len(out), grid)})
    return counts, plane_entries


def zxy_dtype(grid_shape: tuple) -> np.dtype:
    """spike_zxy's type: the smallest unsigned integer that holds every z, x and y of the grid (uint8 for the
    default 256 x 128 planes)."""
    return np.min_scalar_type(max(1, *grid_shape[1:]) - 1)


def coo_attrs(counts: CooCounts, num_entries: int, grid: GridSpec) -> dict:
    """The counts every COO and metadata file records (total_spikes: every entry, markers included)."""
    num_voxels = int(np.prod(grid.shape, dtype=np.int64))
    totals = {"total_spikes": num_entries, "total_pixels": num_voxels}
    return {**totals, "sparsity_percent": 100.0 * num_entries / max(num_voxels, 1), **dataclasses.asdict(counts)}


PLOT_DATASETS = ("plot_rows", "plot_dff", "plot_rates", "plot_spikes")  # PlotTraces' fields, in order
CASCADE_GROUP = "cascade"  # cell_activity.h5's group of what re-gridding needs besides the rates
CASCADE_DATASETS = ("cell_offsets", "spike_frames", "rate_sum_fixed", *PLOT_DATASETS)


def _deflated_chunk(chunk: np.ndarray) -> bytes:
    """A chunk as HDF5's shuffle then deflate filters store it (byte planes, then a zlib stream)."""
    planes = np.frombuffer(np.ascontiguousarray(chunk).tobytes(), np.uint8).reshape(-1, chunk.itemsize).T
    return zlib.compress(planes.tobytes(), GZIP["compression_opts"])


def write_chunks(dataset, first: int, rows: np.ndarray, threads: int) -> None:
    """dataset[first : first + len(rows)] = rows, for a GZIP dataset with ``first`` a multiple of its chunks' rows:
    every chunk is compressed here on ``threads`` threads (zlib lets go of the GIL; HDF5's own filters run on one)
    and stored as it is, the same bytes HDF5 would store (edge chunks zero-padded, as HDF5 fills them)."""
    shape = dataset.chunks
    corners = list(itertools.product(*(range(0, length, size) for length, size in zip(rows.shape, shape))))

    def deflated(corner: tuple) -> bytes:
        piece = rows[tuple(slice(at, at + size) for at, size in zip(corner, shape))]
        if piece.shape != shape:
            piece = np.pad(piece, [(0, size - got) for size, got in zip(shape, piece.shape)])
        return _deflated_chunk(piece)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for corner, data in zip(corners, pool.map(deflated, corners)):
            dataset.id.write_direct_chunk((first + corner[0], *corner[1:]), data)


class ChunkAppender:
    """Rows appended to a resizable GZIP dataset (rows chunked by R): whole chunks are written as they fill,
    compressed on ``threads`` threads (write_chunks); the rest waits for more rows or for close()."""

    def __init__(self, dataset, threads: int):
        self.dataset, self.threads, self.rows, self.held = dataset, threads, len(dataset), []

    def append(self, rows: np.ndarray) -> None:
        self.held.append(rows)
        held = sum(map(len, self.held))
        if held >= self.dataset.chunks[0]:
            self._write(held - held % self.dataset.chunks[0])

    def close(self) -> None:
        self._write(sum(map(len, self.held)))

    def _write(self, count: int) -> None:
        if count:
            rows = np.concatenate(self.held) if len(self.held) > 1 else self.held[0]
            self.held = [rows[count:]]
            self.dataset.resize(self.rows + count, axis=0)
            write_chunks(self.dataset, self.rows, rows[:count], self.threads)
            self.rows += count


def _write_cell_rates(h5, spikes: SubjectSpikes, rows: np.ndarray) -> None:
    """spike_rates (T, N) float16, row t the time base's timepoint rows[t], written a block of timepoints at a time
    from the rates' scratch array: memory holds one block, never the fish."""
    shape = (len(rows), spikes.num_cells)
    if not min(shape):
        h5.create_dataset("spike_rates", shape, np.float16)
        return
    chunks = (min(CELL_RATE_CHUNK_TIMEPOINTS, shape[0]), shape[1])
    out = h5.create_dataset("spike_rates", shape, np.float16, chunks=chunks)  # unfiltered: read at copy speed
    for first in range(0, shape[0], CELL_RATE_BLOCK_TIMEPOINTS):  # a multiple of the chunks' rows
        block = spikes.rates_at(rows[first : first + CELL_RATE_BLOCK_TIMEPOINTS])
        out[first : first + len(block)] = block


def _write_cascade_group(group, spikes: SubjectSpikes) -> None:
    """CASCADE's results besides the rates: spikes per cell (CSR: cell i's timepoints of the time base are
    spike_frames[cell_offsets[i]:cell_offsets[i+1]]), every per-cell result, the summed rates and the PDF's cells."""
    frames_out = group.create_dataset("spike_frames", (0,), np.int32, maxshape=(None,), chunks=(1 << 16,), **GZIP)
    appender, offsets = ChunkAppender(frames_out, available_cpus()), [np.zeros(1, np.int64)]
    for batch in spikes.batches:
        per_cell = np.bincount(batch.spike_cells - batch.start, minlength=batch.num_cells)
        offsets.append(offsets[-1][-1] + np.cumsum(per_cell))
        by_cell = _sorted_key(batch.spike_cells - batch.start, batch.spike_timepoints, spikes.num_timepoints)
        appender.append(np.remainder(by_cell, spikes.num_timepoints, out=by_cell).astype(np.int32))
    appender.close()
    rate_sum_fixed = sum(batch.rate_sum_fixed for batch in spikes.batches)
    cells = spikes.cells.arrays()
    plot = dict(zip(PLOT_DATASETS, dataclasses.astuple(spikes.plot_traces())))
    _write_datasets(group, cell_offsets=np.concatenate(offsets), rate_sum_fixed=rate_sum_fixed, **cells, **plot)


def write_cell_activity(path: Path, spikes: SubjectSpikes, plan: GridPlan, subject: SubjectData, attrs: dict,
                        covariates: Covariates) -> None:  # fmt: skip
    """cell_activity.h5 (schema in the README): per-cell CASCADE rates on the grid's timepoints with the cells'
    positions and ids and the split, for models that read neurons; and in cascade/ the rest of CASCADE's results,
    which a later run that changes only grid parameters re-grids (read_cell_activity) instead of running CASCADE."""
    with new_h5_file(path, in_memory=False) as h5:  # a whole fish's is ~600 MB: built on disk, not in memory
        _write_cell_rates(h5, spikes, plan.kept_timepoints)
        positions = {"positions": subject.raw_positions, "positions_registered": subject.registered_positions}
        _write_datasets(
            h5, **{name: value for name, value in positions.items() if value is not None}, cell_ids=subject.cell_ids,
            timepoint_indices=plan.kept_timepoints.astype(np.int32), timepoint_times_s=plan.timepoint_times_s,
            is_train=plan.is_train.astype(np.uint8), split=plan_split_codes(plan),
            cell_global_ids=cell_global_ids(subject.name, subject.cell_ids),
        )  # fmt: skip
        h5["spike_rates"].attrs["unit"] = RATE_UNIT
        write_covariates(h5, covariates, plan.kept_timepoints)
        _write_cascade_group(h5.create_group(CASCADE_GROUP), spikes)
        _set_attrs(h5, {**attrs, "cascade_fingerprint": cascade_fingerprint(attrs["fingerprint"])})


def read_cell_activity(path: Path, fingerprint: dict, rates_path: Path | None = None) -> tuple | None:
    """(SubjectSpikes, TraceType) from a cell_activity.h5 made with the same inputs, dF/F and CASCADE settings
    and model as ``fingerprint`` says; None if absent, unreadable or different. The rates go to a scratch array at
    ``rates_path`` (None: not needed), a block of timepoints at a time; those of the time base's timepoints that
    were not grid timepoints are NaN: those are exactly CASCADE's edges, which have no prediction."""
    attrs = read_attrs(path)
    if attrs is None or json.loads(attrs.get("cascade_fingerprint", "{}")) != cascade_fingerprint(fingerprint):
        return None
    names = CellResults.names()
    with h5py.File(path, "r") as h5:
        group = h5.get(CASCADE_GROUP)
        if group is None or "spike_rates" not in h5 or any(key not in group for key in (*CASCADE_DATASETS, *names)):
            return None  # made by an earlier development version: compute afresh
        offsets, timepoints, rate_sum_fixed = (group[key][()] for key in CASCADE_DATASETS[:3])
        cells = CellResults.from_arrays({name: group[name][()] for name in names})
        plot = PlotTraces(*(group[key][()] for key in PLOT_DATASETS))
        rates = None if rates_path is None else _saved_rates(h5, rates_path, len(rate_sum_fixed))
    num_cells = len(offsets) - 1
    cell_rows = np.repeat(np.arange(num_cells, dtype=np.int32), np.diff(offsets))
    by_timepoint = _sorted_key(timepoints, cell_rows, num_cells)  # (timepoint, cell) order, as the workers send them
    timepoints, cell_rows = np.empty(len(by_timepoint), np.int32), np.empty(len(by_timepoint), np.int32)
    np.divmod(by_timepoint, num_cells, out=(timepoints, cell_rows), casting="unsafe")
    batch = BatchResult(0, timepoints, cell_rows, cells, rate_sum_fixed, plot)
    trace_type = TraceType(str(attrs["trace_type"]), str(attrs["trace_type_reason"]))
    return SubjectSpikes([batch], len(rate_sum_fixed), int(attrs["num_original_frames"]), rates), trace_type


def _saved_rates(h5, path: Path, num_timepoints: int) -> ScratchArray:
    """cell_activity.h5's spike_rates back on every timepoint of the time base (NaN where it has no row)."""
    rows, stored = h5["timepoint_indices"][()].astype(np.int64), h5["spike_rates"]
    rates = ScratchArray.create(path, (num_timepoints, stored.shape[1]), "float16")
    for first in range(0, num_timepoints, CELL_RATE_BLOCK_TIMEPOINTS):
        stop = min(first + CELL_RATE_BLOCK_TIMEPOINTS, num_timepoints)
        block = np.full((stop - first, stored.shape[1]), np.nan, np.float16)
        lo, hi = np.searchsorted(rows, [first, stop])
        if hi > lo:
            block[rows[lo:hi] - first] = stored[lo:hi]
        rates.write_rows(first, block)
    return rates


def write_metadata_file(path: Path, attrs: dict, datasets: dict, cells: dict, covariates=None, frames=()) -> None:
    """metadata.h5: attributes, per-timepoint datasets, cells/ and the covariates at ``frames`` (timepoint_indices)."""
    with new_h5_file(path) as h5:
        _set_attrs(h5, attrs)
        _write_datasets(h5, **datasets)
        if "population_rate_hz" in h5:
            h5["population_rate_hz"].attrs["unit"] = "expected spikes per second (Hz), mean per valid cell"
        _write_datasets(h5.create_group("cells"), **cells)
        write_covariates(h5, covariates or Covariates(), np.asarray(frames, np.int64))


def read_attrs(path: Path) -> dict | None:
    """A file's HDF5 attributes, or None when it is absent or unreadable."""
    with contextlib.suppress(OSError, KeyError), h5py.File(path, "r") as h5:
        return {key: h5.attrs[key] for key in h5.attrs}
    return None


def write_combined_metadata(output_dir: Path, subject_dirs: list, excluded: dict) -> dict:
    """combined_metadata.h5: one group per subject (a copy of its metadata.h5), totals, and the
    subject folders left out with the reason (attribute `excluded`)."""
    totals = {"total_subjects": 0, "total_spikes": 0, "total_pixels": 0}
    temporary = temporary_path(output_dir / COMBINED_FILENAME)
    try:
        with new_h5_file(temporary) as combined:
            for subject_dir in subject_dirs:
                with h5py.File(subject_dir / METADATA_FILENAME, "r") as source:
                    source.copy(source["/"], combined, name=subject_dir.name)
                    # the original's combine step stored each subject's total_spikes as a dataset
                    combined[subject_dir.name].create_dataset(
                        "total_spikes", data=np.int64(source.attrs["total_spikes"])
                    )
                    totals["total_subjects"] += 1
                    totals["total_spikes"] += int(source.attrs["total_spikes"])
                    totals["total_pixels"] += int(source.attrs["total_pixels"])
            totals["overall_sparsity_percent"] = 100.0 * totals["total_spikes"] / max(totals["total_pixels"], 1)
            info = dict(format="COO_sparse", software_version=__version__, subjects=[p.name for p in subject_dirs])
            _set_attrs(combined, {**totals, **info, "excluded": excluded})
        os.replace(temporary, output_dir / COMBINED_FILENAME)
    finally:
        remove_quietly(temporary)
    return totals


# --- one subject's files: the finished record, the table of outputs, the commit ---------------------------------


@dataclass(frozen=True)
class GridResult:
    """The COO grid file built in memory, and what building it found (entries, collisions): a stage's result
    before any file is written, which the grid file's writer, metadata.h5 and the PDF all read."""

    counts: CooCounts
    plane_entries: np.ndarray  # (Z,) active voxels per plane
    file: io.BytesIO  # the whole preaugmented_grids_coo.h5

    @property
    def file_bytes(self) -> int:
        return self.file.getbuffer().nbytes


@dataclass
class SubjectRun:
    """One subject's run, filled in by the stages of process_subject in turn; the writers read it finished."""

    subject: SubjectData
    out_dir: Path
    run_id: str
    params: dict  # param_<name> of every option, as every file records them
    timings: dict = dataclasses.field(default_factory=dict)  # seconds per stage (load_s, inference_s, grid_s)
    time_base: TimeBase | None = None  # filled by the stages in this order
    model: CascadeModel | None = None
    fingerprint: dict | None = None
    trace_type: TraceType | None = None
    inference: InferenceSettings | None = None  # None when CASCADE's saved results were re-gridded
    spikes: SubjectSpikes | None = None
    plan: GridPlan | None = None
    attrs: dict | None = None  # what every output file records (subject_attrs), made once before the grid
    grid: GridResult | None = None

    @property
    def name(self) -> str:
        return self.subject.name

    @functools.cached_property
    def covariates(self) -> Covariates:
        """The subject's covariates per timepoint of the time base (see TimeBase.resample_covariates)."""
        return self.time_base.resample_covariates(self.subject.covariates)

    def population_rate_hz(self) -> np.ndarray:
        """(timepoints,) mean CASCADE rate per valid cell, in Hz."""
        valid_cells = max(int(self.spikes.valid.sum()), 1)
        return self.spikes.rate_sum / valid_cells * self.time_base.rate_hz


def subject_attrs(record: SubjectRun) -> dict:
    """Attributes every output file of the subject records: how it was made."""
    subject, grid = record.subject, record.plan.grid
    return {
        "format": "COO_sparse",
        "subject": subject.name,
        "frame_rate_hz": subject.frame_rate_hz,
        "timepoint_rate_hz": record.time_base.rate_hz,  # --target_rate_hz, or the recording's frame rate
        **dict(zip(("num_timepoints", "num_z_planes", "grid_height", "grid_width"), grid.shape)),
        "grid_shape": grid.shape,
        "num_cells": subject.num_cells,
        "num_valid_cells": int(record.spikes.valid.sum()),
        "num_original_frames": subject.num_frames,
        "trace_type": record.trace_type.kind,
        "trace_type_reason": record.trace_type.reason,
        "layout": subject.layout,
        "source_files": list(subject.source_files),
        "software_version": __version__,
        "coordinate_order": "t,z,x,y",
        "split_rule": record.plan.split_rule,
        "split_codes": json.dumps(SPLIT_CODES),
        "rate_unit": RATE_UNIT,
        # the original's COO attributes: its sampling rate (here the time base's) and its dF/F baseline
        "sampling_rate": record.time_base.rate_hz,
        "window_sec": record.params["param_baseline_window_s"],
        "percentile": record.params["param_baseline_percentile"],
        "warnings": "; ".join(subject.warnings),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_id": record.run_id,
        "fingerprint": record.fingerprint,
        "timings": dict(record.timings),
        "cascade_engine": record.inference.engine if record.inference else "",  # "": saved results re-gridded
        **record.model.provenance(),
        **record.params,
    }


def build_grid(record: SubjectRun, safe_points: Callable[[Iterable], Iterable] = iter) -> GridResult:
    """Stage: the COO grid file, built in memory block by block (``safe_points`` may stop between blocks)."""
    buffer = io.BytesIO()
    blocks = safe_points(coo_blocks(record.spikes, record.plan))
    counts, plane_entries = write_coo_file(buffer, blocks, record.plan, record.attrs, record.covariates)
    return GridResult(counts, plane_entries, buffer)


@dataclass(frozen=True)
class PlotSettings:
    """What the PDF takes from the command line (fields named after the options)."""

    plots: bool
    num_neurons: int  # cells whose traces are drawn (the first of plot_candidates)
    seed: int
    spike_mode: str  # named on the pages
    cascade_threshold: str


@dataclass(frozen=True)
class CellActivitySettings:
    """What cell_activity.h5's writer takes from the command line (fields named after the options)."""

    cell_activity: bool


@dataclass(frozen=True)
class NwbSettings:
    """What the NWB writer takes from the command line (fields named after the options)."""

    nwb: bool
    nwb_subject_id: str | None
    nwb_species: str | None
    nwb_experimenter: tuple
    cascade_threshold: str


def write_cell_activity_file(path: Path, record: SubjectRun, _settings: CellActivitySettings) -> Path:
    write_cell_activity(path, record.spikes, record.plan, record.subject, record.attrs, record.covariates)
    return path


def write_grid_file(path: Path, record: SubjectRun, _settings: None) -> Path:
    write_file(path, record.grid.file)
    return path


def write_pdf_file(path: Path, record: SubjectRun, settings: PlotSettings) -> Path:
    plot_subject_pdf(path, plot_data(record, settings))
    return path


def write_metadata(path: Path, record: SubjectRun, _settings: None) -> Path:
    """metadata.h5: the subject's attributes, per-timepoint and per-plane arrays, and cells/."""
    grid, plan, built, spikes = record.plan.grid, record.plan, record.grid, record.spikes
    counts = coo_attrs(built.counts, built.plane_entries.sum(), grid)
    attrs = {**record.attrs, **counts, "coo_file_bytes": built.file_bytes, "timings": record.timings, **record.timings}
    plane_voxels = max(grid.num_timepoints * grid.height * grid.width, 1)
    datasets = {
        # the original's scalar datasets (its combine step and the GBM scripts read metadata.h5['num_z_planes'])
        "num_timepoints": np.int64(grid.num_timepoints),
        "num_z_planes": np.int64(grid.num_z_planes),
        "z_values": grid.z_values,
        "is_train": plan.is_train,
        "split": plan_split_codes(plan),
        "validation_timepoints": np.flatnonzero(plan_split_codes(plan) == VALIDATION),
        "train_timepoints": np.flatnonzero(plan.is_train == 1),
        "test_timepoints": np.flatnonzero(plan_split_codes(plan) == TEST),
        "test_blocks": plan.test_blocks,
        "timepoint_indices": plan.kept_timepoints.astype(np.int32),
        "timepoint_times_s": plan.timepoint_times_s,
        "per_plane_active_pixels": built.plane_entries,
        "per_plane_sparsity_percent": 100.0 * built.plane_entries / plane_voxels,
        "population_rate_hz": record.population_rate_hz(),
    }
    cells = {
        "trace_column": np.arange(record.subject.num_cells, dtype=np.int32),
        "cell_id": record.subject.cell_ids,
        "cell_global_id": cell_global_ids(record.subject.name, record.subject.cell_ids),
        "position": record.subject.positions,
        "voxel_zxy": grid.cell_voxels
        if grid.cells_outside is None
        else np.where(grid.cells_outside[:, None], -1, grid.cell_voxels),
        "spike_count": spikes.cells.spike_count,
        "noise_level": spikes.cells.noise_level,
        **{field.name: spikes.cells.extra[field.name] for field in CELL_FIELDS if field.in_metadata},
        "valid": spikes.valid.astype(np.uint8),
    }
    write_metadata_file(path, attrs, datasets, cells, record.covariates, plan.kept_timepoints)
    return path


NWB_FILENAME_SUFFIX = "_cascade.nwb"
NWB_ROWS_PER_BLOCK = 256  # frames or timepoints of every cell handed to pynwb at a time (~90 MB for 90k cells)


class _RowBlocks:
    """A (rows, cells) scratch array for pynwb, handed over NWB_ROWS_PER_BLOCK rows at a time as float32."""

    def __new__(cls, array: ScratchArray):
        from hdmf.data_utils import AbstractDataChunkIterator, DataChunk

        num_rows, num_cells = array.shape

        class Blocks(AbstractDataChunkIterator):
            def __init__(self):
                self.first = 0

            def __iter__(self):
                return self

            def __next__(self):
                if self.first >= num_rows:
                    raise StopIteration
                first, self.first = self.first, min(self.first + NWB_ROWS_PER_BLOCK, num_rows)
                rows = array.read_rows(first, self.first).astype(np.float32)
                return DataChunk(rows, np.s_[first : self.first, :])

            def recommended_chunk_shape(self):
                return None

            def recommended_data_shape(self):
                return (num_rows, num_cells)

            dtype = property(lambda self: np.dtype(np.float32))
            maxshape = property(lambda self: (num_rows, num_cells))

        return Blocks()


def _nwb_cells(nwb, subject: SubjectData):
    """The cells as a plane segmentation, one voxel at each position, made as whole columns (add_roi per cell takes
    minutes for a whole fish)."""
    from hdmf.common import ElementIdentifiers, VectorData, VectorIndex
    from pynwb.ophys import ImageSegmentation, OpticalChannel, PlaneSegmentation

    device = nwb.create_device(name="microscope", description="as recorded in the input")
    plane = nwb.create_imaging_plane(
        name="imaging_plane", optical_channel=OpticalChannel(name="channel", description="unknown", emission_lambda=float("nan")),
        description="the recording's cells, positions as in the input", device=device, excitation_lambda=float("nan"),
        imaging_rate=subject.frame_rate_hz, indicator="unknown", location="unknown",
    )  # fmt: skip
    voxels = np.clip(np.round(subject.positions), 0, None).astype(np.uint32)
    mask_type = np.dtype([("x", np.uint32), ("y", np.uint32), ("z", np.uint32), ("weight", np.float32)])
    masks = np.zeros(subject.num_cells, mask_type)
    masks["x"], masks["y"], masks["z"], masks["weight"] = voxels[:, 0], voxels[:, 1], voxels[:, 2], 1.0
    voxel_mask = VectorData(name="voxel_mask", description="Voxel masks for each ROI", data=masks)
    index = VectorIndex(name="voxel_mask_index", data=np.arange(1, subject.num_cells + 1), target=voxel_mask)
    cells = PlaneSegmentation(
        name="cells", description="one voxel at each cell's position [x, y, z] (rounded)", imaging_plane=plane,
        columns=[voxel_mask, index], colnames=["voxel_mask"], id=ElementIdentifiers(name="id", data=np.arange(subject.num_cells)),
    )  # fmt: skip
    segmentation = ImageSegmentation(name="ImageSegmentation")
    segmentation.add_plane_segmentation(cells)
    return segmentation, cells


def nwb_rate_unit(time_base: TimeBase) -> str:
    """The unit of CASCADE's rates in the NWB file: per frame, or per bin of --target_rate_hz."""
    if time_base.target_rate_hz is None:
        return "expected spikes per frame"
    return f"expected spikes per timepoint (bins of 1/{time_base.rate_hz:g} s)"


def write_nwb_file(path: Path, record: SubjectRun, settings: NwbSettings) -> Path:
    """<subject>_cascade.nwb: the cells (a voxel mask at each position), the input dF/F (DfOverF, on the recording's
    frames at its rate) and CASCADE's rates (RoiResponseSeries 'Deconvolved', on the run's time base at its rate:
    the recording's frames, or bins of --target_rate_hz), from the run's scratch arrays a block of rows at a time."""
    with warnings.catch_warnings():
        # pynwb's notes: on orientation (whole-brain data has more cells than frames), on a region made before its
        # series joins the file, and on the temporary's name (it is renamed to .nwb)
        warnings.simplefilter("ignore", UserWarning)
        _write_nwb(path, record, settings)
    return path


def _write_nwb(path: Path, record: SubjectRun, settings: NwbSettings) -> None:
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.file import Subject
    from pynwb.ophys import DfOverF, RoiResponseSeries

    subject, model, time_base = record.subject, record.model, record.time_base
    created = datetime.datetime.now(datetime.timezone.utc)
    nwb = NWBFile(
        session_description=f"CASCADE spike inference of {subject.name} ({subject.layout} layout)",
        identifier=f"{record.run_id}-{subject.name}", session_start_time=created,
        experimenter=list(settings.nwb_experimenter) or None,
        subject=Subject(subject_id=settings.nwb_subject_id or subject.name, species=settings.nwb_species),
        source_script=f"unified_spike_processing_coo {__version__}", source_script_file_name=Path(__file__).name,
    )  # fmt: skip
    ophys = nwb.create_processing_module(name="ophys", description="calcium traces and CASCADE spike inference")
    segmentation, cells = _nwb_cells(nwb, subject)
    ophys.add(segmentation)
    rois = cells.create_roi_table_region(description="every cell", region=list(range(subject.num_cells)))
    dff = RoiResponseSeries(
        name="dff", data=_RowBlocks(record.spikes.dff), rois=rois, unit="n.a.", rate=subject.frame_rate_hz,
        description=f"dF/F of the input ({record.trace_type.kind}: {record.trace_type.reason})",
    )  # fmt: skip
    ophys.add(DfOverF(name="DfOverF", roi_response_series=dff))
    unit = nwb_rate_unit(time_base)
    ophys.add(RoiResponseSeries(
        name="Deconvolved", data=_RowBlocks(record.spikes.rates), rois=rois, unit=unit, rate=time_base.rate_hz,
        description=f"CASCADE spike inference (model {model.name}, threshold {settings.cascade_threshold}): {unit}, "
        "NaN where CASCADE predicts nothing",
    ))  # fmt: skip
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


@dataclass(frozen=True)
class SubjectOutput:
    """One file of a subject's outputs: the only place to touch to add one. Each takes the finished record and
    its own settings (made by settings_for from ``settings``) and returns what it wrote; none reads what another
    set, so the table's order changes nothing in the files. The commit record is renamed into place last."""

    filename: Callable[[str], str]  # subject name -> file name
    settings: type | None  # the settings its writer takes, None: none
    wanted: Callable[[object], bool]  # settings -> does this run write it?
    write: Callable[[Path, SubjectRun, object], Path]  # (temporary path, record, settings) -> what it wrote
    commit_record: bool = False  # its presence (with this run's id) says the subject's set of files is complete


SUBJECT_OUTPUTS = (
    SubjectOutput(lambda _: CELL_ACTIVITY_FILENAME, CellActivitySettings, lambda s: s.cell_activity,
                  write_cell_activity_file),
    SubjectOutput(lambda _: COO_FILENAME, None, lambda _: True, write_grid_file),
    SubjectOutput(pdf_filename, PlotSettings, lambda s: s.plots, write_pdf_file),
    SubjectOutput(lambda name: name + NWB_FILENAME_SUFFIX, NwbSettings, lambda s: s.nwb, write_nwb_file),
    SubjectOutput(lambda _: METADATA_FILENAME, None, lambda _: True, write_metadata, commit_record=True),
)  # fmt: skip


def write_subject(record: SubjectRun, settings: Sequence) -> list:
    """Stage: the SUBJECT_OUTPUTS this run makes (``settings``: each one's, in the table's order), each written to
    a temporary and renamed into place, the commit record last; a file of an earlier run that this run does not
    make is removed (e.g. an old PDF after --no_plots). A failure removes this subject's temporaries and leaves its
    earlier files as they were. Returns the final paths written."""
    record.out_dir.mkdir(parents=True, exist_ok=True)
    finals = [record.out_dir / output.filename(record.name) for output in SUBJECT_OUTPUTS]
    temporaries = [temporary_path(final) for final in finals]
    wanted = [output.wanted(options) for output, options in zip(SUBJECT_OUTPUTS, settings)]
    try:
        for output, options, temporary, make in zip(SUBJECT_OUTPUTS, settings, temporaries, wanted):
            if make:
                output.write(temporary, record, options)
        commits = [output.commit_record for output in SUBJECT_OUTPUTS]
        for final, commit in zip(finals, commits):
            if commit:
                remove_quietly(final)  # without the commit record the renames count all together or not at all
        for final, temporary, make, _ in sorted(zip(finals, temporaries, wanted, commits), key=lambda f: f[3]):
            if make:
                os.replace(temporary, final)
            else:
                remove_quietly(final)
    except OSError as exc:
        raise WriteFailed(f"cannot write to {record.out_dir}: {describe_os_error(exc, record.out_dir)}") from None
    finally:
        for temporary in temporaries:
            remove_quietly(temporary)
    return [final for final, make in zip(finals, wanted) if make]


def describe_os_error(exc: OSError, folder: Path) -> str:
    """Plain words for a write error; HDF5's own message often hides the cause (a full disk)."""
    nearly_full = False
    with contextlib.suppress(OSError):
        nearly_full = shutil.disk_usage(folder).free < 1 << 20
    if exc.errno == errno.ENOSPC or "No space left" in str(exc) or nearly_full:
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied ({exc.strerror})"
    return "disk quota exceeded" if exc.errno == errno.EDQUOT else " ".join(str(exc).split())[:300]


# --- exports: the formats other trainers read, written from a subject's saved results ---------------------------
# Each export reads only the committed files of a subject (cell_activity.h5, the COO file, metadata.h5), so adding
# one to a finished run reruns no CASCADE and leaves those files as they are. Each is written to a temporary, opened
# by its reader check and renamed into place; it records what made it (the source run's id and its own settings),
# so a changed source or setting redoes that export alone. Optional packages are imported only when asked for.

EXPORT_RECORD_ATTR = "export_record"  # JSON {"run_id", "settings", "software_version"} of the run that made it
DENSE_EXPORT_FILENAME = "preaugmented_grids.h5"  # the dense version's file, beside the COO file
DENSE_BLOCK_TIMEPOINTS = 16  # timepoints made dense at a time (16 x 46 planes x 256 x 128 = 24 MB)
EXPORT_BLOCK_TIMEPOINTS = 256  # timepoints of every cell copied at a time (~90 MB of float32 for 90k cells)
GBM_EXPORT_DIR, TORCH_BRAIN_EXPORT_DIR = "gbm", "torch_brain"  # folders of their own under --output_dir
ZAPBENCH_EXPORT_DIR, ZAPBENCH_JSON = "zapbench", "zapbench.json"  # <subject>/zapbench/
LOG_ACTIVITY_EPS = 1e-7  # the successor's log_activity_eps


@dataclass(frozen=True)
class ExportSource:
    """A subject's committed files, which every export reads (never the run in memory)."""

    out_dir: Path
    metadata: dict  # metadata.h5's attributes

    @property
    def name(self) -> str:
        return self.out_dir.name

    @property
    def coo(self) -> Path:
        return self.out_dir / COO_FILENAME

    @property
    def cell_activity(self) -> Path:
        return self.out_dir / CELL_ACTIVITY_FILENAME

    @property
    def rate_hz(self) -> float:
        return float(self.metadata["timepoint_rate_hz"])

    def param(self, name: str):
        return self.metadata.get(f"param_{name}")

    def timepoints(self) -> dict:
        """The time axis every export shares: timepoint_indices, timepoint_times_s, is_train, split (codes)."""
        with h5py.File(self.out_dir / METADATA_FILENAME, "r") as h5:
            found = {key: h5[key][()] for key in ("timepoint_indices", "timepoint_times_s", "is_train")}
            # files of 1.2 hold is_train only: train or test (docs/outputs.md)
            found["split"] = h5["split"][()] if "split" in h5 else np.where(found["is_train"] == 1, TRAIN, TEST)
        found["split"] = found["split"].astype(np.int8)
        return found

    def cells(self) -> dict:
        """cell_activity.h5's per-cell arrays: cell_ids, cell_global_ids, positions (and positions_registered)."""
        with h5py.File(self.cell_activity, "r") as h5:
            found = {key: h5[key][()] for key in ("cell_ids", "positions", "positions_registered") if key in h5}
            found["cell_global_ids"] = (
                h5["cell_global_ids"][()] if "cell_global_ids" in h5 else cell_global_ids(self.name, found["cell_ids"])
            )
        return found

    def rate_blocks(self) -> Iterator[tuple]:
        """(first row, (rows, N) float32 rates) of cell_activity.h5's spike_rates, a block of timepoints at a time."""
        with h5py.File(self.cell_activity, "r") as h5:
            rates = h5["spike_rates"]
            for first in range(0, rates.shape[0], EXPORT_BLOCK_TIMEPOINTS):
                yield first, rates[first : first + EXPORT_BLOCK_TIMEPOINTS].astype(np.float32)

    def rates_shape(self) -> tuple:
        with h5py.File(self.cell_activity, "r") as h5:
            return h5["spike_rates"].shape

    def covariates(self) -> dict:
        return read_covariates(self.out_dir / METADATA_FILENAME)


def _one_hot(codes: np.ndarray) -> np.ndarray:
    """(T, K) float32 one-hot of the distinct values of ``codes`` in ascending order (the successor's stimulus_full)."""
    labels, compact = np.unique(np.asarray(codes).astype(np.int64).reshape(-1), return_inverse=True)
    return np.eye(len(labels), dtype=np.float32)[compact]


def unit_scaled_positions(source: ExportSource, cells: dict) -> tuple:
    """(N, 3) float32 positions in [0, 1] and how: in the atlas frame with --coordinates registered (voxel v of n
    to (v - 1) / (n - 1), the same frame for every fish), else the successor's per-fish min-max scaling."""
    registered = cells.get("positions_registered")
    if source.param("coordinates") == "registered" and registered is not None:
        extent = np.asarray(source.param("atlas_shape"), np.float64).reshape(-1)[:3]
        scaled = (np.nan_to_num(registered) - 1) / np.maximum(extent - 1, 1)
        how = f"atlas frame: (voxel - 1) / (n - 1) for atlas_shape {tuple(int(v) for v in extent)}"
    else:
        base = np.nan_to_num(np.asarray(cells["positions"], np.float64))
        low, span = base.min(axis=0), np.ptp(base, axis=0)
        scaled, how = (base - low) / np.where(span == 0, 1.0, span), "per-fish min-max of the positions"
    return np.clip(scaled, 0.0, 1.0).astype(np.float32), how


def split_intervals(split: np.ndarray, times_s: np.ndarray, rate_hz: float) -> dict:
    """code -> (starts, ends) in seconds of the contiguous runs of each split code (a timepoint lasts 1 / rate)."""
    bounds = np.flatnonzero(np.diff(split)) + 1
    starts, stops = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(split)]])
    found = {}
    for code in SPLIT_CODES.values():
        runs = split[starts] == code if len(split) else np.zeros(0, bool)
        found[code] = (times_s[starts[runs]], times_s[stops[runs] - 1] + 1.0 / rate_hz)
    return found


def write_dense_export(path: Path, source: ExportSource, _settings: dict) -> None:
    """preaugmented_grids.h5, the dense version's file the seed's grid loader reads (FastGridLoader): grids (T, Z, H,
    W) uint8, attributes num_timepoints and num_z_planes, timepoint_indices and is_train (and split), made dense a
    few timepoints at a time from the COO file: memory never holds the dense grid. SWMR-readable (libver latest)."""
    with h5py.File(source.coo, "r") as coo:
        shape, offsets = tuple(int(v) for v in coo["grid_shape"][()]), coo["timepoint_offsets"][()]
        log.info(f"{source.name}: export dense: a {'x'.join(map(str, shape))} uint8 grid, "
                 f"{_format_bytes(math.prod(shape))} before compression")  # fmt: skip
        with new_h5_file(path, in_memory=False, libver="latest") as h5:
            chunks = (1, 1, *shape[2:]) if min(shape) else None
            grids = h5.create_dataset("grids", shape, np.uint8, chunks=chunks, **(GZIP if chunks else {}))
            for first in range(0, shape[0], DENSE_BLOCK_TIMEPOINTS):
                stop = min(first + DENSE_BLOCK_TIMEPOINTS, shape[0])
                rows = slice(int(offsets[first]), int(offsets[stop]))
                coords = coo["spike_coords"][rows] - np.array([first, 0, 0, 0], np.int32)
                grids[first:stop] = coo_to_dense_grid(coords, coo["spike_values"][rows], (stop - first, *shape[1:]))
            times = source.timepoints()
            _write_datasets(h5, **times)
            attrs = {key: value for key, value in coo.attrs.items() if key not in ("num_timepoints", "num_z_planes")}
            h5.attrs.update(attrs)
            h5.attrs["num_timepoints"], h5.attrs["num_z_planes"] = shape[0], shape[1]  # the loader's ints
            h5.attrs["format"] = "dense"


def check_dense_export(path: Path) -> None:
    """What FastGridLoader reads, read as it reads it (SWMR, libver latest)."""
    with h5py.File(path, "r", libver="latest", swmr=True) as h5:
        num_timepoints, num_z = int(h5.attrs["num_timepoints"]), int(h5.attrs["num_z_planes"])
        if h5["grids"].shape[:2] != (num_timepoints, num_z) or h5["grids"].dtype != np.uint8:
            raise PipelineError(f"{path}: grids {h5['grids'].shape} do not match its num_timepoints, num_z_planes")
        if len(h5["timepoint_indices"]) != num_timepoints or len(h5["is_train"]) != num_timepoints:
            raise PipelineError(f"{path}: timepoint_indices or is_train do not have {num_timepoints} rows")


def write_gbm_export(path: Path, source: ExportSource, _settings: dict) -> None:
    """<output_dir>/gbm/<subject>.h5, the successor's flat file its NeuralDataset reads: neuron_values (T, N) float32
    rates (0 where CASCADE predicts nothing, neuron_values_valid beside), cell_positions (N, 3) in [0, 1],
    num_neurons, neuron_global_ids, stimulus_full one-hot, log_activity_mean / log_activity_std as the successor
    computes them (log of max(value, 1e-7) over time), behavior_full / eye_full on the neural clock (rows x T, as
    the successor stores them), and the split."""
    num_timepoints, num_cells = source.rates_shape()
    cells, times = source.cells(), source.timepoints()
    positions, how = unit_scaled_positions(source, cells)
    with new_h5_file(path, in_memory=False) as h5:
        sum_logs, sum_squares = _write_rate_datasets(h5, source, "neuron_values", "neuron_values_valid")
        mean = (sum_logs / max(num_timepoints, 1)).astype(np.float32)
        std = np.sqrt(np.maximum(sum_squares / max(num_timepoints, 1) - np.square(mean), 0.0)).astype(np.float32)
        covariates = source.covariates()
        extra = {}
        if "stimulus" in covariates:
            extra["stimulus_full"] = _one_hot(covariates["stimulus"])
        for name in ("behavior", "eye"):
            if name in covariates:
                extra[f"{name}_full"] = np.asarray(covariates[name], np.float32).T  # (rows, T) as the successor's
        _write_datasets(
            h5, cell_positions=positions, num_neurons=np.int64(num_cells), num_timepoints=np.int64(num_timepoints),
            neuron_global_ids=cells["cell_global_ids"].astype(np.int64), cell_ids=cells["cell_ids"],
            log_activity_mean=mean, log_activity_std=std, **times, **extra,
        )  # fmt: skip
        h5.attrs.update({
            "subject": source.name, "neuron_values_semantics": "expected spikes per timepoint", "unit": RATE_UNIT,
            "final_sampling_rate": source.rate_hz, "positions_normalized": True, "positions_scaling": how,
            "includes_log_activity_stats": True, "log_activity_eps": LOG_ACTIVITY_EPS, "split_codes": json.dumps(SPLIT_CODES),
            "split_rule": str(source.metadata.get("split_rule", "")), "software_version": __version__,
        })  # fmt: skip
        if "stimulus_full" in extra:
            h5.attrs["stimulus_num_classes"] = extra["stimulus_full"].shape[1]


def check_gbm_export(path: Path) -> None:
    """What NeuralDataset reads: neuron_values (T, N), cell_positions (N, 3) in [0, 1], num_neurons."""
    with h5py.File(path, "r") as h5:
        num_cells = int(h5["num_neurons"][()])
        if h5["neuron_values"].shape[1] != num_cells or h5["cell_positions"].shape != (num_cells, 3):
            raise PipelineError(f"{path}: neuron_values / cell_positions do not hold num_neurons {num_cells} cells")


def _torch_brain_data():
    """The Data classes torch_brain reads: its own (0.2) or temporaldata's (0.1)."""
    try:
        from torch_brain import data as classes

        classes.Data  # noqa: B018 (0.1 has a torch_brain.data without Data)
    except (ImportError, AttributeError):
        import temporaldata as classes
    return classes


@dataclass(frozen=True)
class TorchBrainSettings:
    """What the torch_brain export takes from the command line (fields named after the options)."""

    nwb_subject_id: str | None
    nwb_species: str | None


def write_torch_brain_export(path: Path, source: ExportSource, settings: TorchBrainSettings) -> None:
    """<output_dir>/torch_brain/<subject>.h5, one temporaldata Data per subject as brainsets lay out calcium
    recordings: cascade_rates (a RegularTimeSeries on the run's time base: rates (T, N) float32, 0 where CASCADE
    predicts nothing, valid beside), rois (id: the global id as text, global_id, cell_id, position, position_unit),
    brainset / subject / session / device descriptions, stimulus conditions as intervals, domain and
    train_domain / valid_domain / test_domain. The run keeps no dF/F on disk, so there is none here (--nwb has it).
    Data.to_hdf5 writes whole arrays: the rates go in as (T, 0) and their datasets are then made a block of
    timepoints at a time (chunked, compressed), so memory never holds the (T, N) rates."""
    tb = _torch_brain_data()
    num_timepoints, num_cells = source.rates_shape()
    cells, times = source.cells(), source.timepoints()
    rate_hz, times_s = source.rate_hz, times["timepoint_times_s"]
    start = float(times_s[0]) if num_timepoints else 0.0
    positions, how = unit_scaled_positions(source, cells)
    domains = {
        name: tb.Interval(start=np.asarray(starts, np.float64), end=np.asarray(ends, np.float64))
        for name, (starts, ends) in zip(
            ("train_domain", "valid_domain", "test_domain"),
            (split_intervals(times["split"], times_s, rate_hz)[code] for code in (TRAIN, VALIDATION, TEST)),
        )
    }
    covariates, conditions = source.covariates(), {}
    if "condition" in covariates:
        segments = ConditionSegments.of(covariates["condition"], covariates["condition_names"], num_timepoints)
        named = [s for s, c in enumerate(segments.conditions) if c >= 0]
        bounds = np.asarray(segments.offsets)
        conditions["stimulus_conditions"] = tb.Interval(
            start=times_s[bounds[named]].astype(np.float64),
            end=(times_s[bounds[np.add(named, 1)] - 1] + 1.0 / rate_hz).astype(np.float64),
            condition=np.asarray([segments.conditions[s] for s in named], np.int64),
            name=np.asarray([segments.names[s] for s in named], dtype="S"),
        )  # fmt: skip
    species = settings.nwb_species or None
    data = tb.Data(
        brainset=tb.BrainsetDescription(
            id="unified_spike_processing_coo", origin_version=str(source.metadata.get("layout", "")),
            derived_version=__version__, source=",".join(np.atleast_1d(source.metadata.get("source_files", "")).astype(str)),
            description=f"CASCADE spike rates of {source.name} ({source.metadata.get('cascade_model', '')}): "
            f"{RATE_UNIT} at {rate_hz:g} Hz",
        ),
        subject=tb.SubjectDescription(id=settings.nwb_subject_id or source.name, species=species),
        session=tb.SessionDescription(id=source.name),
        device=tb.DeviceDescription(
            id="microscope", recording_tech="calcium imaging", indicator="not recorded in the input",
            imaging_rate_hz=float(source.metadata["frame_rate_hz"]),
        ),
        cascade_rates=tb.RegularTimeSeries(sampling_rate=rate_hz, domain_start=start, rates=np.zeros((num_timepoints, 0), np.float32), valid=np.zeros((num_timepoints, 0), np.uint8)),
        rois=tb.ArrayDict(
            id=np.asarray([str(v) for v in cells["cell_global_ids"]], dtype="S"),
            global_id=cells["cell_global_ids"].astype(np.int64), cell_id=np.asarray(cells["cell_ids"], np.int64),
            position=positions,
        ),
        domain=tb.Interval(start=start, end=start + num_timepoints / rate_hz),
        rate_unit=RATE_UNIT, timepoint_rate_hz=rate_hz, position_scaling=how, split_codes=json.dumps(SPLIT_CODES),
        split_rule=str(source.metadata.get("split_rule", "")),
        software_version=__version__, **domains, **conditions,
    )  # fmt: skip
    with new_h5_file(path, in_memory=False) as h5:  # a whole fish's is ~600 MB
        data.to_hdf5(h5)
        _write_rate_datasets(h5["cascade_rates"], source, "rates", "valid")


def _write_rate_datasets(group, source: ExportSource, values_name: str, valid_name: str) -> None:
    """(T, N) float32 rates (0 where CASCADE predicts nothing) and (T, N) uint8 validity in ``group``, from
    cell_activity.h5 a block of timepoints at a time (replacing datasets of those names). Returns per cell the sums
    over time of log(max(value, 1e-7)) and of its square, whence the successor's log_activity_mean / _std."""
    shape = source.rates_shape()
    options = dict(chunks=(min(16, shape[0]), shape[1]), **GZIP) if min(shape) else {}
    for name in (values_name, valid_name):
        if name in group:
            del group[name]
    values = group.create_dataset(values_name, shape, np.float32, **options)
    valid = group.create_dataset(valid_name, shape, np.uint8, **options)
    sum_logs, sum_squares = np.zeros(shape[1]), np.zeros(shape[1])
    for first, block in source.rate_blocks():
        finite = np.isfinite(block)
        block[~finite] = 0.0
        values[first : first + len(block)], valid[first : first + len(block)] = block, finite
        logs = np.log(np.maximum(block, LOG_ACTIVITY_EPS))
        sum_logs += logs.sum(axis=0, dtype=np.float64)
        sum_squares += np.square(logs, dtype=np.float64).sum(axis=0)
    values.attrs["unit"] = RATE_UNIT
    return sum_logs, sum_squares


def check_torch_brain_export(path: Path) -> None:
    """torch_brain's own loader opens it and slices the first timepoints."""
    tb = _torch_brain_data()
    with h5py.File(path, "r") as h5:
        data = tb.Data.from_hdf5(h5, lazy=True)
        start = float(data.domain.start[0])
        data.slice(start, min(float(data.domain.end[-1]), start + 1.0 / float(data.timepoint_rate_hz)))


def zapbench_constants(source: ExportSource, num_timepoints: int) -> dict:
    """The JSON keyed as ZAPBench's constants.py, from which its split rule gives the run's split codes."""
    covariates = source.covariates()
    condition = covariates.get("condition")
    segments = ConditionSegments.of(condition, covariates.get("condition_names", ()), num_timepoints)
    held = str(source.param("holdout_condition") or "").lower()
    holdout = [s for s, name in enumerate(segments.names) if held and name.lower() == held]
    val, test = zapbench_fractions(argparse.Namespace(val_ratio=_none(source.param("val_ratio")), test_ratio=_none(source.param("test_ratio"))))  # fmt: skip
    padding = zapbench_padding(argparse.Namespace(condition_padding=_none(source.param("condition_padding"))))
    return {
        "condition_offsets": list(segments.offsets), "condition_names": list(segments.names),
        "condition_padding": int(padding), "val_fraction": float(val), "test_fraction": float(test),
        "conditions_train": [s for s in range(len(segments.names)) if s not in holdout], "conditions_holdout": holdout,
        "num_timepoints": int(num_timepoints), "timepoint_rate_hz": source.rate_hz, "unit": RATE_UNIT,
        "split_codes": SPLIT_CODES, "split_rule": str(source.metadata.get("split_rule", "")), "subject": source.name,
    }  # fmt: skip


def _none(value):
    """A recorded option attribute back as its value ('' was None)."""
    return None if value is None or (isinstance(value, str) and value == "") else value


def write_zapbench_export(path: Path, source: ExportSource, _settings: dict) -> None:
    """<subject>/zapbench/: zarr v3 arrays as ZAPBench reads them through TensorStore: traces (t, f) float32 rates
    (NaN where CASCADE predicts nothing, as ZAPBench's traces have no gaps to mark otherwise; dimension names t, f;
    attribute unit), covariates (t, k) float32 (stimulus and condition one-hot, behaviour, eye), positions (f, 3)
    in [0, 1], split (t,) int8, and zapbench.json keyed as ZAPBench's constants. No dF/F: the run keeps none."""
    import zarr

    num_timepoints, num_cells = source.rates_shape()
    cells, times = source.cells(), source.timepoints()
    path.mkdir()
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    chunks = (min(EXPORT_BLOCK_TIMEPOINTS, max(num_timepoints, 1)), max(min(num_cells, 4096), 1))
    traces = root.create_array("traces", shape=(num_timepoints, num_cells), dtype="float32", chunks=chunks,
                               dimension_names=("t", "f"), fill_value=float("nan"))  # fmt: skip
    for first, block in source.rate_blocks():
        traces[first : first + len(block)] = block
    traces.attrs.update({"unit": RATE_UNIT, "timepoint_rate_hz": source.rate_hz})
    positions, how = unit_scaled_positions(source, cells)
    stored = root.create_array("positions", shape=positions.shape, dtype="float32", dimension_names=("f", "a"))
    stored[...] = positions
    stored.attrs["scaling"] = how
    covariates, columns, names = source.covariates(), [], []
    for name in ("stimulus", "condition"):
        if name in covariates:
            one_hot = _one_hot(covariates[name])
            columns.append(one_hot)
            names += [f"{name}={v}" for v in np.unique(np.asarray(covariates[name]).astype(np.int64))]
    for name in ("behavior", "eye"):
        if name in covariates:
            values = np.asarray(covariates[name], np.float32).reshape(num_timepoints, -1)
            columns.append(values)
            names += [f"{name}[{i}]" for i in range(values.shape[1])]
    if columns:
        stack = np.concatenate(columns, axis=1).astype(np.float32)
        stored = root.create_array("covariates", shape=stack.shape, dtype="float32", dimension_names=("t", "k"))
        stored[...] = stack
        stored.attrs["names"] = names
    split = root.create_array("split", shape=(num_timepoints,), dtype="int8", dimension_names=("t",))
    split[...] = times["split"]
    constants = zapbench_constants(source, num_timepoints)
    (path / ZAPBENCH_JSON).write_text(json.dumps(constants, indent=1))


def check_zapbench_export(path: Path) -> None:
    """TensorStore opens the traces as ZAPBench's specs do (driver zarr3, labels t and f)."""
    import tensorstore as ts

    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "traces")}}).result()
    if tuple(store.domain.labels) != ("t", "f"):
        raise PipelineError(f"{path}: traces' dimensions are {store.domain.labels}, not (t, f)")


@dataclass(frozen=True)
class Export:
    """One format of EXPORTS: the only place to touch to add one."""

    description: str
    path: Callable[[Path, str], Path]  # (output_dir, subject) -> the file or folder it makes
    packages: tuple  # (import name, pip name) of the optional packages it needs, imported only when asked for
    reads: tuple  # the subject's files it reads
    write: Callable[[Path, ExportSource, object], None]  # (temporary, source, settings)
    check: Callable[[Path], None]  # its reader opens the temporary before it is renamed into place
    settings: type | None = None  # the options it takes (settings_for); a change redoes it


EXPORTS = {
    "dense": Export(
        f"<subject>/{DENSE_EXPORT_FILENAME}, the dense version's grids (T, Z, H, W) uint8 for the seed's grid loader",
        lambda out, name: out / name / DENSE_EXPORT_FILENAME, (), (COO_FILENAME,), write_dense_export,
        check_dense_export,
    ),
    "gbm": Export(
        f"{GBM_EXPORT_DIR}/<subject>.h5, the successor's per-neuron file (neuron_values, cell_positions, ...)",
        lambda out, name: out / GBM_EXPORT_DIR / f"{name}.h5", (), (CELL_ACTIVITY_FILENAME,), write_gbm_export,
        check_gbm_export,
    ),
    "torch_brain": Export(
        f"{TORCH_BRAIN_EXPORT_DIR}/<subject>.h5, a temporaldata Data recording for torch_brain's Dataset and samplers",
        lambda out, name: out / TORCH_BRAIN_EXPORT_DIR / f"{name}.h5", (("torch_brain", "torch-brain"),),
        (CELL_ACTIVITY_FILENAME,), write_torch_brain_export, check_torch_brain_export, TorchBrainSettings,
    ),
    "zapbench": Export(
        f"<subject>/{ZAPBENCH_EXPORT_DIR}/, zarr v3 (t, f) arrays and {ZAPBENCH_JSON} for ZAPBench (--split zapbench)",
        lambda out, name: out / name / ZAPBENCH_EXPORT_DIR, (("zarr", "zarr"), ("tensorstore", "tensorstore")),
        (CELL_ACTIVITY_FILENAME,), write_zapbench_export, check_zapbench_export,
    ),
}  # fmt: skip


def export_refusals(config) -> dict:
    """--export's refusals at the start, one line each: unknown names, missing packages, impossible combinations."""
    import importlib.util

    unknown = [name for name in config.export if name not in EXPORTS]
    chosen = [EXPORTS[name] for name in config.export if name in EXPORTS]
    missing = sorted(
        {pip for export in chosen for module, pip in export.packages if not importlib.util.find_spec(module)}
    )
    needs_activity = [
        name for name in config.export if name in EXPORTS and CELL_ACTIVITY_FILENAME in EXPORTS[name].reads
    ]
    return {
        f"--export: unknown format(s) {', '.join(unknown)} (known: {', '.join(EXPORTS)})": bool(unknown),
        f"--export {','.join(config.export)} needs optional packages: pip install {' '.join(missing)}": bool(missing),
        f"--export {','.join(needs_activity)} reads cell_activity.h5: drop --no_cell_activity": bool(needs_activity)
        and not config.cell_activity,
        "--export zapbench needs --split zapbench (ZAPBench's rule must give the run's split codes)": (
            "zapbench" in config.export and config.split != "zapbench"
        ),
    }  # fmt: skip


def export_record_of(path: Path) -> dict | None:
    """The record an export holds of what made it, or None (absent, unreadable, made otherwise)."""
    with contextlib.suppress(OSError, KeyError, ValueError):
        if path.is_dir():
            return json.loads((path / ZAPBENCH_JSON).read_text())[EXPORT_RECORD_ATTR]
        with h5py.File(path, "r") as h5:
            return json.loads(h5.attrs[EXPORT_RECORD_ATTR])
    return None


def _replace(temporary: Path, final: Path) -> None:
    """Rename a file or folder into place (a folder's old version is moved aside first and then removed)."""
    if temporary.is_dir() and final.exists():
        aside = temporary_path(final)
        os.replace(final, aside)
        os.replace(temporary, final)
        remove_quietly(aside)
    else:
        os.replace(temporary, final)


def write_exports(out_dir: Path, config) -> list:
    """Stage: --export's formats of one committed subject, each from its saved files (no CASCADE), each redone only
    when absent or made from another run or with other settings. Returns the paths written."""
    metadata = read_attrs(out_dir / METADATA_FILENAME)
    if metadata is None:
        return []
    source, run_id = ExportSource(out_dir, metadata), str(metadata["run_id"])
    for name, export in EXPORTS.items():  # an export not asked for stays, unless made from results now gone
        final = export.path(out_dir.parent, out_dir.name)
        old = export_record_of(final) if name not in config.export and final.exists() else None
        if old is not None and old.get("run_id") != run_id:
            remove_quietly(final)
            log.info(f"{out_dir.name}: removed export {name} ({final}): made from the subject's earlier results")
    written = []
    for name in config.export:
        export = EXPORTS[name]
        final = export.path(out_dir.parent, out_dir.name)
        settings = settings_for(export.settings, config) if export.settings else None
        record = {"run_id": run_id, "software_version": __version__,
                  "settings": dataclasses.asdict(settings) if settings else {}}  # fmt: skip
        if export_record_of(final) == record:
            log.info(f"{out_dir.name}: export {name} up to date ({final})")
            continue
        missing = [filename for filename in export.reads if not (out_dir / filename).is_file()]
        if missing:
            raise PipelineError(f"export {name} reads {', '.join(missing)}, which {out_dir} does not hold: rerun with --overwrite")  # fmt: skip
        started = time.perf_counter()
        log.info(f"{out_dir.name}: export {name} from the saved results in {out_dir} (CASCADE not rerun)")
        _write_export(export, final, source, settings, record)
        size = sum(p.stat().st_size for p in ([final] if final.is_file() else final.rglob("*")) if p.is_file())
        seconds = time.perf_counter() - started
        log.info(f"{out_dir.name}: export {name}: {final} ({_format_bytes(size)}) in {seconds:.1f} s")
        written.append(final)
    return written


def _write_export(export: Export, final: Path, source: ExportSource, settings, record: dict) -> None:
    """One export: written to a temporary, stamped with its record, opened by its reader, renamed into place."""
    temporary = temporary_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        export.write(temporary, source, settings)
        if temporary.is_dir():  # a folder of arrays: the record goes in its JSON
            constants = json.loads((temporary / ZAPBENCH_JSON).read_text())
            (temporary / ZAPBENCH_JSON).write_text(json.dumps({**constants, EXPORT_RECORD_ATTR: record}, indent=1))
        else:
            with h5py.File(temporary, "r+") as h5:
                h5.attrs[EXPORT_RECORD_ATTR] = json.dumps(record)
        export.check(temporary)
        _replace(temporary, final)
    except OSError as exc:
        raise WriteFailed(f"cannot write {final}: {describe_os_error(exc, final.parent)}") from None
    finally:
        remove_quietly(temporary)


def load_coo_grid(path) -> dict:
    """Everything in a preaugmented_grids_coo.h5 as numpy arrays plus its attributes (and 'covariates', a dict
    as read_covariates gives it, when the file has them)."""
    with h5py.File(path, "r") as h5:
        found = {key: h5[key][()] for key in h5 if isinstance(h5[key], h5py.Dataset)}
        found["attrs"] = dict(h5.attrs)
    return found | ({"covariates": covariates} if (covariates := read_covariates(path)) else {})


def load_coo_as_dense(filepath) -> np.ndarray:
    """The seed README's loader: a preaugmented_grids_coo.h5 as its dense (T, Z, H, W) uint8 grid (T*Z*H*W bytes)."""
    with h5py.File(filepath, "r") as h5:
        return coo_to_dense_grid(h5["spike_coords"][()], h5["spike_values"][()], h5["grid_shape"][()])


# --- Readers of windows of timepoints ---------------------------------------------------------
# Entries are sorted by t: timepoints [start, stop) are entries offsets[start]:offsets[stop] (the
# offsets give t). A window's z, x, y are read from spike_zxy, the same numbers unfiltered
# (3 bytes an entry): a 100-timepoint window of a whole fish is ~2 ms, where inflating spike_coords
# is ~28 ms, ~9 ms a column, however little of each chunk is inflated (issue 26, RESULTS_pipeline.md).
# Files without it (1.2) inflate only the row chunks of the window. Fast path for write_coo_file's
# spike_coords ((R, 1) chunks of little-endian int32, shuffle then deflate): shuffling stores byte i
# of every value of a chunk together, so a column whose values fit in k bytes is the first k*R bytes
# of its inflated chunk; inflating only those is ~4x faster than letting HDF5 inflate and unshuffle it
# all. Other layouts are read by h5py. Files made before timepoint_offsets existed (1.0) are bisected
# on their t column (~2*log2(E/R) chunk reads).
# CooFile and CellFile look a file's shape, offsets and layout up once per open handle: a window
# then costs only its own rows (training reads thousands of windows through one handle).


@dataclass(frozen=True)
class CooWindow:
    """Timepoints [start, stop) of a COO grid file, as load_coo_window returns them."""

    coords: np.ndarray  # (n, 4) int32 [t - start, z, x, y], sorted (row-major) and unique
    shape: tuple  # (stop - start, Z, H, W): the window's grid, which coords index into
    offsets: np.ndarray  # (stop - start + 1,) int64: window timepoint i is coords[offsets[i]:offsets[i + 1]]
    start: int  # the window in the file's timepoints
    stop: int

    def to_dense(self) -> np.ndarray:
        """The dense (stop - start, Z, H, W) uint8 block (as load_coo_window_dense reads it)."""
        return coo_to_dense_grid(self.coords, self.shape)


def _open_h5(source):
    """(h5py group, whether this call opened it): ``source`` is a path or an open h5py file or group."""
    return (source, False) if isinstance(source, h5py.Group) else (h5py.File(source, "r"), True)


class _OpenedOnce:
    """A file a reader opened itself (closed by close() or a with block) or was handed open (left open)."""

    h5: h5py.Group
    _owned: bool

    def close(self) -> None:
        if self._owned and self.h5.id.valid:
            self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_deflated_columns(coords) -> bool:
    """spike_coords as write_coo_file writes it: (R, 1) chunks of little-endian int32, shuffle then deflate."""
    plist = coords.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]  # chunked whenever filtered
    return (
        filters == [h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE]
        and coords.chunks[1] == 1
        and (coords.dtype == "<i4")
    )


class CooFile(_OpenedOnce):
    """A preaugmented_grids_coo.h5 read window after window: grid_shape, timepoint_offsets (checked) and the
    layout are read once here, not per window. ``source``: a path (opened read-only, closed by close()) or an
    open h5py file (left open). The load_coo_window* functions take one in place of a path."""

    def __init__(self, source):
        self.h5, self._owned = _open_h5(source)
        try:
            h5 = self.h5
            self.filename = h5.file.filename
            self.grid_shape = tuple(int(s) for s in h5["grid_shape"][()])
            self.coords = h5["spike_coords"]
            self.num_timepoints, self.num_entries = self.grid_shape[0], self.coords.shape[0]
            self.offsets = h5["timepoint_offsets"][()].astype(np.int64) if "timepoint_offsets" in h5 else None
            offsets = self.offsets
            if offsets is not None and (
                offsets.shape != (self.num_timepoints + 1,)
                or offsets[0] < 0
                or offsets[-1] > self.num_entries
                or np.any(np.diff(offsets) < 0)
            ):
                raise ValueError(
                    f"timepoint_offsets of {self.filename} do not match its {self.num_timepoints} timepoints and "
                    f"{self.num_entries} entries: the file is damaged, rerun the pipeline for this subject"
                )
            self.deflated_columns = self.num_entries > 0 and _is_deflated_columns(self.coords)
            self.zxy = h5.get("spike_zxy")  # None in files of 1.2
            if self.zxy is not None and self.zxy.shape != (3, self.num_entries):
                raise ValueError(
                    f"spike_zxy of {self.filename} is {self.zxy.shape}, not (3, {self.num_entries}) as its "
                    "spike_coords: the file is damaged, rerun the pipeline for this subject"
                )
        except BaseException:
            self.close()
            raise

    def rows(self, start: int, stop: int) -> tuple:
        """(first, last) rows of spike_coords holding timepoints [start, stop) (a checked window)."""
        if self.offsets is not None:
            return int(self.offsets[start]), int(self.offsets[stop])
        first = _first_row_from(self.coords, start, 0)  # written before 1.1: bisect the t column
        return first, _first_row_from(self.coords, stop, first)

    def column(self, first: int, last: int, column: int) -> np.ndarray:
        """spike_coords[first:last, column] (1: z, 2: x, 3: y): uint8 when the grid's axis fits a byte, else int32."""
        if self.zxy is not None and column:
            return _compact(self.zxy[column - 1, first:last])
        return _read_column(self.coords, first, last, column, self.grid_shape[column] - 1, self.deflated_columns)

    def entries(self, start, stop) -> tuple:
        """(window offsets, (3, n) z, x, y) of timepoints [start, stop): window timepoint i is columns
        offsets[i]:offsets[i + 1] (the compact form: t is never stored per entry; uint8 where the grid's
        axes fit a byte, else int32)."""
        start, stop = _check_window(start, stop, self.num_timepoints, self.filename)
        first, last = self.rows(start, stop)
        if self.offsets is not None:
            offsets = self.offsets[start : stop + 1] - first
        else:
            t = _read_column(self.coords, first, last, 0, self.num_timepoints - 1, self.deflated_columns)
            t = t.astype(np.int32) - np.int32(start)
            offsets = np.searchsorted(t, np.arange(stop - start + 1), side="left").astype(np.int64)
            if len(t) and (t[0] < 0 or t[-1] >= stop - start):
                raise ValueError(f"spike_coords of {self.filename} is not sorted by t: rerun the pipeline")
        if self.zxy is not None:
            return offsets, _compact(self.zxy[:, first:last])
        return offsets, _stacked_rows([self.column(first, last, j) for j in (1, 2, 3)])

    def columns(self, start, stop) -> tuple:
        """(window shape, [t - start, z, x, y] columns, window offsets) of timepoints [start, stop)."""
        offsets, columns = self.entries(start, stop)
        t = np.repeat(np.arange(len(offsets) - 1, dtype=np.int32), np.diff(offsets))
        return (len(offsets) - 1, *self.grid_shape[1:]), [t, *columns], offsets

    def window(self, start, stop) -> CooWindow:
        shape, columns, offsets = self.columns(start, stop)
        return CooWindow(_stacked_coords(columns), shape, offsets, int(start), int(stop))

    def dense(self, start, stop, out: np.ndarray | None = None) -> np.ndarray:
        shape, columns, _ = self.columns(start, stop)
        out = _dense_buffer(out, shape)
        out.reshape(-1)[_linear_index(columns, shape)] = 1
        return out


def _compact(columns: np.ndarray) -> np.ndarray:
    """Entry columns as readers return them: uint8 as stored, any wider type as int32 (what torch takes)."""
    return columns if columns.dtype == np.uint8 else columns.astype(np.int32)


def _stacked_rows(columns: list) -> np.ndarray:
    """(k, n) array of k entry columns (uint8 where every column is, else int32): the compact sparse form."""
    dtype = np.uint8 if all(column.dtype == np.uint8 for column in columns) else np.int32
    stacked = np.empty((len(columns), len(columns[0])), dtype)
    for row, column in zip(stacked, columns):
        row[...] = column
    return stacked


def _stacked_coords(columns: list) -> np.ndarray:
    """(n, 4) int32 from four columns (uint8 or int32), a column at a time (~1.6x np.column_stack's speed)."""
    coords = np.empty((len(columns[0]), 4), np.int32)
    for j, column in enumerate(columns):
        coords[:, j] = column
    return coords


def _dense_buffer(out: np.ndarray | None, shape: tuple) -> np.ndarray:
    """A zeroed uint8 block of ``shape``: ``out`` (checked, then zeroed) or a new one."""
    if out is None:
        return np.zeros(shape, dtype=np.uint8)
    if out.shape != shape or out.dtype != np.uint8 or not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(
            f"out must be a writeable C-contiguous uint8 array of shape {shape}, got {out.dtype} {out.shape}"
        )
    out.fill(0)
    return out


def _linear_index(columns: list, shape: tuple) -> np.ndarray:
    """Row-major linear index of [t, z, x, y] columns in ``shape``, by Horner's rule (one int64 array)."""
    flat = np.multiply(columns[0], shape[1], dtype=np.int64)
    for column, size in zip(columns[1:], shape[2:]):
        flat += column
        flat *= size
    flat += columns[3]
    return flat


def load_coo_window(path, start: int, stop: int) -> CooWindow:
    """The entries of timepoints [start, stop) of a preaugmented_grids_coo.h5, t relative to start. ``path`` is
    the file, an open h5py.File or a CooFile (to read many windows of one file, e.g. in a PyTorch Dataset: a
    CooFile reads the file's offsets once). Reads only the rows of the window. 0 <= start <= stop <= T, else
    ValueError (TypeError when not integers)."""
    if isinstance(path, CooFile):
        return path.window(start, stop)
    with CooFile(path) as grid:
        return grid.window(start, stop)


def load_coo_window_dense(path, start: int, stop: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Timepoints [start, stop) as a dense (stop - start, Z, H, W) uint8 block of ones and zeros. ``out``: a
    C-contiguous uint8 array of that shape to fill (zeroed first) and return; reusing one buffer for window after
    window spares the kernel allocating and zeroing fresh pages each time (and its occasional stalls doing so)."""
    if isinstance(path, CooFile):
        return path.dense(start, stop, out)
    with CooFile(path) as grid:
        return grid.dense(start, stop, out)


def _check_window(start, stop, num_timepoints: int, filename: str) -> tuple:
    """(start, stop) as ints, or TypeError (not integers) / ValueError (outside 0 <= start <= stop <= T)."""
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer timepoint, got {value!r}")
    if not 0 <= start <= stop <= num_timepoints:
        raise ValueError(
            f"timepoint window [{start}, {stop}) is outside {filename}: it has {num_timepoints} "
            f"timepoints, so 0 <= start <= stop <= {num_timepoints}"
        )
    return int(start), int(stop)


def _first_row_from(coords, timepoint: int, low: int) -> int:
    """The first row at or after ``low`` whose t is at least ``timepoint`` (rows sorted by t)."""
    high = coords.shape[0]
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if coords[middle, 0] < timepoint else (low, middle)
    return low


def _read_column(coords, first: int, last: int, column: int, max_value: int, deflated_columns: bool) -> np.ndarray:
    """spike_coords[first:last, column], values in [0, max_value]: uint8 when they fit, else int32.
    ``deflated_columns``: the file has write_coo_file's layout (_is_deflated_columns), read by the fast path."""
    if last <= first:
        return np.zeros(0, dtype=np.uint8 if max_value < 256 else np.int32)
    if not deflated_columns:
        return coords[first:last, column]
    rows = coords.chunks[0]
    num_bytes = max(1, (int(max_value).bit_length() + 7) // 8)  # the low bytes that hold the values
    chunks, final = [], (last - 1) // rows
    for chunk in range(first // rows, final + 1):
        filter_mask, stored = coords.id.read_direct_chunk((chunk * rows, column))
        # the last chunk is inflated only up to the window's last row (deflate streams are read from the start)
        wanted = num_bytes * rows if chunk < final else (num_bytes - 1) * rows + last - chunk * rows
        chunks.append(zlib.decompressobj().decompress(stored, wanted) if filter_mask == 0 else b"")
        if len(chunks[-1]) != wanted:  # stored unfiltered, or damaged: HDF5 decodes (or reports) it
            return coords[first:last, column]
    chunks[-1] += bytes(num_bytes * rows - len(chunks[-1]))
    planes = np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(len(chunks), num_bytes, rows)
    planes = planes.transpose(1, 0, 2).reshape(num_bytes, -1)[:, first % rows : first % rows + last - first]
    if num_bytes == 1:
        return planes[0]
    return sum(plane.astype(np.int32) << (8 * byte) for byte, plane in enumerate(planes))


# --- Reader of windows of per-cell rates (cell_activity.h5) ---------------------------------------
# spike_rates is (T, N) float16 in chunks of timepoints x every cell. Unfiltered (since issue 26), a window of rows
# is a few byte ranges of the file: read with os.preadv straight into the caller's array (HDF5 adds ~50 %
# per window and a per-call cost). Files of 1.2 (gzip) and other drivers are read through h5py.


def split_of(h5) -> np.ndarray:
    """(T,) int8 split codes of an output file (0 train, 1 validation, 2 test, -1 none): its `split`, or, in
    files of 1.2 that have only is_train, 0 where is_train is 1 and 2 elsewhere."""
    if "split" in h5:
        return h5["split"][()].astype(np.int8)
    return np.where(h5["is_train"][()] == 1, 0, 2).astype(np.int8)


@dataclass(frozen=True)
class CellWindow:
    """Timepoints [start, stop) of a cell_activity.h5, as load_cell_window returns them."""

    rates: np.ndarray  # (stop - start, N) float32 CASCADE rates (spikes per timepoint), NaN: no prediction
    timepoint_indices: np.ndarray  # (stop - start,) the time base's timepoint of each row
    timepoint_times_s: np.ndarray  # (stop - start,) seconds from the recording's start
    is_train: np.ndarray  # (stop - start,) uint8
    covariates: dict  # name -> (stop - start, ...) array, aligned to the rows (empty when the file has none)
    start: int
    stop: int


def _stored_rows(rates, h5) -> list | None:
    """[(first row, byte offset)] of each stored piece (chunk, or the whole contiguous dataset) of an unfiltered
    little-endian float16 (T, N) dataset of rows of every cell, in row order; None for any other layout."""
    plist = rates.id.get_create_plist()
    if rates.dtype != "<f2" or plist.get_nfilters() or h5.file.driver != "sec2" or rates.shape[0] == 0:
        return None
    if not hasattr(os, "preadv"):  # Windows: read through HDF5
        return None
    if rates.chunks is None:
        offset = rates.id.get_offset()
        return None if offset is None else [(0, offset)]
    if rates.chunks[1] != rates.shape[1]:
        return None
    pieces = []
    rates.id.chunk_iter(lambda info: pieces.append((info.chunk_offset[0], info.byte_offset)))
    pieces.sort()
    expected = range(0, rates.shape[0], rates.chunks[0])
    return pieces if [first for first, _ in pieces] == list(expected) else None  # every chunk written


class CellFile(_OpenedOnce):
    """A cell_activity.h5 read window after window: its per-timepoint datasets and covariates (small) are read
    once, and windows of spike_rates read only their rows (straight from the file where it is unfiltered).
    ``source``: a path (opened read-only, closed by close()) or an open h5py file (left open)."""

    def __init__(self, source):
        self.h5, self._owned = _open_h5(source)
        try:
            h5 = self.h5
            self.filename, self.rates_dataset = h5.file.filename, h5["spike_rates"]
            self.num_timepoints, self.num_cells = self.rates_dataset.shape
            per_timepoint = ("timepoint_indices", "timepoint_times_s", "is_train")
            self.per_timepoint = {name: h5[name][()] for name in per_timepoint}
            self.split = split_of(h5)
            self.cell_global_ids = h5["cell_global_ids"][()] if "cell_global_ids" in h5 else None
            group = h5.get(COVARIATES_GROUP)
            datasets = group.items() if isinstance(group, h5py.Group) else ()
            self.covariates = {name: data[()] for name, data in datasets if isinstance(data, h5py.Dataset)}
            self._pieces = _stored_rows(self.rates_dataset, h5)
            self._fd = h5.file.id.get_vfd_handle() if self._pieces is not None else None
            self._piece_rows = self.rates_dataset.chunks[0] if self.rates_dataset.chunks else self.num_timepoints
        except BaseException:
            self.close()
            raise

    def rates(self, start, stop, out: np.ndarray | None = None) -> np.ndarray:
        """spike_rates[start:stop] (float16, as stored), into ``out`` when given: a writeable float16 array of
        (stop - start) rows of at least N columns whose rows are each contiguous (e.g. a slot of a batch with
        room for the largest fish: columns N and beyond are left as they are)."""
        start, stop = _check_window(start, stop, self.num_timepoints, self.filename)
        shape = (stop - start, self.num_cells)
        if out is None:
            out = np.empty(shape, np.float16)
        elif (
            out.dtype != np.float16
            or out.ndim != 2
            or out.shape[0] != shape[0]
            or out.shape[1] < shape[1]
            or not out.flags.writeable
            or (shape[1] > 1 and out.strides[1] != 2)
        ):
            raise ValueError(f"out must be a writeable float16 array of {shape[0]} rows of at least {shape[1]} "
                             f"contiguous values, got {out.dtype} {out.shape}")  # fmt: skip
        target = out[:, : shape[1]]
        if stop == start or not self.num_cells:
            return out
        if self._pieces is None:
            target[...] = self.rates_dataset[start:stop]
            return out
        row_bytes, whole = 2 * self.num_cells, target.flags.c_contiguous
        buffer = memoryview(target).cast("B") if whole else None
        row = start
        while row < stop:  # a piece (chunk) at a time: consecutive rows of a piece are consecutive bytes
            piece = row // self._piece_rows
            first, byte_offset = self._pieces[piece]
            end = min(stop, first + self._piece_rows)
            if whole:
                self._pread(buffer[(row - start) * row_bytes : (end - start) * row_bytes], byte_offset, row - first)
            else:
                for r in range(row, end):
                    self._pread(memoryview(target[r - start]).cast("B"), byte_offset, r - first)
            row = end
        return out

    def _pread(self, buffer: memoryview, byte_offset: int, first_row: int) -> None:
        position, done = byte_offset + first_row * 2 * self.num_cells, 0
        while done < len(buffer):
            got = os.preadv(self._fd, [buffer[done:]], position + done)
            if got <= 0:
                raise OSError(f"{self.filename}: spike_rates ends early (file truncated?): rerun the pipeline")
            done += got

    def window(self, start, stop) -> CellWindow:
        start, stop = _check_window(start, stop, self.num_timepoints, self.filename)
        rows = slice(start, stop)
        covariates = {name: values[rows] for name, values in self.covariates.items()}
        timepoints = {name: values[rows] for name, values in self.per_timepoint.items()}
        return CellWindow(self.rates(start, stop).astype(np.float32), **timepoints, covariates=covariates,
                          start=start, stop=stop)  # fmt: skip


def load_cell_window(path, start: int, stop: int) -> CellWindow:
    """Rows [start, stop) of a cell_activity.h5's spike_rates with what a model reads alongside (times, split,
    covariates). ``path`` is the file, an open h5py.File or a CellFile (to read many windows, e.g. in a PyTorch
    Dataset: a CellFile looks the file up once); reads only the rows of the window. 0 <= start <= stop <= T, else
    ValueError (TypeError when not integers)."""
    if isinstance(path, CellFile):
        return path.window(start, stop)
    with CellFile(path) as cells:
        return cells.window(start, stop)


# =============================================================================================
# 10. Plots: one PDF per subject, one function per page
# =============================================================================================


@dataclass
class PlotData:
    """What the PDF shows: small arrays gathered from a subject's results."""

    subject: str
    timepoint_rate_hz: float  # the time base's: rates, spikes, raster and population rate are on it
    summary_lines: list  # first page: what was run, and every warning
    cell_ids: np.ndarray  # the few cells whose traces are drawn
    dff: np.ndarray  # (cells, frames) on the recording's frames (dff_rate_hz)
    rates: np.ndarray  # (cells, timepoints)
    spikes: np.ndarray  # (cells, timepoints)
    spike_mode: str
    raster_cells: np.ndarray  # rank of the cell in the raster (sorted by plane)
    raster_timepoints: np.ndarray
    raster_size: int
    population_rate_hz: np.ndarray
    test_spans: list  # [start, stop) timepoints of the test split
    edge_spans: list  # [start, stop) timepoints without a prediction
    cell_voxels: np.ndarray
    cell_spike_counts: np.ndarray
    grid: GridSpec
    noise_level: np.ndarray
    model: CascadeModel
    condition_spans: list = dataclasses.field(default_factory=list)  # (name, start, stop) timepoints per condition run
    behavior: np.ndarray | None = None  # (timepoints, channels), or None
    dff_rate_hz: float | None = None  # the recording's frame rate, when rates are on another time base


def _spans(mask: np.ndarray) -> list:
    """[start, stop) index spans where mask is True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _import_matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    return plt, PdfPages


def plot_subject_pdf(path: Path, plot: PlotData) -> None:
    """The original's pages (dF/F, rate, spikes for a few cells) plus a summary and population views."""
    plt, PdfPages = _import_matplotlib()
    buffer = io.BytesIO()  # rendered in memory: a full disk is then one clean OSError (see write_file)
    with PdfPages(buffer) as pdf:
        for page in (_page_summary, _page_traces, _page_spikes, _page_raster, _page_planes, _page_noise):
            for fig in page(plt, plot):
                pdf.savefig(fig)
                plt.close(fig)
    write_file(path, buffer)


def _page_summary(plt, plot: PlotData):
    fig = plt.figure(figsize=(11, 8.5))
    fig.text(0.05, 0.95, f"{plot.subject}", fontsize=16, va="top", weight="bold")
    fig.text(0.05, 0.88, "\n".join(plot.summary_lines), fontsize=9, va="top", family="monospace", wrap=True)
    yield fig


def _page_traces(plt, plot: PlotData):
    pages = (
        (plot.dff, "dF/F", "dF/F", plot.dff_rate_hz or plot.timepoint_rate_hz),
        (plot.rates, "CASCADE spike rate", "spikes per timepoint", plot.timepoint_rate_hz),
    )
    for traces, title, unit, rate_hz in pages:
        time_s = np.arange(traces.shape[1]) / rate_hz
        fig, ax = plt.subplots(figsize=(11, 8.5))
        spacing = np.nanpercentile(np.abs(traces), 99) * 1.2 if np.isfinite(traces).any() else 1.0
        spacing = spacing if spacing > 0 else 1.0
        for i, trace in enumerate(traces):
            ax.plot(time_s, trace + i * spacing, lw=0.7)
        ax.set_yticks(np.arange(len(traces)) * spacing, [f"cell {int(c)}" for c in plot.cell_ids])
        ax.set(
            xlabel="time (s)",
            title=f"{plot.subject}: {title} of {len(traces)} cells (offset {spacing:.2g} {unit} per row)",
        )
        fig.tight_layout()
        yield fig


def _page_spikes(plt, plot: PlotData):
    time_s = np.arange(plot.spikes.shape[1]) / plot.timepoint_rate_hz
    fig, ax = plt.subplots(figsize=(11, 8.5))
    for i, row in enumerate(plot.spikes):
        ax.vlines(time_s[np.flatnonzero(row)], i + 0.1, i + 0.9, lw=1.0)
    ax.set_yticks(np.arange(len(plot.cell_ids)) + 0.5, [f"cell {int(c)}" for c in plot.cell_ids])
    ax.set_xlim(time_s[0], time_s[-1] if len(time_s) > 1 else 1)
    ax.set(xlabel="time (s)", title=f"{plot.subject}: binary spikes ({plot.spike_mode}) of the same cells")
    fig.tight_layout()
    yield fig


def _page_raster(plt, plot: PlotData):
    # below the raster, when the subject has them: its stimulus conditions as bands, and its behaviour channels
    rows = [
        "raster",
        *(["conditions"] * bool(plot.condition_spans)),
        "rate",
        *(["behavior"] * (plot.behavior is not None)),
    ]
    heights = {"raster": 3, "conditions": 0.35, "rate": 1, "behavior": 1}
    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 8.5), sharex=True, height_ratios=[heights[r] for r in rows])
    axes = dict(zip(rows, axes))
    raster_ax, rate_ax, rate = axes["raster"], axes["rate"], plot.timepoint_rate_hz
    raster_ax.plot(plot.raster_timepoints / rate, plot.raster_cells, "|", ms=2, color="k", alpha=0.6, rasterized=True)
    raster_ax.set(ylabel="cell (sorted by z-plane)", title=f"{plot.subject}: spikes of {plot.raster_size} random cells")
    rate_ax.plot(np.arange(len(plot.population_rate_hz)) / rate, plot.population_rate_hz, lw=0.8, color="C3")
    for start, stop in plot.test_spans:
        rate_ax.axvspan(start / rate, stop / rate, color="C0", alpha=0.15, lw=0)
        raster_ax.axvspan(start / rate, stop / rate, color="C0", alpha=0.08, lw=0)
    for start, stop in plot.edge_spans:
        rate_ax.axvspan(start / rate, stop / rate, color="0.6", alpha=0.3, lw=0)
    rate_ax.set(ylabel="mean rate (Hz/cell)")
    if "conditions" in axes:
        _condition_bands(axes["conditions"], plot)
    if "behavior" in axes:
        behavior = plot.behavior
        spread = np.nanstd(behavior, axis=0)
        scaled = (behavior - np.nanmean(behavior, axis=0)) / np.where(spread > 0, spread, 1)
        for channel in range(behavior.shape[1]):
            axes["behavior"].plot(np.arange(len(behavior)) / rate, scaled[:, channel] + 4 * channel, lw=0.5)
        axes["behavior"].set(ylabel="behaviour (z-scored)", yticks=4 * np.arange(behavior.shape[1]))
        axes["behavior"].set_yticklabels([str(channel + 1) for channel in range(behavior.shape[1])])
    axes[rows[-1]].set_xlabel("time (s); blue: test timepoints, grey: timepoints without prediction")
    fig.tight_layout()
    yield fig


def _condition_bands(ax, plot: PlotData):
    """Each stimulus condition as a shaded band with its name, in one colour per condition."""
    names = list(dict.fromkeys(name for name, _, _ in plot.condition_spans))
    for name, start, stop in plot.condition_spans:
        colour = f"C{names.index(name) % 10}"
        ax.axvspan(start / plot.timepoint_rate_hz, stop / plot.timepoint_rate_hz, color=colour, alpha=0.5, lw=0)
        ax.text(
            (start + stop) / 2 / plot.timepoint_rate_hz, 0.5, name, ha="center", va="center", fontsize=7, clip_on=True
        )
    ax.set(yticks=[], ylim=(0, 1), ylabel="stimulus")


PLANE_PANELS_MAX = 36  # panels on the planes page


def _page_planes(plt, plot: PlotData):
    # one dot per cell at its (x, y) voxel, coloured by its spikes (sparse voxels are invisible as images);
    # at most 36 panels: with more planes (e.g. registered z in µm) each panel pools neighbouring planes
    voxels, counts, grid = plot.cell_voxels, plot.cell_spike_counts, plot.grid
    planes_per_panel = math.ceil(grid.num_z_planes / PLANE_PANELS_MAX)
    num_panels = math.ceil(grid.num_z_planes / planes_per_panel)
    columns = min(6, num_panels)
    fig, axes = plt.subplots(math.ceil(num_panels / columns), columns, figsize=(11, 8.5), squeeze=False)
    vmax = max(1.0, float(np.percentile(counts, 99))) if counts.size else 1.0
    for panel, ax in enumerate(axes.ravel()):
        ax.set(xticks=[], yticks=[])
        if panel >= num_panels:
            ax.axis("off")
            continue
        first, last = panel * planes_per_panel, min((panel + 1) * planes_per_panel, grid.num_z_planes) - 1
        in_panel = (voxels[:, 0] >= first) & (voxels[:, 0] <= last)
        order = np.argsort(counts[in_panel])  # active cells drawn on top
        x, y, panel_counts = voxels[in_panel, 1][order], voxels[in_panel, 2][order], counts[in_panel][order]
        # rasterized: 90k vector dots make a slow, heavy PDF
        image = ax.scatter(y, x, c=panel_counts, s=4, cmap="viridis", vmin=0, vmax=vmax, linewidths=0, rasterized=True)
        ax.set(xlim=(-1, grid.width), ylim=(grid.height, -1), aspect="equal")
        z_first, z_last = grid.z_values[first], grid.z_values[last]
        title = (
            f"plane {first} (z={z_first:g})" if first == last else f"planes {first}-{last} (z={z_first:g}-{z_last:g})"
        )
        ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="spikes per cell (kept timepoints)")
    fig.suptitle(f"{plot.subject}: spike counts per cell in each plane (x down, y across)")
    yield fig


def _page_noise(plt, plot: PlotData):
    fig, ax = plt.subplots(figsize=(11, 8.5))
    noise = plot.noise_level[np.isfinite(plot.noise_level)]
    if noise.size:
        ax.hist(noise, bins=60, color="0.4")
    for level in plot.model.noise_levels:
        ax.axvline(level, color="C3", lw=1, ls="--")
    ax.set_xlabel("CASCADE noise level (% dF/F / sqrt(Hz)); dashed: the model's noise levels")
    ax.set_ylabel("cells")
    ax.set_title(f"{plot.subject}: noise levels of {noise.size} cells vs model {plot.model.name}")
    fig.tight_layout()
    yield fig


def plot_data(record: SubjectRun, settings: PlotSettings) -> PlotData:
    """The PDF's content, from the subject's results (small arrays only)."""
    subject, spikes, plan = record.subject, record.spikes, record.plan
    valid_rows = np.flatnonzero(spikes.valid)
    rng = np.random.default_rng([settings.seed, 11])
    raster_pool = valid_rows if len(valid_rows) <= 300 else np.sort(rng.choice(valid_rows, 300, replace=False))
    order = raster_pool[np.lexsort((raster_pool, plan.grid.cell_voxels[raster_pool, 0]))]  # by plane
    rank = np.full(subject.num_cells, -1)
    rank[order] = np.arange(len(order))
    raster_cells, raster_timepoints = spikes.events_of_cells(order)
    cell_spikes_kept = spikes.spikes_per_cell(plan.kept_timepoints[0], plan.kept_timepoints[-1] + 1)
    test_mask = np.zeros(record.time_base.num_timepoints, bool)
    test_mask[plan.kept_timepoints[plan.is_train == 0]] = True
    in_grid = spikes.valid if plan.grid.cells_outside is None else spikes.valid & ~plan.grid.cells_outside
    traces = spikes.plot_traces()
    shown = np.isin(traces.rows, plot_candidates(subject.num_cells, settings.seed)[: settings.num_neurons])
    return PlotData(
        subject=subject.name,
        timepoint_rate_hz=record.time_base.rate_hz,
        summary_lines=_summary_page_lines(record, settings),
        cell_ids=subject.cell_ids[traces.rows[shown]],
        dff=traces.dff[shown],
        rates=traces.rates[shown],
        spikes=traces.spikes[shown],
        spike_mode=settings.spike_mode,
        raster_cells=rank[raster_cells],
        raster_timepoints=raster_timepoints,
        raster_size=len(order),
        population_rate_hz=record.population_rate_hz(),
        test_spans=_spans(test_mask),
        edge_spans=_spans(~plan.predicted),
        cell_voxels=plan.grid.cell_voxels[in_grid],
        cell_spike_counts=cell_spikes_kept[in_grid],
        grid=plan.grid,
        noise_level=spikes.cells.noise_level,
        model=record.model,
        dff_rate_hz=subject.frame_rate_hz,
        condition_spans=_condition_spans(record.covariates),
        behavior=record.covariates.behavior,
    )


def _condition_spans(covariates: Covariates) -> list:
    """(name, start, stop) timepoints of each run of one stimulus condition, for the PDF."""
    if covariates.condition is None:
        return []
    spans = []
    for index, name in enumerate(covariates.condition_names):
        spans += [(name, start, stop) for start, stop in _spans(covariates.condition == index)]
    return spans


def _summary_page_lines(record: SubjectRun, settings: PlotSettings) -> list:
    subject, model, counts = record.subject, record.model, record.grid.counts
    entries = int(record.grid.plane_entries.sum())
    return [
        f"{plural(subject.num_cells, 'cell')} x {plural(subject.num_frames, 'frame')} at {subject.frame_rate_hz:.3g} Hz "
        f"({subject.layout} layout); traces treated as {record.trace_type.kind} ({record.trace_type.reason})",
        f"CASCADE model {model.name} ({model.source}), threshold {settings.cascade_threshold}",
        f"grid {'x'.join(map(str, record.plan.grid.shape))}: {entries:,} entries "
        f"({counts.spike_pixels:,} spike pixels, {counts.marker_pixels:,} marker pixels, "
        f"{counts.collisions:,} collisions)",
        f"software {__version__}, run {record.run_id}, {record.attrs['created_utc']}",
        "",
        "Warnings:" if subject.warnings else "No warnings.",
        *(f"  - {w}" for w in subject.warnings),
    ]


# =============================================================================================
# 11. Driver: a run's context (signals, locks); resume; one subject as a sequence of stages; a run over many
# =============================================================================================

LOCK_DIRNAME = ".locks"
LOCK_HEARTBEAT_S = 60.0  # a live run touches its lock files this often
LOCK_STALE_S = 600.0  # a lock not touched for this long belongs to a dead run (any host)


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the run (BaseException: no subject's except clause swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT


class LockBusy(PipelineError):
    """Another live run holds the lock."""

    def __init__(self, name: str, holder: str):
        super().__init__(f"{name} is locked by {holder}")
        self.holder = holder


class RunContext:
    """This run's identity (host, pid, start), its subjects (which finished), and what it holds: lock files and
    deferred signals.

    Lock files are created atomically (O_CREAT | O_EXCL works on NFS and Lustre, unlike fcntl locks on
    many clusters) and touched by a heartbeat thread: a run on any host tells a live lock from a dead run's."""

    def __init__(self, output_dir: Path):
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.run_id = f"{self.host}-{self.pid}-{uuid.uuid4().hex[:8]}"
        self.lock_dir = output_dir / LOCK_DIRNAME
        self.held: set = set()
        self.subjects: list | None = None  # names of the subjects this run processes, once listed
        self.finished: list = []  # names of those done (computed, or up to date)
        self._signal, self._holding_signals, self._previous_handlers = None, False, {}
        self._ending = False  # stopping on a signal, or the run is over: later signals change nothing
        self._stop = threading.Event()
        threading.Thread(target=self._touch_locks, daemon=True).start()

    def install_signal_handlers(self) -> None:
        self._previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        # a signal blocked since start-up (see the top of the file) is delivered now, and stops the run here
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def restore_signal_handlers(self, handler=None) -> None:
        """The caller's handlers back (main() called from a notebook or a test), or ``handler``."""
        for signum, previous in self._previous_handlers.items():
            if (restored := previous if handler is None else handler) is not None:  # None: not set from Python
                signal.signal(signum, restored)

    def _on_signal(self, signum, _frame) -> None:
        self._signal = self._signal or signum  # the first one counts: a second Ctrl-C does not break the cleanup
        if not self._holding_signals:
            self.stop_if_signalled()

    def stop_if_signalled(self) -> None:
        """Raise Interrupted, once, if a signal came (a safe point)."""
        if self._signal is not None and not self._ending:
            self._ending = True
            raise Interrupted(self._signal)

    def end(self) -> None:
        """The run's outcome is decided: a signal from now on changes nothing (the exit status stays)."""
        self._ending = True

    @contextlib.contextmanager
    def signals_held(self):
        """Delay SIGTERM/SIGINT to the end of the block or its next safe point (see safe_points):
        an exception raised inside HDF5's or matplotlib's callbacks could be taken for a write error."""
        outer, self._holding_signals = self._holding_signals, True
        try:
            yield
        finally:
            self._holding_signals = outer
            if not outer:
                self.stop_if_signalled()

    def safe_points(self, items: Iterable) -> Iterator:
        """The items, stopping between two of them if a held signal is pending (long writes)."""
        for item in items:
            self.stop_if_signalled()
            yield item

    @contextlib.contextmanager
    def lock(self, name: str, wait_s: float = 0.0):
        """Hold lock ``name`` for the block, waiting up to ``wait_s`` for another run to free it."""
        path, deadline = self.lock_dir / f"{name}.lock", time.monotonic() + wait_s
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        while True:
            with self.signals_held():  # a lock file created is one this run knows it holds (and removes)
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    self.held.add(path)
                    break
                except FileExistsError:
                    holder = _lock_holder(path)
            if holder is None:
                remove_quietly(path)  # stale: its run is dead
                log.info("removed stale lock %s", path)
            elif time.monotonic() >= deadline:
                raise LockBusy(name, holder)
            else:
                time.sleep(0.5)
        started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(dict(host=self.host, pid=self.pid, run_id=self.run_id, started_utc=started_utc), handle)
            yield
        finally:
            self.held.discard(path)
            remove_quietly(path)

    def release_all(self) -> None:
        self._stop.set()
        for path in list(self.held):
            remove_quietly(path)
        self.held.clear()

    def _touch_locks(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            for path in list(self.held):
                with contextlib.suppress(OSError):
                    os.utime(path)


def _run_died(host, pid) -> bool:
    """A run of this host whose process is gone (other hosts' runs are judged by their files' age)."""
    import psutil

    return host == socket.gethostname() and not (isinstance(pid, int) and psutil.pid_exists(pid))


def _lock_holder(path: Path) -> str | None:
    """Who holds a lock file, or None when the lock is stale (its run is dead)."""
    try:
        record, age_s = json.loads(path.read_text()), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record, age_s = {}, 0.0  # being written right now, or unreadable: treat as live unless old
    if _run_died(record.get("host"), record.get("pid")) or age_s > LOCK_STALE_S:
        return None
    return f"run {record.get('run_id', '?')} on {record.get('host', '?')} (PID {record.get('pid', '?')}, since {record.get('started_utc', '?')})"


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temporaries of dead runs (this host: their process is gone; other hosts: a day old)."""
    pattern = re.compile(rf"\.(.+){re.escape(TEMPORARY_MARKER)}(.+)-(\d+)-[0-9a-f]{{8}}$")
    for path in itertools.chain(output_dir.glob(".*"), output_dir.glob("*/.*")):
        match = pattern.match(path.name)
        with contextlib.suppress(OSError):
            if match and (_run_died(match[2], int(match[3])) or time.time() - path.stat().st_mtime > 86400):
                remove_quietly(path)  # a file, or an export's folder (zapbench)
                log.info("removed %s, left by a run that died", path)


# --- resume: what made a subject's outputs, and whether they are still up to date --------------------------


def input_keys(paths) -> list:
    """Each input file's key in a fingerprint: its name, or <folder>/<name> where names repeat (suite2p's planes)."""
    names = [Path(p).name for p in paths]
    repeated = {name for name in names if names.count(name) > 1}
    return [f"{Path(p).parent.name}/{name}" if name in repeated else name for p, name in zip(paths, names)]


def input_signature(paths) -> dict:
    """{file key: [size, modification time in ns]} of the input files that exist."""
    return {
        key: [os.stat(p).st_size, os.stat(p).st_mtime_ns]
        for key, p in zip(input_keys(paths), paths)
        if os.path.exists(p)
    }


def changed_params(old: dict, params: dict) -> list:
    """The parameters whose value differs from those recorded in fingerprint ``old``."""
    return [key for key in params if old.get("params", {}).get(key) != params[key]]


def cascade_fingerprint(fingerprint: dict) -> dict:
    """The part of a subject's fingerprint that CASCADE's results depend on (not the grid's)."""
    return {key: fingerprint[key] for key in ("inputs", "cascade_params", "model", "software_version")}


@dataclass
class SubjectSummary:
    """What the end-of-run summary says about one subject (read back from its metadata if skipped)."""

    subject: str
    total_spikes: int  # COO entries, z markers included (the original's definition)
    spike_pixels: int
    marker_pixels: int
    total_pixels: int
    coo_file_bytes: int
    model: str
    model_source: str
    warnings: list
    seconds: float
    up_to_date: bool = False  # skipped: finished outputs matched this run

    @property
    def sparsity_percent(self) -> float:
        return 100.0 * self.total_spikes / max(self.total_pixels, 1)

    @classmethod
    def from_metadata(cls, attrs: dict) -> SubjectSummary:
        """The summary of a subject whose finished outputs were kept."""
        counts = [int(attrs[key]) for key in ("total_spikes", "spike_pixels", "marker_pixels", "total_pixels")]
        model = str(attrs["cascade_model"]), str(attrs["model_source"])
        warnings = [w for w in str(attrs.get("warnings", "")).split("; ") if w]
        seconds = float(attrs.get("total_s", 0.0))
        return cls(str(attrs["subject"]), *counts, int(attrs["coo_file_bytes"]), *model, warnings, seconds, True)

    @classmethod
    def of_run(cls, record: SubjectRun, seconds: float) -> SubjectSummary:
        built, model = record.grid, record.model
        total_pixels = int(np.prod(record.plan.grid.shape, dtype=np.int64))
        counts = (int(built.plane_entries.sum()), built.counts.spike_pixels, built.counts.marker_pixels)
        summary = (*counts, total_pixels, built.file_bytes)
        return cls(record.name, *summary, model.name, model.source, list(record.subject.warnings), seconds)


def subject_fingerprint(subject: SubjectData, config: PipelineConfig, model: CascadeModel) -> dict:
    """What made a subject's outputs: input files, the parameters that change outputs, model and software."""
    return {
        "inputs": input_signature(subject.source_files),
        "params": config.output_params(),
        "cascade_params": config.output_params("cascade"),
        "model": model.digest,  # digest of its weights and config
        "software_version": __version__,
    }


def outputs_out_of_date(out_dir: Path, fingerprint: dict, plots: bool, cell_activity: bool = True) -> str | None:
    """Why a subject's outputs must be (re)computed, or None when they are complete and match."""
    metadata = read_attrs(out_dir / METADATA_FILENAME)
    if metadata is None or "fingerprint" not in metadata:
        return "no finished outputs"
    for filename in (COO_FILENAME, CELL_ACTIVITY_FILENAME)[: 1 + cell_activity]:
        written = read_attrs(out_dir / filename)
        if written is None or written.get("run_id") != metadata.get("run_id"):
            return "outputs incomplete"
    if plots and not (out_dir / pdf_filename(out_dir.name)).is_file():
        return "PDF missing"
    old, version = json.loads(metadata["fingerprint"]), fingerprint["software_version"]
    if old.get("software_version") != version:
        return f"software version changed ({old.get('software_version')} -> {version})"
    old_inputs, inputs = old.get("inputs", {}), fingerprint["inputs"]
    if changed := sorted(name for name in old_inputs.keys() | inputs if old_inputs.get(name) != inputs.get(name)):
        return f"input files changed ({', '.join(changed)})"
    if changed := changed_params(old, fingerprint["params"]):
        return "parameters changed (" + ", ".join(f"--{key}" for key in changed) + ")"
    return "CASCADE model changed" if old.get("model") != fingerprint["model"] else None


TRACE_SAMPLE_CELLS, TRACE_SAMPLE_RUNS = 2000, 8  # cells that decide the trace type, in runs of neighbours


def subject_trace_type(subject: SubjectData, trace_type_option: str) -> TraceType:
    """--trace_type, or decided from a sample of up to 2,000 cells: 8 runs of neighbours spread over the subject,
    so that the parent reads a few of the file's chunks instead of decompressing every one (6 s for a whole fish)."""
    if trace_type_option != "auto":
        return TraceType(trace_type_option, "set by --trace_type")
    if subject.trace_type_reason:  # the layout says (suite2p's F, CaImAn's F_dff, NWB's DfOverF or Fluorescence)
        return TraceType(subject.trace_type_hint, subject.trace_type_reason)
    run_cells = min(subject.num_cells, TRACE_SAMPLE_CELLS) // TRACE_SAMPLE_RUNS or subject.num_cells
    firsts = np.linspace(0, subject.num_cells - run_cells, TRACE_SAMPLE_RUNS).astype(int)
    sample_rows = np.unique((firsts[:, None] + np.arange(run_cells)).ravel())
    return decide_trace_type(subject.trace_file.read_rows(sample_rows), subject.trace_type_hint)


def plot_candidates(num_cells: int, seed: int) -> np.ndarray:
    """The PLOT_CELLS_MAX cells whose traces workers send back, in a seeded random order (the PDF shows the first)."""
    rng = np.random.default_rng([seed, 7])
    return rng.choice(num_cells, size=min(PLOT_CELLS_MAX, num_cells), replace=False)


SCRATCH_RATES, SCRATCH_DFF = "cell_rates.scratch", "cell_dff.scratch"  # beside a subject's outputs, while it runs


def scratch_path(out_dir: Path, name: str) -> Path:
    """A scratch array's file: a temporary of this run in the subject's folder (removed when the subject ends)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return temporary_path(out_dir / name)


def infer_subject(subject, model, settings: InferenceSettings, batch_size: int, pool: WorkerPool,
                  scratch: tuple = (None, None)) -> SubjectSpikes:  # fmt: skip
    """CASCADE over the subject's cells in batches (at least one per worker) across the pool. ``scratch``: the
    (rates, dF/F) ScratchArrays the workers fill, or None where this run needs none."""
    plot_rows = np.sort(plot_candidates(subject.num_cells, settings.seed))
    # a multiple of --workers batches of equal size, none above --batch_size: every worker stays busy
    num_batches = pool.workers * math.ceil(math.ceil(subject.num_cells / batch_size) / pool.workers)
    batch_cells = math.ceil(subject.num_cells / num_batches)
    starts = range(0, subject.num_cells, batch_cells)
    stops = [min(start + batch_cells, subject.num_cells) for start in starts]
    in_plot = [plot_rows[(plot_rows >= start) & (plot_rows < stop)] for start, stop in zip(starts, stops)]
    tasks = (
        BatchTask(
            subject.trace_file,
            start,
            stop,
            subject.cell_ids[start:stop],
            rows,
            model.folder,
            model.source,
            settings,
            pool.threads_per_worker,
            *scratch,
        )  # fmt: skip
        for start, stop, rows in zip(starts, stops, in_plot)
    )
    progress = Progress(subject.name, len(starts), subject.num_frames, pool.workers)
    try:
        batches = pool.map(tasks, progress)
    finally:
        progress.close()
    time_base = TimeBase(subject.frame_rate_hz, subject.num_frames, settings.target_rate_hz)
    return SubjectSpikes(batches, time_base.num_timepoints, subject.num_frames, *scratch)


def dff_scratch(subject: SubjectData, trace_type: TraceType, settings: InferenceSettings, path: Path) -> ScratchArray:
    """(frames, cells) dF/F of every cell as the workers make it, streamed once from the traces: the NWB file's,
    when CASCADE's saved results are re-gridded (a CASCADE run has its workers write it)."""
    dff = ScratchArray.create(path, (subject.num_frames, subject.num_cells), "float32")
    for first in range(0, subject.num_cells, CELLS_PER_CHUNK):
        traces = subject.trace_file.read(first, min(first + CELLS_PER_CHUNK, subject.num_cells))
        if trace_type.kind == "fluorescence":
            traces = compute_dff(
                traces, subject.frame_rate_hz, settings.baseline_window_s, settings.baseline_percentile
            )
        dff.write_columns(first, traces)
    return dff


def run_cascade(record: SubjectRun, config: PipelineConfig, pool: WorkerPool, scratch: tuple) -> None:
    """Stage: CASCADE's saved results when only grid parameters changed, else dF/F -> CASCADE -> spikes
    over the worker pool. Fills the record's trace type, inference settings and spikes; the rates (for
    cell_activity.h5 and the NWB file) and dF/F (for the NWB file) go to the ``scratch`` (rates, dF/F) paths
    (None: not needed), not to memory."""
    subject, started = record.subject, time.perf_counter()
    engine = choose_engine(config.engine).name
    inference = settings_for(InferenceSettings, config, is_fluorescence=False, frame_rate_hz=subject.frame_rate_hz,
                             engine=engine)  # fmt: skip
    try:
        _cascade_or_saved(record, config, pool, inference, scratch)
    except OSError as exc:  # the scratch arrays (a worker's write comes back as its OSError): a full disk
        raise WriteFailed(f"cannot write to {record.out_dir}: {describe_os_error(exc, record.out_dir)}") from None
    record.timings["inference_s"] = time.perf_counter() - started


def _cascade_or_saved(record: SubjectRun, config: PipelineConfig, pool: WorkerPool, inference, scratch: tuple):
    """run_cascade's two ways: the saved results read back, or the workers."""
    subject, started, (rates_path, dff_path) = record.subject, time.perf_counter(), scratch
    saved = None
    if not config.overwrite:
        saved = read_cell_activity(record.out_dir / CELL_ACTIVITY_FILENAME, record.fingerprint, rates_path)
    if saved is not None:
        log.info(f"{subject.name}: re-gridding CASCADE's saved results ({CELL_ACTIVITY_FILENAME}): CASCADE not rerun")
        record.spikes, record.trace_type = saved
        if dff_path is not None:
            record.spikes.dff = dff_scratch(subject, record.trace_type, inference, dff_path)
    else:
        record.trace_type = subject_trace_type(subject, config.trace_type)
        log.info(f"{subject.name}: traces treated as {record.trace_type.kind} ({record.trace_type.reason})")
        record.inference = dataclasses.replace(inference, is_fluorescence=record.trace_type.kind == "fluorescence")
        time_base, cells = record.time_base, subject.num_cells
        scratch = (
            rates_path and ScratchArray.create(rates_path, (time_base.num_timepoints, cells), "float16"),
            dff_path and ScratchArray.create(dff_path, (subject.num_frames, cells), "float32"),
        )
        record.spikes = infer_subject(subject, record.model, record.inference, config.batch_size, pool, scratch)
        seconds = time.perf_counter() - started
        rate = subject.num_cells * subject.num_frames / max(seconds, 1e-9)
        log.info(f"{subject.name}: CASCADE in {seconds:.1f} s ({rate:.0f} neuron-frames/s); RSS {rss_gb():.2f} GB")


IMPLAUSIBLE_NOISE_LEVEL = 100  # CASCADE's models span noise levels 1-9: a median of 100 is not dF/F


def check_inferred_traces(subject: SubjectData, spikes: SubjectSpikes, trace_type: str = "") -> None:
    """Doubts that only the traces reveal (read by the workers): refuse or record a warning."""
    valid, path = spikes.valid, f"{subject.trace_file.path}: {subject.trace_file.dataset}"
    if not valid.any():
        raise PipelineError(f"{path}: every trace value is NaN")
    low, high = spikes.cells.min_value, spikes.cells.max_value
    constant = valid & (low == high)
    if constant[valid].all():
        raise PipelineError(f"{path}: every trace is constant (e.g. all {low[valid][0]:g}), expected activity")
    if infinite := int(spikes.cells.infinite_values.sum()):
        subject.warn(f"{plural(infinite, 'infinite trace value')} treated as missing (NaN)")
    have = {True: "has", False: "have"}  # the verb after plural(n, 'cell'), by n == 1
    if dead := int((~valid).sum()):
        subject.warn(f"{plural(dead, 'cell')} {have[dead == 1]} all-NaN traces and are left out")
    if partial := int(((spikes.cells.nan_frames > 0) & valid).sum()):
        subject.warn(
            f"{plural(partial, 'cell')} {have[partial == 1]} some NaN frames (no spikes in windows touching them)"
        )
    if flat := int(constant.sum()):
        subject.warn(
            f"{plural(flat, 'cell')} {have[flat == 1]} constant traces (e.g. all {low[constant][0]:g}): they cannot spike"
        )
    varying = valid & ~constant
    bound, label = {"dff": (-1, "dF/F"), "fluorescence": (0, "raw fluorescence")}.get(trace_type, (-np.inf, ""))
    below = int((low[varying] < bound).sum())  # dF/F >= -1 and raw F >= 0
    if below > 0.01 * varying.sum():
        subject.warn(
            f"{plural(below, 'cell')} treated as {label} {'goes' if below == 1 else 'go'} below {bound} (down to {low[varying].min():.3g}), impossible "
            f"for {label}: background-subtracted or z-scored data? (set --trace_type)"
        )
    if (level := float(np.nanmedian(spikes.cells.noise_level[varying]))) > IMPLAUSIBLE_NOISE_LEVEL:
        subject.warn(
            f"median CASCADE noise level {level:.0f} is far above the models' (1-9): traces treated as "
            f"{label or trace_type} do not look like {label or trace_type} (set --trace_type)"
        )


OUTSIDE_ATLAS_REFUSE_FRACTION = 0.1  # more cells than this outside the atlas: not voxel indices into it


def check_atlas_extent(subject: SubjectData, grid: GridSpec, settings: GridSettings) -> None:
    """With the atlas frame, cells outside --atlas_shape get no spikes: a few is a doubt (registration
    failures), more than a tenth means the positions are not voxel indices into that atlas (refused)."""
    if grid.cells_outside is None or not (outside := int(grid.cells_outside.sum())):
        return
    positions, shape = subject.positions, "x".join(map(str, settings.atlas_shape))
    found = ", ".join(f"{axis} {positions[:, i].min():g}..{positions[:, i].max():g}" for i, axis in enumerate("xyz"))
    if outside > OUTSIDE_ATLAS_REFUSE_FRACTION * subject.num_cells:
        raise PipelineError(
            f"{outside} of {subject.num_cells} registered positions (CellXYZ_norm) lie outside the atlas extent {shape} "
            f"(found {found}), expected 1-based voxel indices into it: set --atlas_shape to the atlas they index, "
            "or use --coordinates raw"
        )
    subject.warn(
        f"{outside} of {subject.num_cells} cells {'lies' if outside == 1 else 'lie'} outside the atlas extent {shape} (registration failed?): "
        "they are left out of the grid (voxel_zxy -1)"
    )


def check_split(subject: SubjectData, plan: GridPlan, settings: GridSettings) -> None:
    """The original's block split is kept (the same T gives the same split), but a split that leaves
    less than half of the timepoints (or less than --split_ratio) for training is a doubt. --split conditions
    on a subject without conditions falls back to blocks, a doubt."""
    if settings.split == "conditions" and subject.covariates.condition is None:
        subject.warn("--split conditions: the subject has no stimulus conditions (timelists): split in blocks instead")
    if settings.split == "zapbench" and subject.covariates.condition is None:
        subject.warn("--split zapbench: the subject has no stimulus conditions (timelists): one segment, split once")
    total, train = len(plan.is_train), int(plan.is_train.sum())
    by_blocks_alone = plan.split_rule.startswith("blocks") and not settings.holdout_condition
    if not by_blocks_alone or train >= total * min(0.5, settings.split_ratio):
        return
    blocks = max(2, round(1 / (1 - settings.split_ratio))) if settings.split_ratio < 1 else 20
    subject.warn(
        f"the train/test split leaves {train} of {total} timepoints for training ({max(1, total // settings.split_block)}"
        f" block(s) of --split_block {settings.split_block}, at least one of them test): --split_block "
        f"{max(1, total // blocks)} would train on about {1 - 1 / blocks:.0%}"
    )


def process_subject(folder: Path, config: PipelineConfig, pool: WorkerPool, run: RunContext) -> SubjectSummary:
    """One subject, stage by stage: load -> model -> skip if up to date -> CASCADE (or its saved results)
    -> check the traces -> plan the grid -> check the split -> build the grid -> write the files."""
    started = time.perf_counter()
    subject = load_subject(folder, settings_for(LoadOptions, config))
    record = SubjectRun(subject, Path(config.output_dir) / subject.name, run.run_id, config.as_attrs())
    record.time_base = TimeBase(subject.frame_rate_hz, subject.num_frames, config.target_rate_hz)
    log.info(f"{subject.name}: {plural(subject.num_cells, 'cell')} x {plural(subject.num_frames, 'frame')} at "
             f"{subject.frame_rate_hz:.3g} Hz ({subject.layout} layout)")  # fmt: skip
    record.model = model_for_subject(subject, settings_for(ModelRequest, config))
    record.fingerprint = subject_fingerprint(subject, config, record.model)
    reason = (
        "--overwrite"
        if config.overwrite
        else outputs_out_of_date(record.out_dir, record.fingerprint, config.plots, config.cell_activity)
    )
    if reason is None:
        log.info(f"{subject.name}: outputs up to date (same inputs, parameters, model and software): skipped")
        write_exports(record.out_dir, config)
        return SubjectSummary.from_metadata(read_attrs(record.out_dir / METADATA_FILENAME))
    log.info(f"{subject.name}: computing ({reason})")
    record.timings["load_s"] = time.perf_counter() - started
    existed = record.out_dir.exists()
    scratch = (
        scratch_path(record.out_dir, SCRATCH_RATES) if config.cell_activity or config.nwb else None,
        scratch_path(record.out_dir, SCRATCH_DFF) if config.nwb else None,
    )
    try:
        run_cascade(record, config, pool, scratch)
        check_inferred_traces(subject, record.spikes, record.trace_type.kind)
        stage_started, grid_settings = time.perf_counter(), settings_for(GridSettings, config)
        record.plan = plan_grid(
            subject.positions, record.spikes.valid, record.time_base, record.model, grid_settings, record.covariates
        )
        check_atlas_extent(subject, record.plan.grid, grid_settings)
        check_split(subject, record.plan, grid_settings)
        record.attrs = subject_attrs(record)
        with run.signals_held():  # HDF5 in memory and on disk: see RunContext.signals_held
            record.grid = build_grid(record, run.safe_points)
            record.timings["grid_s"] = time.perf_counter() - stage_started
            settings = [output.settings and settings_for(output.settings, config) for output in SUBJECT_OUTPUTS]
            write_subject(record, settings)
    finally:
        for path in filter(None, scratch):
            remove_quietly(path)
        if not existed and record.out_dir.is_dir() and not any(record.out_dir.iterdir()):
            record.out_dir.rmdir()  # a subject refused after CASCADE leaves no empty folder
    write_exports(record.out_dir, config)
    summary = SubjectSummary.of_run(record, time.perf_counter() - started)
    log.info(f"{subject.name}: {plural(summary.total_spikes, 'active voxel')} ({summary.spike_pixels} spike, "
             f"{summary.marker_pixels} marker) in a {'x'.join(map(str, record.plan.grid.shape))} grid, written to "
             f"{record.out_dir} in {summary.seconds:.1f} s; RSS {rss_gb():.2f} GB")  # fmt: skip
    return summary


# --- a run over many subjects: shards, combine, summary ------------------------------------------


def resolve_shard(shard: tuple | None, environ=os.environ) -> tuple | None:
    """--shard K/N, else the SLURM array task's place in its array, else None (all subjects)."""
    if shard is not None or "SLURM_ARRAY_TASK_ID" not in environ:
        return shard
    try:
        task, first = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(environ.get("SLURM_ARRAY_TASK_COUNT") or int(environ["SLURM_ARRAY_TASK_MAX"]) - first + 1)
    except (KeyError, ValueError) as exc:
        raise PipelineError(
            f"cannot read the SLURM array task from the environment ({exc}); pass --shard K/N"
        ) from None
    return task - first + 1, count


def subject_size(folder: Path) -> int:
    """cells x frames of a subject, by its layout (0 when it cannot be read: it will fail with its own error)."""
    layouts = layouts_in(folder)
    return layouts[0].size(folder) if layouts else 0


def select_shard(subjects: list, shard: tuple | None) -> list:
    """The K-th of N deterministic parts of the subject list, balanced by size (cells x frames):
    largest first, each to the lightest part so far (ties: lower part). Natural order within."""
    if shard is None:
        return subjects
    sizes = [subject_size(folder) for folder in subjects]
    loads, parts = [0] * shard[1], [[] for _ in range(shard[1])]
    for index in sorted(range(len(subjects)), key=lambda i: -sizes[i]):  # a stable sort: ties keep list order
        lightest = loads.index(min(loads))
        loads[lightest] += max(sizes[index], 1)
        parts[lightest].append(index)
    return [subjects[index] for index in sorted(parts[shard[0] - 1])]


@dataclass
class RunOutcome:
    """What happened to each subject of a run."""

    done: list = dataclasses.field(default_factory=list)  # SubjectSummary (computed or up to date)
    failed: dict = dataclasses.field(default_factory=dict)  # name -> reason
    not_processed: list = dataclasses.field(default_factory=list)  # names, after a stop
    locked: dict = dataclasses.field(default_factory=dict)  # name -> holder


def run_subjects(subjects: list, config: PipelineConfig, run: RunContext) -> RunOutcome:
    """Each subject under its lock; one bad subject never stops the others, a full disk does."""
    outcome, pool = RunOutcome(), WorkerPool(config.workers)
    try:
        for index, folder in enumerate(subjects):
            name = folder.name
            try:
                with run.lock(name):
                    outcome.done.append(process_subject(folder, config, pool, run))
                    run.finished.append(name)
            except LockBusy as busy:
                outcome.locked[name] = busy.holder
                log.warning("%s: skipped, locked by %s", name, busy.holder)
            except WriteFailed as exc:
                outcome.failed[name] = str(exc)
                log.error("%s: %s; stopping: the remaining subjects were not processed", name, exc)
                outcome.not_processed = [later.name for later in subjects[index + 1 :]]
                return outcome
            except PipelineError as exc:
                outcome.failed[name] = str(exc)
                log.error("%s: %s", name, exc)
            except MemoryError:
                outcome.failed[name] = "out of memory"
                log.error("%s: out of memory; lower --workers or ask for more memory", name)
            except Exception as exc:  # our bug: one bad subject must not stop the others
                outcome.failed[name] = f"{type(exc).__name__}: {exc}"
                log.error(
                    f"{name}: unexpected {outcome.failed[name]} (a bug: please report it; run with --verbose for the traceback)"
                )
                log.debug("traceback", exc_info=True)
    except Interrupted:
        pool.close(kill=True)  # the workers ignore the signal: see child_processes_deaf
        raise
    finally:
        pool.close()
    return outcome


def combine_outputs(config: PipelineConfig, run: RunContext) -> dict:
    """combined_metadata.h5 over the subject folders whose outputs match this run's parameters;
    the others are named in a WARNING and in the file's `excluded` attribute."""
    output_dir, wanted = Path(config.output_dir), config.output_params()
    folders = sorted(
        (p for p in output_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: _natural_key(p.name),
    )
    reasons = {folder: _combine_exclusion(folder, wanted) for folder in folders}
    included = [folder for folder, reason in reasons.items() if reason is None]
    excluded = {folder.name: reason for folder, reason in reasons.items() if reason}
    if excluded:
        log.warning("combined_metadata.h5 leaves out " + "; ".join(f"{name} ({why})" for name, why in excluded.items()))
    with run.lock("combined_metadata", wait_s=300), run.signals_held():  # see signals_held
        totals = write_combined_metadata(output_dir, included, excluded)
    return dict(totals, subjects=[folder.name for folder in included])


def _combine_exclusion(folder: Path, wanted: dict) -> str | None:
    """Why a subject folder is left out of combined_metadata.h5 ('' if it is no subject folder)."""
    metadata = read_attrs(folder / METADATA_FILENAME)
    if metadata is None:
        outputs = (folder / output.filename(folder.name) for output in SUBJECT_OUTPUTS)
        is_subject = re.fullmatch(r"subject_\d+", folder.name) or any(path.exists() for path in outputs)
        return "no finished outputs" if is_subject else ""
    try:
        fingerprint = json.loads(metadata["fingerprint"])
    except (KeyError, ValueError):
        return "made by an older version without a fingerprint"
    if changed := changed_params(fingerprint, wanted):
        return "other parameters: " + ", ".join(f"--{k}" for k in changed)
    if fingerprint.get("software_version") != __version__:
        return f"made by version {fingerprint.get('software_version')}"
    sources = [s for part in np.atleast_1d(metadata.get("source_files", [])) for s in str(part).split(",") if s]
    now = input_signature(sources)
    changed = [key for key in input_keys(sources) if now.get(key) != fingerprint["inputs"].get(key)]
    return f"input {', '.join(changed)} changed or missing since" if changed else None


# --- --inspect: what a run would do, without CASCADE and without writing -----------------------------------
# Peak memory = the main process's peak + each worker's peak (they peak at different stages: a bound within 2x).
# Peak RSS (psutil, every 0.05 s), 2-core AVX-512 EPYC, builtin model, PDF included:
#   sample_data/ (1.65 M neuron-frames; version 1.2.0 + issue 27): main 0.34 GB with --workers 2; a worker 0.94 GB
#     (tensorflow), 0.13 GB (numpy); the whole tree 1.28 / 2.21 GB (tensorflow, --workers 1 / 2), 0.38 / 0.58 GB
#     (numpy). Estimates: 1.27 / 2.17 GB and 0.50 / 0.64 GB.
#   a whole fish (90,000 cells x 4,000 frames, batches of 30,000 cells, --workers 2; benchmarks/RESULTS_pipeline.md,
#     issue 20 third part, 6f80809): main 2.72 GB, a worker 2.65 GB (tensorflow) / 1.67 GB (numpy), the tree
#     6.10 / 3.81 GB (6.8 GB was seen with tensorflow since; --workers 1, before 6f80809: 4.56 GB). Estimates: 8.0 /
#     6.1 GB (5.4 GB).
#   the same whole fish after issue 27 (rates through scratch arrays, 1,024-cell chunks, trimmed idle workers; 2-core
#     Intel Xeon): main 1.69 GB, a worker 1.94 GB (tensorflow), the tree 3.93 GB; estimate 5.6 GB. With spike_zxy
#     (issue 26: 3 bytes an entry more in the COO file built in memory): main 1.88 GB, the tree 4.12 GB.
# Remeasure these when the memory of the stages changes: other machines, models and inputs differ.
MAIN_BASE_GB = 0.35  # the main process before its subject (numpy, h5py, the module; no TensorFlow)
MAIN_BYTES_PER_NEURON_FRAME = 3.7  # the main's growth: the batches' spikes, the grid and its files (rates on disk)
WORKER_BASE_GB = {"tensorflow": 0.9, "numpy": 0.13}  # a worker with its engine loaded (--workers 1: in the main)
WORKER_BYTES_PER_NEURON_FRAME = {"tensorflow": 11.6, "numpy": 12.8}  # a worker's growth per neuron-frame of its batch
# Time: an engine's multiply-adds/s as a fraction of the host's float32 matrix-product rate (benchmark_engine.py in
# benchmarks/RESULTS_inference.md), and the whole run's neuron-frames/s as a fraction of the engine's
# (benchmark_overhead.py in benchmarks/RESULTS_pipeline.md), so that the estimate follows the host it runs on.
ENGINE_MATMUL_FRACTION = {"tensorflow": 0.95, "numpy": 0.8}
PIPELINE_ENGINE_FRACTION = 0.75


def matmul_rate() -> float:
    """This host's float32 matrix-product rate (multiply-adds/s, numpy, every core; conv 2's shape; ~0.1 s)."""
    rng = np.random.default_rng(0)
    a, b = rng.random((8192, 600), np.float32), rng.random((600, 80), np.float32)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return a.shape[0] * a.shape[1] * b.shape[1] / best


@dataclass
class Inspection:
    """What --inspect found for one subject."""

    name: str
    subject: SubjectData | None = None
    model: CascadeModel | None = None
    trace_type: TraceType | None = None
    refusal: str = ""

    def peak_gb(self, workers: int, batch_size: int, engine: str = "tensorflow") -> float:
        """All processes together (--workers 1: the one worker is the main process), by the figures above."""
        if self.subject is None:
            return 0.0
        cells, frames = self.subject.num_cells, self.subject.num_frames
        batch = min(batch_size, math.ceil(cells / workers))
        worker = WORKER_BASE_GB[engine] + WORKER_BYTES_PER_NEURON_FRAME[engine] * batch * frames / 1e9
        return MAIN_BASE_GB + MAIN_BYTES_PER_NEURON_FRAME * cells * frames / 1e9 + workers * worker

    def seconds(self, engine_multiply_adds_per_s: float) -> float:
        """The whole run on this subject, whatever --workers (they share the cores)."""
        if self.subject is None or self.model is None:
            return 0.0
        size = self.subject.num_cells * self.subject.num_frames
        return size * self.model.multiply_adds_per_frame / engine_multiply_adds_per_s / PIPELINE_ENGINE_FRACTION


def inspect_subject(folder: Path, config: PipelineConfig) -> Inspection:
    """Load, choose the model, decide the trace type and plan the grid as the run would (no CASCADE)."""
    found = Inspection(folder.name)
    try:
        found.subject = subject = load_subject(folder, settings_for(LoadOptions, config))
        found.model = model_for_subject(subject, settings_for(ModelRequest, config))
        found.trace_type = subject_trace_type(subject, config.trace_type)
        grid_settings = settings_for(GridSettings, config)
        valid = np.ones(subject.num_cells, bool)  # the run leaves out all-NaN cells, known only after reading
        time_base = TimeBase(subject.frame_rate_hz, subject.num_frames, config.target_rate_hz)
        covariates = time_base.resample_covariates(subject.covariates)
        plan = plan_grid(subject.positions, valid, time_base, found.model, grid_settings, covariates)
        check_atlas_extent(subject, plan.grid, grid_settings)
        check_split(subject, plan, grid_settings)
    except PipelineError as exc:
        found.refusal = str(exc)
    return found


def _about(seconds: float) -> str:
    """A run time as --inspect says it: '<1 s', '40 s', '12 min' (a sample's seconds are not '0 min')."""
    return "<1 s" if seconds < 1 else f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def inspect_lines(found: list, config: PipelineConfig) -> list:
    """The --inspect report: a line per subject and its doubts, then totals and suggestions."""
    engine = choose_engine(config.engine)
    speed = ENGINE_MATMUL_FRACTION[engine.name] * matmul_rate()
    lines = [
        f"this host: float32 matrix products at {speed / ENGINE_MATMUL_FRACTION[engine.name] / 1e9:.0f} G "
        f"multiply-adds/s; engine {engine.name} ({engine.why}), expected at {speed / 1e9:.0f} G",
        "subject | layout | cells (accepted / stored) | frames | rate Hz | duration min | traces | model (rate mismatch) | peak GB | time",
    ]
    for f in found:
        s = f.subject
        if s is not None:
            model = f"{f.model.name} ({rate_mismatch(f.model, s.frame_rate_hz):.0%})" if f.model else "-"
            kind = f"{f.trace_type.kind} ({f.trace_type.reason})" if f.trace_type else "-"
            lines.append(
                f"{f.name} | {s.layout} | {s.num_cells:,} / {s.stored_cells or s.num_cells:,} | {s.num_frames:,} | "
                f"{s.frame_rate_hz:.3g} | {s.num_frames / s.frame_rate_hz / 60:.1f} | {kind} | {model} | "
                f"{f.peak_gb(config.workers, config.batch_size, engine.name):.1f} | {_about(f.seconds(speed))}"
            )
            lines += [f"  ! WARNING: {w}" for w in s.warnings]
        lines += [f"{f.name}: REFUSED: {f.refusal}"] * bool(f.refusal)
    ok = [f for f in found if not f.refusal]
    refused = f"{plural(len(found), 'subject')} ({len(found) - len(ok)} refused)"
    if not ok:  # no --mem=0G: there is nothing to size
        return [*lines, f"Totals: {refused}: nothing would run; fix the refusals above"]
    cpus, memory_gb = available_cpus(), _available_memory_gb()

    def peak(workers: int) -> float:
        return max(f.peak_gb(workers, config.batch_size, engine.name) for f in ok)

    workers = max([w for w in range(1, cpus + 1) if peak(w) <= 0.8 * memory_gb] or [1])
    lines += [
        f"Totals: {refused}, {sum(f.subject.num_cells * f.subject.num_frames for f in ok):,} neuron-frames; about "
        f"{_about(sum(f.seconds(speed) for f in ok))} with --workers {workers} (peak {peak(workers):.1f} GB; this "
        f"machine: {plural(cpus, 'CPU')}, {memory_gb:.0f} GB available)",
        f"Suggested: --workers {workers}; SLURM --mem={math.ceil(1.2 * peak(workers))}G --cpus-per-task={cpus} "
        "(estimates: this host's matrix-product rate and the fractions in docs/performance.md, memory as measured "
        "in benchmarks/RESULTS_pipeline.md; doubts that only the traces reveal are found by the run)",
    ]
    return lines


def _available_memory_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 1e9


def inspect_run(config: PipelineConfig, shard: tuple | None = None) -> int:
    """--inspect: the report, and the exit status the run would have (1 when a subject would be refused)."""
    subjects = select_shard(find_subjects(config.input_dir, config.subjects, config.skip), shard)
    if not subjects:
        raise PipelineError(f"no subject folders under {config.input_dir} (or its Subjects/ folder)")
    if config.model_dir or config.cascade_model.lower() not in (AUTO_MODEL_KEYWORD, BUILTIN_MODEL_KEYWORD):
        settings_for(ModelRequest, config).resolve()  # as the run: a missing model is exit 2
    found = [inspect_subject(folder, config) for folder in subjects]
    for line in inspect_lines(found, config):
        log.info(line)
    return 1 if any(f.refusal for f in found) or not found else 0


def run_pipeline(config: PipelineConfig, shard: tuple | None = None, run: RunContext | None = None) -> int:
    """Process the subjects (or this shard's share); returns the exit status (see --help)."""
    output_dir = Path(config.output_dir)
    run = run or RunContext(output_dir)
    try:
        remove_stale_temporaries(output_dir)
        if config.combine_only:
            run.subjects = []
            totals = combine_outputs(config, run)
            metadata = [read_attrs(output_dir / name / METADATA_FILENAME) for name in totals["subjects"]]
            outcome = RunOutcome(done=[SubjectSummary.from_metadata(attrs) for attrs in metadata])
        else:
            engine = choose_engine(config.engine)
            log.info(f"CASCADE engine: {engine.name}, {CASCADE_ENGINES[engine.name].description} ({engine.why})")
            if config.workers > 1:  # the parent will mostly wait: start the workers' imports and its own now
                start_fork_server(CASCADE_ENGINES[engine.name].needs_tensorflow)
                if config.plots:
                    threading.Thread(target=_import_matplotlib).start()
            subjects = find_subjects(config.input_dir, config.subjects, config.skip)
            if not subjects:
                raise PipelineError(
                    f"no subject folders under {config.input_dir} (or its Subjects/ folder): expected folders "
                    "holding " + " or ".join(layout.files.split(" (")[0] for layout in INPUT_LAYOUTS)
                )
            if config.model_dir or config.cascade_model.lower() not in (AUTO_MODEL_KEYWORD, BUILTIN_MODEL_KEYWORD):
                settings_for(ModelRequest, config).resolve()  # a missing or misspelt model stops the run here (exit 2)
            mine = select_shard(subjects, shard)
            run.subjects = [folder.name for folder in mine]
            log.info(
                f"unified_spike_processing_coo {__version__}: {len(mine)} of {plural(len(subjects), 'subject')}"
                + (f" (shard {shard[0]}/{shard[1]})" if shard else "")
                + f" from {config.input_dir} -> {output_dir} ({plural(config.workers, 'worker')}, batches of up to {plural(config.batch_size, 'cell')})"
            )
            outcome = run_subjects(mine, config, run)
            combine = shard is None and outcome.done and not outcome.not_processed
            totals = combine_outputs(config, run) if combine else {}
        for line in summary_lines(outcome, totals):
            log.info(line)
        return 1 if (outcome.failed or outcome.not_processed or outcome.locked) else 0
    finally:
        run.release_all()


def interruption_line(stop: Interrupted, run: RunContext, config: PipelineConfig, shard: tuple | None) -> str:
    """The line an interrupted run ends with: the signal, the subjects finished (computed, up to date, or with this
    run's commit record in place: a signal held during its writes stops the run just after) and the others."""
    names = run.subjects
    if names is None:  # stopped during start-up: the subjects it would have processed
        with contextlib.suppress(PipelineError, OSError):
            names = [
                folder.name
                for folder in select_shard(find_subjects(config.input_dir, config.subjects, config.skip), shard)
            ]
    names, output_dir = names or [], Path(config.output_dir)
    committed = lambda name: (read_attrs(output_dir / name / METADATA_FILENAME) or {}).get("run_id") == run.run_id
    finished = [name for name in names if name in run.finished or committed(name)]
    unfinished = [name for name in names if name not in finished]
    return f"interrupted by {stop}: finished {', '.join(finished) or 'none'}; not finished: {', '.join(unfinished) or 'none'}"


def _format_bytes(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(num_bytes) < 1000 or unit == "TB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000


def summary_lines(outcome: RunOutcome, totals: dict) -> list:
    """The end-of-run summary, in the original's form but with honest memory figures."""
    done, lines = outcome.done, ["", "=" * 72]
    fallbacks: dict = {}  # reason -> builtin models: one line however many builtin models stood in
    for model, source in dict.fromkeys((s.model, s.model_source) for s in done):
        if source.startswith(FALLBACK_SOURCE_PREFIX):
            fallbacks.setdefault(source[len(FALLBACK_SOURCE_PREFIX) : -1], []).append(model)
        else:
            lines.append(f"CASCADE model: {model} ({source})")
    lines += [
        f"! WARNING: builtin CASCADE {'model' if len(models) == 1 else 'models'} {', '.join(models)} used as a "
        f"FALLBACK ({reason}; see the log)"
        for reason, models in fallbacks.items()
    ]
    lines.append("Processed subjects:")
    for s in done:
        coo_bytes = COO_BYTES_PER_ENTRY * s.total_spikes
        lines += [
            f"{s.subject}: {s.total_spikes:,} active voxels of {s.total_pixels:,} ({s.spike_pixels:,} spike pixels, "
            f"{s.marker_pixels:,} z-marker pixels; model {s.model}, "
            + ("up to date, skipped)" if s.up_to_date else f"{s.seconds:.1f} s)"),
            f"  → Sparsity: {s.sparsity_percent:.4f}% of voxels active",
            f"  → Memory savings vs dense: ~{100.0 * (1 - coo_bytes / s.total_pixels):.2f}% in memory "
            f"({_format_bytes(coo_bytes)} COO at {COO_BYTES_PER_ENTRY} B/entry vs {_format_bytes(s.total_pixels)} "
            f"dense uint8), ~{100.0 * (1 - s.coo_file_bytes / s.total_pixels):.2f}% on disk ({_format_bytes(s.coo_file_bytes)})",
        ]
        lines += [f"  ! WARNING: {w}" for w in s.warnings if not w.startswith("model fallback")]
    lines += [f"{name}: FAILED: {reason}" for name, reason in outcome.failed.items()]
    lines += [f"{name}: SKIPPED: locked by {holder}" for name, holder in outcome.locked.items()]
    lines += [f"{name}: NOT PROCESSED (the run stopped)" for name in outcome.not_processed]
    total_spikes, total_pixels = sum(s.total_spikes for s in done), sum(s.total_pixels for s in done)
    coo_bytes, file_bytes = COO_BYTES_PER_ENTRY * total_spikes, sum(s.coo_file_bytes for s in done)
    lines += [
        "",
        "Summary:",
        f"  Subjects: {len(done)} done ({sum(s.up_to_date for s in done)} already up to date), {len(outcome.failed)} failed",
        f"  Total spikes (active voxels): {total_spikes:,} = {sum(s.spike_pixels for s in done):,} spike pixels "
        f"+ {sum(s.marker_pixels for s in done):,} z-marker pixels (- overlaps)",
    ]
    if total_pixels:
        lines += [
            f"  Overall sparsity: {100.0 * total_spikes / total_pixels:.4f}% of voxels active",
            f"  Memory savings: ~{100.0 * (1 - coo_bytes / total_pixels):.2f}% in memory ({_format_bytes(coo_bytes)} vs "
            f"{_format_bytes(total_pixels)} dense), ~{100.0 * (1 - file_bytes / total_pixels):.2f}% on disk "
            f"({_format_bytes(file_bytes)})",
        ]
    if totals:
        lines.append(f"  combined_metadata.h5: {plural(totals['total_subjects'], 'subject')}")
    lines.append("=" * 72)
    return lines


# =============================================================================================
# 12. Command line
# =============================================================================================


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the 40-line usage buried the error, and a typo deserves a 'did you mean'."""

    def error(self, message: str):
        if unknown := re.fullmatch(r"unrecognized arguments: (.*)", message):
            options = [flag for action in self._actions for flag in action.option_strings]
            typos = [token.split("=")[0] for token in unknown[1].split() if token.startswith("-")]
            if typos:
                close = difflib.get_close_matches(typos[0], options, n=1)
                message = f"unknown option {', '.join(typos)}" + (f": did you mean {close[0]}?" if close else "")
        self.exit(2, f"{self.prog}: error: {message} (--help lists every option)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line, built from PipelineConfig's declarations (defaults shown are the real ones); abbreviations
    are refused (--worker is not --workers: a typo must not run with another meaning)."""
    parser = _Parser(
        prog="unified_spike_processing_coo.py",
        allow_abbrev=False,
        description="Turn whole-brain calcium imaging (one folder per subject) into COO-sparse spike grids (T, Z, H, W) "
        "with CASCADE spike inference. Finished subjects whose inputs, parameters and model are unchanged are skipped "
        "on a rerun.",
        epilog="Input layouts, one subject per folder (subject_<n>, or any folder holding a layout) directly under "
        "--input_dir or under --input_dir/Subjects: "
        + "; ".join(layout.files for layout in INPUT_LAYOUTS)
        + ". Exit status: 0 every subject done or already up to date; 1 some subject failed, was locked by another run or "
        "was not processed after a write failure (each named in the log); 2 bad arguments or no usable model; 130 / 143 "
        "interrupted by Ctrl-C / SIGTERM (finished subjects are kept; rerun the same command to resume). For "
        "production SLURM runs, fill the model cache on a node with internet and pass --strict_model, so that a "
        "missing model is an error rather than a fallback; see cluster/ for an sbatch array script.",
    )
    groups = {name: parser.add_argument_group(name) for name in (IO, RUN, MODEL, TRACES, GRID)}
    for field in dataclasses.fields(PipelineConfig):
        meta = field.metadata
        kwargs = dict(meta["kwargs"], dest=field.name, help=meta["help"])
        for key in ("help", "choices"):  # text and choices that come from a table further down
            if callable(kwargs.get(key)):
                kwargs[key] = kwargs[key]()
        if isinstance(field.default, bool):
            kwargs["action"] = "store_false" if field.default else "store_true"
        else:
            kwargs["default"] = field.default
            if type(field.default) in (int, float):
                kwargs.setdefault("type", type(field.default))
            if field.default not in (None, ()) and not kwargs.get("required"):
                shown = " ".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
                kwargs["help"] += f" (default: {shown})"
        groups[meta["group"]].add_argument(*(meta["flag"] or f"--{field.name}").split("/"), **kwargs)
    return parser


def _setup_logging(log_file: Path | None, verbose: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in [h for h in root.handlers if getattr(h, "spike_grids", False)]:
        root.removeHandler(handler)  # a second main() in one process (tests, notebooks)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))  # OSError here: an unwritable log, exit 2
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.spike_grids = True
        root.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        config = PipelineConfig(**vars(parser.parse_args(argv)))
        shard = resolve_shard(config.shard)
    except PipelineError as exc:  # options that cannot go together: one line, exit 2, before anything is created
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    output_dir = Path(config.output_dir)
    default_log = f"processing_shard{shard[0]}of{shard[1]}.log" if shard else "processing.log"
    try:
        if not config.inspect:  # --inspect writes nothing: its log goes to stderr (and --log_file if given)
            output_dir.mkdir(parents=True, exist_ok=True)
        log_file = Path(config.log_file) if config.log_file else None if config.inspect else output_dir / default_log
        _setup_logging(log_file, config.verbose)
    except OSError as exc:
        files = [p for p in (output_dir, *output_dir.parents) if p.exists() and not p.is_dir()]
        if isinstance(exc, (FileExistsError, NotADirectoryError)) and files:  # mkdir's "File exists" says too little
            where = "" if files[0] == output_dir else f" is inside {files[0]}, which"
            print(f"error: --output_dir {output_dir}{where} is a file, not a folder: pass a folder", file=sys.stderr)
        else:
            print(f"error: cannot write to {exc.filename or output_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    as_command = set(STOP_SIGNALS) <= signal.pthread_sigmask(signal.SIG_BLOCK, ())  # blocked since the first line
    run = RunContext(output_dir)
    try:
        run.install_signal_handlers()
        try:
            status = inspect_run(config, shard) if config.inspect else run_pipeline(config, shard, run)
        except PipelineError as exc:
            log.error("%s", exc)
            status = 2
        run.end()
        return status
    except Interrupted as stop:  # raised once, at any moment until run.end(); later signals are ignored
        if as_command:  # its children are all the run's (called from Python: the pool's only, see run_subjects)
            end_child_processes()
        log.error(interruption_line(stop, run, config, shard))
        return stop.exit_code
    finally:  # as the command, a later signal changes no exit status (Python's finalisation would let it kill)
        run.restore_signal_handlers(signal.SIG_IGN if as_command else None)


if __name__ == "__mp_main__" and os.environ.get(PRELOAD_TENSORFLOW_ENV) != "0":  # the fork server: see WorkerPool
    _import_tensorflow()

if __name__ == "__main__":
    sys.exit(main())
