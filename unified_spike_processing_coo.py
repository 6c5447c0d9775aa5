#!/usr/bin/env python3
"""Whole-brain calcium imaging -> CASCADE spike inference -> COO-sparse spike grids.

For every subject (one fish) under --input_dir this script

1. loads the calcium traces and 3-D cell positions (Chen et al. 2018 layout or a generic
   ``traces.h5``), converting raw fluorescence to dF/F where needed,
2. infers spike rates with a CASCADE model (Rupprecht et al., Nat. Neurosci. 2021) using a fully
   convolutional re-implementation of its 1-D CNN ensemble (same numbers, >20x faster, bounded
   memory), in batches of cells spread over a pool of worker processes,
3. turns rates into binary spikes (seeded, so results never depend on --workers/--batch_size),
4. maps each spike to a voxel (t, z, x, y) of a (T, Z, H, W) grid, and
5. writes per subject a COO-sparse HDF5 grid, a metadata file and a PDF of plots, then one
   combined metadata file and a summary of sparsity and memory savings.

Example::

    python unified_spike_processing_coo.py --input_dir raw_trace_data_2018 \\
        --output_dir processed_spike_grids_coo_2018 --workers 4 --batch_size 30000

Run with --help for every option. The file reads top-down like the pipeline: configuration,
loading subjects, dF/F, CASCADE models (loading, resolution), inference, discrete spikes, spike
binarisation, gridding, the worker pool, writing, plotting, one subject end to end, command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import yaml

__version__ = "1.0.0"

log = logging.getLogger("spike_grids")

REPO_DIR = Path(__file__).resolve().parent
BUILTIN_MODEL_NAME = "builtin_2Hz_smoothing500ms"
BUILTIN_MODEL_DIR = REPO_DIR / "models" / BUILTIN_MODEL_NAME


class PipelineError(Exception):
    """An error with a one-line, user-facing explanation (which file, what to do)."""


# =============================================================================================
# 1. Configuration of a run
# =============================================================================================
# Every parameter is declared once, here: its default, its --help text, its argument group and
# whether it changes the outputs (those make up the fingerprint that decides whether a finished
# subject can be skipped on a rerun). The command line is built from these declarations.


def option(default, help: str, group: str, *, outputs: bool = False, flag: str | None = None, **argparse_kwargs):
    """A configuration field with its command-line declaration (see build_parser)."""
    metadata = {"help": help, "group": group, "outputs": outputs, "flag": flag, "kwargs": argparse_kwargs}
    return dataclasses.field(default=default, metadata=metadata)


def _comma_list(text: str) -> tuple:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _threshold_arg(text: str):
    value = text.strip().lower()
    if value in ("none", "false", "off"):
        return False
    if value in ("0", "1"):
        return int(value)
    raise argparse.ArgumentTypeError("must be 0, 1 or none")


def _shard_arg(text: str) -> tuple:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise argparse.ArgumentTypeError("must be K/N with 1 <= K <= N, e.g. 3/18")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class PipelineConfig:
    """Every parameter of a run; those marked outputs=True are recorded in each output file."""

    # input and output
    input_dir: str = option(None, "folder of subject_<n> folders", "input and output", required=True)
    output_dir: str = option(
        None, "where <subject>/ outputs and combined_metadata.h5 go", "input and output", required=True
    )
    subjects: tuple = option((), "only these subjects (comma list)", "input and output", type=_comma_list)
    skip: tuple = option((), "skip these subjects (comma list)", "input and output", type=_comma_list)
    coordinates: str = option(
        "raw",
        "cell positions: CellXYZ (raw) or CellXYZ_norm (registered Z-Brain frame, shared across fish)",
        "input and output",
        outputs=True,
        choices=("raw", "registered"),
    )
    plots: bool = option(True, "skip the PDF of plots", "input and output", outputs=True, flag="--no_plots")
    num_neurons: int = option(10, "cells shown in the PDF's trace pages", "input and output", outputs=True, type=int)
    log_file: str | None = option(
        None, "log here (default: <output_dir>/processing.log, or processing_shard<K>of<N>.log)", "input and output"
    )
    verbose: bool = option(False, "debug logging, tracebacks on errors", "input and output", flag="-v/--verbose")

    # running: none of these change the outputs
    workers: int = option(1, "worker processes for CASCADE inference", "running", type=int)
    batch_size: int = option(
        30000, "cells per batch sent to a worker (memory per worker does not grow with it)", "running", type=int
    )
    overwrite: bool = option(False, "recompute subjects whose finished outputs are up to date", "running")
    shard: tuple | None = option(
        None,
        "process the K-th of N parts of the subject list (default inside a SLURM array: from SLURM_ARRAY_TASK_*)",
        "running",
        type=_shard_arg,
        metavar="K/N",
    )
    combine_only: bool = option(
        False, "only build combined_metadata.h5 and the summary from the outputs present", "running"
    )

    # CASCADE model
    cascade_model: str = option(
        "Global_EXC_2Hz_smoothing500ms",
        "official model name, 'auto' (per subject, nearest sampling rate) or 'builtin' (nearest builtin model)",
        "CASCADE model",
        outputs=True,
    )
    model_dir: str | None = option(None, "a CASCADE model folder (overrides --cascade_model)", "CASCADE model")
    model_cache: str | None = option(
        None,
        "where official models are cached/downloaded (default: neuralib's ~/.cache/neuralib/cascade)",
        "CASCADE model",
    )
    strict_model: bool = option(
        False, "error instead of falling back to the builtin model when the named one is unavailable", "CASCADE model"
    )
    offline: bool = option(False, "never download: use --model_dir, the cache or the builtin models", "CASCADE model")
    cascade_threshold: object = option(
        1,
        "CASCADE's post-processing: 0 (negatives to 0), 1 (noise-floor cut) or none",
        "CASCADE model",
        outputs=True,
        type=_threshold_arg,
    )
    max_rate_mismatch: float = option(
        0.5,
        "refuse a subject whose frame rate is this fraction away from the model's (warn above 0.05)",
        "CASCADE model",
        type=float,
    )

    # traces
    trace_type: str = option(
        "auto",
        "raw fluorescence (converted to dF/F) or dF/F; auto decides per subject",
        "traces",
        outputs=True,
        choices=("auto", "fluorescence", "dff"),
    )
    baseline_percentile: float = option(8.0, "F0 percentile for dF/F", "traces", outputs=True, type=float)
    baseline_window_s: float = option(30.0, "sliding F0 window (seconds)", "traces", outputs=True, type=float)

    # spikes and grid
    spike_mode: str = option(
        "sample",
        "sample: seeded Bernoulli(rate); discrete: inferred spike counts > 0; threshold: rate >= --spike_threshold",
        "spikes and grid",
        outputs=True,
        choices=("sample", "discrete", "threshold"),
    )
    spike_threshold: float = option(
        0.5, "rate threshold (spikes/frame) for --spike_mode threshold", "spikes and grid", outputs=True, type=float
    )
    seed: int = option(42, "seed of spike sampling and the train/test split", "spikes and grid", outputs=True, type=int)
    keep_edge_frames: bool = option(
        False,
        "keep the frames at both ends where CASCADE's window gives no prediction",
        "spikes and grid",
        outputs=True,
    )
    grid_shape: tuple = option(
        (256, 128),
        "grid height (x) and width (y) in pixels",
        "spikes and grid",
        outputs=True,
        type=int,
        nargs=2,
        metavar=("H", "W"),
    )
    z_markers: bool = option(
        True,
        "do not add the z-plane marker pixels (rows 0-1, last z+2 columns)",
        "spikes and grid",
        outputs=True,
        flag="--no_z_markers",
    )
    split_block: int = option(330, "frames per train/test block", "spikes and grid", outputs=True, type=int)
    split_ratio: float = option(0.95, "fraction of blocks for training", "spikes and grid", outputs=True, type=float)

    def __post_init__(self):
        object.__setattr__(self, "grid_shape", tuple(int(v) for v in self.grid_shape))
        problems = []
        if self.workers < 1 or self.batch_size < 1:
            problems.append("--workers and --batch_size must be at least 1")
        if not 0 < self.split_ratio <= 1 or self.split_block < 1:
            problems.append("--split_ratio must be in (0, 1] and --split_block at least 1")
        if len(self.grid_shape) != 2 or min(self.grid_shape) < 1:
            problems.append("--grid_shape needs positive H and W")
        if self.num_neurons < 0 or self.max_rate_mismatch < 0 or self.baseline_window_s <= 0:
            problems.append("--num_neurons, --max_rate_mismatch must be >= 0 and --baseline_window_s > 0")
        if not 0 <= self.baseline_percentile <= 100:
            problems.append("--baseline_percentile must be in [0, 100]")
        if problems:
            raise PipelineError("; ".join(problems))

    @property
    def grid_height(self) -> int:
        return self.grid_shape[0]

    @property
    def grid_width(self) -> int:
        return self.grid_shape[1]

    def output_params(self) -> dict:
        """The parameters that change the outputs, as JSON values (the fingerprint's share)."""
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["outputs"]}
        params["cascade_threshold"] = str(self.cascade_threshold)  # False (none) must differ from 0
        return json.loads(json.dumps(params))

    def as_attrs(self) -> dict:
        """Every parameter as HDF5 attributes param_<name> (converted by h5_attr_value)."""
        return {f"param_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}


def h5_attr_value(value):
    """The one conversion of Python values to HDF5 attributes (None -> '', dicts -> JSON,
    tuples of strings -> comma list, False threshold -> 'none')."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, default=str, sort_keys=True)
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (list, tuple)):
        if not value or isinstance(value[0], str):
            return ",".join(str(v) for v in value)
        return np.asarray(value)
    return value


# =============================================================================================
# 2. Loading subjects: Chen et al. 2018 layout and a generic traces.h5
# =============================================================================================
# Loading reads everything but the traces: those stay in their HDF5 file and are read a block of
# cells at a time (by the workers, during inference), so no process ever holds a whole fish.

TRACE_READ_CELLS = 4096  # cells per read: a few tens of MB for a 4,000-frame recording


@dataclass(frozen=True)
class TraceFile:
    """Where a subject's traces live: an HDF5 dataset with cells on rows (N, T) or columns (T, N)."""

    path: str
    dataset: str
    cells_on_columns: bool  # Chen's CellResp is (T, N)
    num_cells: int
    num_frames: int

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Traces of cells [start, stop) as (cells, T) float32; infinite values become NaN."""
        traces = self.read_raw(start, stop)
        mark_infinite_as_missing(traces)
        return traces

    def read_raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Traces of cells [start, stop) as stored, as (cells, T) float32."""
        import h5py

        stop = self.num_cells if stop is None else min(stop, self.num_cells)
        traces = np.empty((max(0, stop - start), self.num_frames), dtype=np.float32)
        try:
            with h5py.File(self.path, "r") as h5:
                data = h5[self.dataset]
                for first in range(start, stop, TRACE_READ_CELLS):
                    last = min(first + TRACE_READ_CELLS, stop)
                    block = data[:, first:last].T if self.cells_on_columns else data[first:last]
                    traces[first - start : last - start] = block
        except OSError as exc:
            raise PipelineError(f"cannot read {self.dataset} from {self.path} ({exc})") from None
        return traces

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Traces of a few chosen cells (ascending rows), e.g. a sample for a decision."""
        import h5py

        with h5py.File(self.path, "r") as h5:
            data = h5[self.dataset]
            traces = data[:, rows].T if self.cells_on_columns else data[rows]
        traces = np.asarray(traces, dtype=np.float32)
        traces[np.isinf(traces)] = np.nan
        return traces


def mark_infinite_as_missing(traces: np.ndarray) -> np.ndarray:
    """Infinite values -> NaN, in place; returns the count per cell (they are reported)."""
    infinite = np.isinf(traces)
    traces[infinite] = np.nan
    return infinite.sum(axis=1).astype(np.int32)


@dataclass
class SubjectData:
    """One subject: where its traces are, and its cells' positions (N, 3) as [x, y, z]."""

    name: str
    folder: str
    trace_file: TraceFile
    positions: np.ndarray  # (N, 3) float64: x (CellXYZ col 1), y (col 2), z (col 3)
    frame_rate_hz: float
    cell_ids: np.ndarray  # (N,) int64: 1-based row in CellXYZ (Chen) or 0-based index
    layout: str  # 'chen2018' | 'generic'
    trace_type_hint: str | None = None
    source_files: tuple = ()
    warnings: list = dataclasses.field(default_factory=list)

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
    """Subject folders ``subject_<n>`` under input_dir or input_dir/Subjects, natural order."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise PipelineError(f"input folder {input_dir} does not exist")
    roots = [input_dir, input_dir / "Subjects"]
    folders = {}
    for root in roots:
        if root.is_dir():
            for child in root.iterdir():
                if child.is_dir() and re.fullmatch(r"subject_\d+", child.name):
                    folders.setdefault(child.name, child)
    names = sorted(folders, key=_natural_key)
    unknown = [name for name in only if name not in folders]
    if unknown:
        raise PipelineError(
            f"--subjects names {', '.join(unknown)}, not found under {input_dir} (found: {', '.join(names) or 'none'})"
        )
    if only:
        names = [name for name in names if name in set(only)]
    names = [name for name in names if name not in set(skip)]
    return [folders[name] for name in names]


def _mat_struct_fields(path: Path) -> dict:
    """Fields of the struct ``data`` in data_full.mat, MATLAB v5 (scipy) or v7.3 (HDF5)."""
    import h5py
    import scipy.io

    if h5py.is_hdf5(path):  # MATLAB v7.3 files are HDF5 (after a 512-byte text header)
        try:
            with h5py.File(path, "r") as h5:
                if "data" not in h5:
                    raise PipelineError(f"{path} has no struct 'data'")
                group = h5["data"]
                # MATLAB stores matrices transposed in HDF5: undo it
                return {key: np.asarray(group[key][()]).T for key in group if isinstance(group[key], h5py.Dataset)}
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(f"cannot read {path} as MATLAB v7.3 ({exc})") from None
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as exc:
        raise PipelineError(f"cannot read {path} ({exc}); is it a complete MATLAB file?") from None
    if "data" not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__"))
        raise PipelineError(f"{path} has no struct 'data' (found {found})")
    data = mat["data"]
    return {name: np.asarray(getattr(data, name)) for name in data._fieldnames}


def _open_trace_file(path: Path, dataset: str, cells_on_columns: bool, extra: tuple = ()) -> tuple:
    """The TraceFile of ``path[dataset]`` (shape checked, traces not read), the file's attributes and
    the small datasets named in ``extra`` that are present (Chen files hold other large ones)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            if dataset not in h5 or not isinstance(h5[dataset], h5py.Dataset):
                raise PipelineError(f"{path} has no dataset '{dataset}'")
            data = h5[dataset]
            expected = "(T, N)" if cells_on_columns else "(N, T)"
            if data.ndim != 2:
                raise PipelineError(f"{path}: {dataset} has shape {data.shape}, expected {expected}")
            if data.dtype.kind not in "fiu":
                raise PipelineError(
                    f"{path}: {dataset} holds {data.dtype} values, expected real numbers (fluorescence or dF/F)"
                )
            frames, cells = data.shape if cells_on_columns else data.shape[::-1]
            attrs = {key: h5.attrs[key] for key in h5.attrs}
            other = {key: np.asarray(h5[key][()]) for key in extra if isinstance(h5.get(key), h5py.Dataset)}
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"cannot read {path} ({exc}); the file is corrupt or truncated") from None
    return TraceFile(str(path), dataset, cells_on_columns, int(cells), int(frames)), attrs, other


def load_chen2018_subject(folder: Path, coordinates: str = "raw") -> SubjectData:
    """A fish in the Chen et al. 2018 layout (TimeSeries.h5 + data_full.mat)."""
    series_path, anatomy_path = folder / "TimeSeries.h5", folder / "data_full.mat"
    for path in (series_path, anatomy_path):
        if not path.is_file():
            raise PipelineError(f"{path} is missing (Chen 2018 layout needs TimeSeries.h5 and data_full.mat)")
    trace_file, _, datasets = _open_trace_file(series_path, "CellResp", True, extra=("absIX",))
    abs_ix = datasets["absIX"].ravel() if "absIX" in datasets else None
    fields = _mat_struct_fields(anatomy_path)
    key = "CellXYZ_norm" if coordinates == "registered" else "CellXYZ"
    if key not in fields:
        raise PipelineError(f"{anatomy_path}: struct data has no {key}")
    cell_xyz = np.asarray(fields[key], dtype=np.float64)
    if cell_xyz.ndim != 2 or 3 not in cell_xyz.shape:
        raise PipelineError(f"{anatomy_path}: {key} has shape {cell_xyz.shape}, expected (cells, 3)")
    if cell_xyz.shape[1] != 3:
        cell_xyz = cell_xyz.T
    if "fpsec" not in fields:
        raise PipelineError(f"{anatomy_path}: struct data has no fpsec (frame rate)")
    frame_rate_hz = float(np.asarray(fields["fpsec"]).ravel()[0])
    num_cells = trace_file.num_cells
    if abs_ix is not None:
        # absIX is 1-based into CellXYZ (MATLAB); forgetting the -1 shifts every cell by one row
        cell_ids = abs_ix.astype(np.int64)
        if len(cell_ids) != num_cells:
            raise PipelineError(f"{series_path}: absIX lists {len(cell_ids)} cells but CellResp has {num_cells}")
    else:
        invalid = set(np.asarray(fields.get("IX_inval_anat", []), dtype=np.int64).ravel().tolist())
        cell_ids = np.array([i for i in range(1, len(cell_xyz) + 1) if i not in invalid], dtype=np.int64)
        if len(cell_ids) != num_cells:
            raise PipelineError(
                f"{series_path} has no absIX and CellResp's {num_cells} cells do not match "
                f"the {len(cell_ids)} valid cells of {anatomy_path}"
            )
    if cell_ids.min(initial=1) < 1 or cell_ids.max(initial=1) > len(cell_xyz):
        raise PipelineError(f"{series_path}: absIX points outside CellXYZ (1..{len(cell_xyz)})")
    return SubjectData(
        name=folder.name,
        folder=str(folder),
        trace_file=trace_file,
        positions=cell_xyz[cell_ids - 1],
        frame_rate_hz=frame_rate_hz,
        cell_ids=cell_ids,
        layout="chen2018",
        source_files=(str(series_path), str(anatomy_path)),
    )


def load_generic_subject(folder: Path) -> SubjectData:
    """The generic layout: traces.h5 with traces (N, T), positions (N, 3), attr frame_rate_hz."""
    path = folder / "traces.h5"
    trace_file, attrs, datasets = _open_trace_file(path, "traces", False, extra=("positions",))
    if "positions" not in datasets or "frame_rate_hz" not in attrs:
        missing = [k for k in ("positions",) if k not in datasets] + (
            ["attribute frame_rate_hz"] if "frame_rate_hz" not in attrs else []
        )
        raise PipelineError(f"{path} lacks {', '.join(missing)}")
    positions = np.asarray(datasets["positions"], dtype=np.float64)
    if positions.shape != (trace_file.num_cells, 3):
        raise PipelineError(
            f"{path}: traces {(trace_file.num_cells, trace_file.num_frames)} and positions {positions.shape} "
            "must be (N, T) and (N, 3)"
        )
    hint = attrs.get("trace_type")
    hint = hint.decode() if isinstance(hint, bytes) else (str(hint) if hint is not None else None)
    return SubjectData(
        name=folder.name,
        folder=str(folder),
        trace_file=trace_file,
        positions=positions,
        frame_rate_hz=float(np.asarray(attrs["frame_rate_hz"]).ravel()[0]),
        cell_ids=np.arange(trace_file.num_cells, dtype=np.int64),
        layout="generic",
        trace_type_hint=hint,
        source_files=(str(path),),
    )


def load_subject(folder, coordinates: str = "raw") -> SubjectData:
    """Open a subject folder in whichever supported layout it has and check what can be checked
    without reading the traces (those are read a block at a time during inference)."""
    folder = Path(folder)
    if (folder / "TimeSeries.h5").exists() or (folder / "data_full.mat").exists():
        subject = load_chen2018_subject(folder, coordinates)
    elif (folder / "traces.h5").exists():
        if coordinates == "registered":
            raise PipelineError(f"{folder}: --coordinates registered needs the Chen 2018 layout (CellXYZ_norm)")
        subject = load_generic_subject(folder)
    else:
        raise PipelineError(f"{folder} has neither TimeSeries.h5 + data_full.mat (Chen 2018) nor traces.h5")
    if subject.num_cells == 0 or subject.num_frames == 0:
        raise PipelineError(f"{folder}: empty recording ({subject.num_cells} cells x {subject.num_frames} frames)")
    if not (math.isfinite(subject.frame_rate_hz) and subject.frame_rate_hz > 0):
        raise PipelineError(f"{folder}: invalid frame rate {subject.frame_rate_hz!r} Hz")
    if not np.isfinite(subject.positions).all():
        raise PipelineError(f"{folder}: cell positions contain NaN or infinite values")
    return subject


# =============================================================================================
# dF/F: deciding what the traces are, and a vectorised sliding-percentile baseline
# =============================================================================================


def decide_trace_type(traces: np.ndarray, hint: str | None = None, max_cells: int = 2000) -> tuple:
    """'fluorescence' or 'dff' from the data, with the reason (logged and recorded).

    Raw fluorescence sits on a positive baseline far above its own fluctuations; dF/F hovers
    around zero. We compare each cell's baseline (8th percentile) with its noise (MAD of diffs).
    """
    if hint in ("fluorescence", "dff"):
        return hint, f"file attribute trace_type={hint}"
    sample = traces[np.linspace(0, len(traces) - 1, min(len(traces), max_cells)).astype(int)]
    with np.errstate(all="ignore"):
        baseline = np.nanpercentile(sample, 8, axis=1)
        noise = np.nanmedian(np.abs(np.diff(sample, axis=1)), axis=1)
        ratio = np.nanmedian(baseline / np.maximum(noise, 1e-12))
        positive = np.nanmean(baseline > 0)
    if positive > 0.95 and ratio > 5:
        return "fluorescence", f"baselines positive in {positive:.0%} of cells, {ratio:.0f}x the noise"
    return "dff", f"baselines near zero (median baseline/noise {ratio:.1f}, positive in {positive:.0%})"


def sliding_percentile(
    traces: np.ndarray, window_frames: int, percentile: float, max_chunk_values: int = 1 << 26
) -> np.ndarray:
    """Centred sliding percentile per row (edges repeat the end values), exactly as
    scipy.ndimage.percentile_filter(size=(1, w), mode='nearest') but ~3x faster: np.partition
    over a strided window view, a block of rows at a time so memory stays bounded."""
    window_frames = int(window_frames) | 1
    half = window_frames // 2
    rank = int(window_frames * percentile / 100.0)
    num_rows, num_frames = traces.shape
    out = np.empty((num_rows, num_frames), dtype=np.float32)
    rows_per_block = max(1, max_chunk_values // max(1, num_frames * window_frames))
    for start in range(0, num_rows, rows_per_block):
        block = np.pad(traces[start : start + rows_per_block], ((0, 0), (half, half)), mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(block, window_frames, axis=1)
        out[start : start + rows_per_block] = np.partition(windows, rank, axis=2)[:, :, rank]
    return out


def compute_dff(
    fluorescence: np.ndarray, frame_rate_hz: float, window_s: float = 30.0, percentile: float = 8.0
) -> np.ndarray:
    """dF/F = (F - F0) / F0 with F0 the ``percentile`` over a centred ``window_s`` window.

    The window is converted to frames with the subject's real frame rate (the original assumed
    2 Hz and forgot to divide by F0). NaN frames are filled with the cell's median for the
    baseline only. A non-positive F0 (background-subtracted data) would make dF/F meaningless:
    it is floored at 1% of the cell's median F0 (or 1e-6).
    """
    window_frames = max(3, int(round(window_s * frame_rate_hz)) | 1)  # odd, centred
    traces = np.asarray(fluorescence, dtype=np.float32)
    filled = traces
    if np.isnan(traces).any():
        with np.errstate(all="ignore"):
            filled = np.where(np.isnan(traces), np.nanmedian(traces, axis=1, keepdims=True), traces)
        filled = np.nan_to_num(filled)
    baseline = sliding_percentile(filled, window_frames, percentile)
    floor = np.maximum(0.01 * np.abs(np.median(baseline, axis=1, keepdims=True)), 1e-6)
    baseline = np.maximum(baseline, floor)
    return ((traces - baseline) / baseline).astype(np.float32)


# =============================================================================================
# CASCADE models: loading an official model folder into plain arrays
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
    source_file: str = ""

    def as_tuple(self) -> tuple:
        return (
            self.conv1_kernel,
            self.conv1_bias,
            self.conv2_kernel,
            self.conv2_bias,
            self.conv3_kernel,
            self.conv3_bias,
            self.dense_kernel,
            self.dense_bias,
            self.output_kernel,
            self.output_bias,
        )


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

    @property
    def window_offset(self) -> int:
        """Frame t is predicted from dff[t - offset : t - offset + W] (CASCADE: int(b*W - 1))."""
        return int(self.before_frac * self.window_size - 1)

    @property
    def frames_before(self) -> int:
        """Leading frames that get no prediction (CASCADE pads int(before_frac*W))."""
        return int(self.before_frac * self.window_size)

    @property
    def frames_after(self) -> int:
        """Frames at the end of a trace that get no prediction (int((1-before_frac)*W))."""
        return int((1 - self.before_frac) * self.window_size)

    @property
    def smoothing_frames(self) -> float:
        return self.smoothing_s * self.sampling_rate_hz

    @property
    def is_fallback(self) -> bool:
        """True when the builtin model stands in for a model that could not be had."""
        return self.source.startswith(FALLBACK_SOURCE_PREFIX)

    def provenance(self) -> dict:
        """What outputs record about the model, so a file says how it was made."""
        return {
            "cascade_model": self.name,
            "model_source": self.source,
            "model_requested": self.requested,
            "model_folder": self.folder,
            "model_sampling_rate_hz": self.sampling_rate_hz,
            "model_smoothing_s": self.smoothing_s,
            "model_noise_levels": list(self.noise_levels),
            "model_ensemble_size": self.ensemble_size,
            "model_digest": self.digest,
        }


def _layer_config_list(model_config: dict) -> list:
    """Layers of a saved Keras model (Sequential or functional, Keras 2 or 3), as dicts."""
    config = model_config.get("config", {})
    layers = config.get("layers", config) if isinstance(config, dict) else config
    return [layer for layer in layers if layer.get("class_name") != "InputLayer"]


def _as_int(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _check_architecture(layers: list, config: dict, path: Path) -> None:
    """Fail clearly if the saved network is not the CASCADE stack the engine implements."""
    classes = tuple(layer.get("class_name") for layer in layers)
    if classes != CASCADE_LAYER_CLASSES:
        raise PipelineError(
            f"{path}: layer stack {classes} is not CASCADE's {CASCADE_LAYER_CLASSES}; this engine cannot run it"
        )
    convs = [layers[0]["config"], layers[1]["config"], layers[3]["config"]]
    for i, conv in enumerate(convs):
        expected = (int(config["filter_numbers"][i]), int(config["filter_sizes"][i]))
        found = (int(conv["filters"]), _as_int(conv["kernel_size"]))
        if (
            found != expected
            or conv.get("activation") != "relu"
            or conv.get("padding", "valid") != "valid"
            or _as_int(conv.get("strides", 1)) != 1
            or _as_int(conv.get("dilation_rate", 1)) != 1
        ):
            raise PipelineError(
                f"{path}: convolution {i + 1} is {found} {conv.get('activation')}, "
                f"config.yaml says {expected} relu valid"
            )
    for pool in (layers[2]["config"], layers[4]["config"]):
        if (
            _as_int(pool.get("pool_size", 2)) != 2
            or _as_int(pool.get("strides", 2)) != 2
            or pool.get("padding", "valid") != "valid"
        ):
            raise PipelineError(f"{path}: max-pooling layers must be size 2, stride 2, valid")
    if layers[5]["config"].get("activation") != "relu" or int(layers[5]["config"]["units"]) != int(
        config["dense_expansion"]
    ):
        raise PipelineError(f"{path}: hidden dense layer is not relu x dense_expansion")
    if layers[7]["config"].get("activation") != "linear" or int(layers[7]["config"]["units"]) != 1:
        raise PipelineError(f"{path}: output layer must be a single linear unit")


def _read_network_weights(path: Path, config: dict) -> NetworkWeights:
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            raw_config = h5.attrs.get("model_config")
            if raw_config is None:
                raise PipelineError(f"{path} has no 'model_config' attribute: not a Keras model file saved by CASCADE")
            if isinstance(raw_config, bytes):
                raw_config = raw_config.decode()
            layers = _layer_config_list(json.loads(raw_config))
            _check_architecture(layers, config, path)
            group = h5["model_weights"] if "model_weights" in h5 else h5
            layer_names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["layer_names"]]
            arrays = []
            for layer_name in layer_names:
                layer_group = group[layer_name]
                weight_names = [
                    n.decode() if isinstance(n, bytes) else str(n) for n in layer_group.attrs.get("weight_names", [])
                ]
                if not weight_names:
                    continue
                weights = [np.asarray(layer_group[n], dtype=np.float32) for n in weight_names]
                kernel = next(w for w in weights if w.ndim >= 2)
                bias = next(w for w in weights if w.ndim == 1)
                arrays.append((kernel, bias))
    except PipelineError:
        raise
    except (OSError, KeyError, StopIteration, ValueError) as exc:
        raise PipelineError(
            f"cannot read CASCADE weights from {path} ({exc}); "
            "the file is missing, truncated or not a Keras HDF5 model: "
            "re-download the model folder"
        ) from None
    if len(arrays) != 5:
        raise PipelineError(f"{path}: expected 5 weighted layers, found {len(arrays)}")
    (k1, b1), (k2, b2), (k3, b3), (kd, bd), (ko, bo) = arrays
    return NetworkWeights(k1, b1, k2, b2, k3, b3, kd, bd, ko, bo, source_file=str(path))


def _one_line(value) -> str:
    return " ".join(str(value).split())


def _read_model_config(path: Path) -> tuple:
    """(config, noise levels, engine parameters) from config.yaml, or a PipelineError naming the file."""
    if not path.is_file():
        raise PipelineError(
            f"CASCADE model folder {path.parent} has no config.yaml: point --model_dir at a folder as CASCADE distributes it"
        )
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
        noise_levels = tuple(sorted(int(n) for n in config["noise_levels"]))
        params = dict(
            sampling_rate_hz=float(config["sampling_rate"]),
            smoothing_s=float(config["smoothing"]),
            causal_kernel=bool(config.get("causal_kernel", 0)),
            window_size=int(config["windowsize"]),
            before_frac=float(config["before_frac"]),
            filter_sizes=tuple(int(v) for v in config["filter_sizes"]),
            filter_numbers=tuple(int(v) for v in config["filter_numbers"]),
            dense_expansion=int(config["dense_expansion"]),
        )
        if not noise_levels or not params["sampling_rate_hz"] > 0:
            raise ValueError("no noise_levels, or sampling_rate is not positive")
    except KeyError as exc:
        raise PipelineError(f"{path} lacks {exc}: not a CASCADE model config") from None
    except (OSError, yaml.YAMLError, TypeError, ValueError) as exc:
        raise PipelineError(f"{path} is not a valid CASCADE config ({_one_line(exc)}): re-download it") from None
    return config, noise_levels, params


def load_cascade_model_folder(folder, source: str = "model_dir", requested: str = "") -> CascadeModel:
    """Load and check a CASCADE model folder (config.yaml + Model_NoiseLevel_<N>_Ensemble_<E>.h5).

    This is the one validation of a model: a missing folder, config.yaml or weight file, a bad
    config, a truncated file or another network is one PipelineError naming the file and the fix.
    The digest (sha256 of config.yaml and the weight files) says which weights made an output.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PipelineError(f"CASCADE model folder {folder} does not exist")
    config, noise_levels, params = _read_model_config(folder / "config.yaml")
    files: dict = {}
    for path in sorted(folder.glob("*.h5")):
        match = MODEL_FILE_PATTERN.search(path.name)
        if match and int(match.group(1)) in noise_levels:
            files.setdefault(int(match.group(1)), []).append((int(match.group(2)), path))
    absent = [n for n in noise_levels if n not in files]
    if absent:
        raise PipelineError(
            f"CASCADE model folder {folder} has no Model_NoiseLevel_{absent[0]}_Ensemble_*.h5 file although "
            "config.yaml lists that noise level: the download is incomplete, fetch the model again"
        )
    paths = {level: [path for _, path in sorted(files[level])] for level in noise_levels}
    ensembles = {level: tuple(_read_network_weights(path, config) for path in paths[level]) for level in paths}
    sha = hashlib.sha256()
    for path in [folder / "config.yaml", *(path for level in paths for path in paths[level])]:
        sha.update(path.name.encode() + b"\0" + path.read_bytes())
    return CascadeModel(
        name=str(config.get("model_name", folder.name)),
        folder=str(folder.resolve()),
        noise_levels=noise_levels,
        ensemble_size=min(len(e) for e in ensembles.values()),
        ensembles=ensembles,
        source=source,
        requested=requested,
        digest=sha.hexdigest()[:16],
        **params,
    )


# =============================================================================================
# Model resolution: --model_dir, builtin, auto, cache, download, builtin fallback
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
    """Fetching, checking or installing a model download failed."""


def rate_mismatch(model: CascadeModel, frame_rate_hz: float) -> float:
    """How far the model's sampling rate is from the frame rate, as a fraction of the frame rate."""
    return abs(model.sampling_rate_hz - frame_rate_hz) / frame_rate_hz


def parse_model_sampling_rate_hz(name: str) -> float:
    """Sampling rate in a model name, e.g. ``Global_EXC_2.5Hz_smoothing400ms_high_noise`` -> 2.5."""
    match = re.search(r"(?:^|_)(\d+(?:\.\d+)?)Hz(?:_|$)", str(name))
    if match is None:
        raise ValueError(f"no sampling rate ('<rate>Hz') in CASCADE model name {name!r}")
    return float(match.group(1))


def choose_auto_model_name(frame_rate_hz: float, names: Iterable[str]) -> str:
    """The official Global_EXC_<rate>Hz_smoothing<ms>ms model best matching the frame rate.

    Keys, in order (so the order of ``names`` never matters): nearest sampling rate; plain variant,
    then _high_noise, _causalkernel, any other (symmetric kernels keep spike timing unbiased);
    smoothing nearest one frame interval (500 ms at 2 Hz, the builtin's), then the smaller one;
    the lower rate; the name. 1.84 Hz -> Global_EXC_2Hz_smoothing500ms, 2.56 Hz ->
    Global_EXC_2.5Hz_smoothing400ms_high_noise (the only 2.5 Hz model).
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
        return (round(abs(model_rate - rate), 9), variant, round(abs(smoothing_ms - 1000 / rate), 9), smoothing_ms)

    return min(matches, key=lambda match: (*key(match), float(match[1]), match[0]))[0]


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
    family = builtin_models()
    if not family:
        raise PipelineError(f"no builtin_<rate>Hz_smoothing<ms>ms folder in {', '.join(map(str, MODEL_SEARCH_DIRS))}")
    return family[min(family, key=lambda name: round(abs(parse_model_sampling_rate_hz(name) - rate), 9))]


def find_model_folder(folder) -> Path:
    """``folder``, or its only sub-folder when it has no config.yaml (as CASCADE's zips unpack)."""
    folder = Path(folder).expanduser()
    if folder.is_dir() and not (folder / "config.yaml").exists():
        inner = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
        return inner[0] if len(inner) == 1 else folder
    return folder  # the loader says what is wrong with it, if anything


def load_model_once(folder, source: str = "model_dir", requested: str = "") -> CascadeModel:
    """load_cascade_model_folder once per process and folder (subjects and worker batches share it)."""
    models = PROCESS_CACHE.setdefault("models", {})
    key = str(Path(folder).expanduser().resolve())
    if key not in models:
        models[key] = load_cascade_model_folder(key)
    return dataclasses.replace(models[key], source=source, requested=requested)


def _choose(folder: Path, source: str, requested: str, why: str = "") -> CascadeModel:
    """The model in ``folder`` with its provenance; each choice is made and logged once per process."""
    choices = PROCESS_CACHE.setdefault("choices", {})
    key = (str(Path(folder).resolve()), source, requested)
    if key not in choices:
        model = choices[key] = load_model_once(folder, source, requested)
        if model.is_fallback:
            log.warning(
                f"CASCADE model '{requested}' is unavailable ({source[len(FALLBACK_SOURCE_PREFIX) : -1]}): "
                f"falling back to the builtin model {model.name} (--strict_model makes this an error)"
            )
        else:
            log.info(
                f"CASCADE model {model.name} (source: {source}{'; ' + why if why else ''}; "
                f"{model.sampling_rate_hz:g} Hz, smoothing {model.smoothing_s:g} s; digest {model.digest}) from {model.folder}"
            )
    return choices[key]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
    """Move the checked model ``folder`` to ``target`` with os.replace, atomically.

    A complete ``target`` that another process (a SLURM array task sharing the cache) installed
    meanwhile wins and ``folder`` is dropped; an incomplete one is moved aside and removed.
    """
    for _attempt in range(3):
        if target.exists():
            try:
                return Path(load_model_once(find_model_folder(target)).folder)
            except PipelineError:
                aside = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
                with contextlib.suppress(FileNotFoundError):
                    os.replace(target, aside)
                    log.warning(f"moved the incomplete CASCADE model folder {target} aside and removed it")
                    _remove(aside)
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
                _remove(stale)
        log.info(f"downloading CASCADE model {name} from {link}")
        with tempfile.TemporaryDirectory(prefix=f".{name}.", suffix=".tmp", dir=cache_dir) as temporary:
            _download_zip(link, Path(temporary) / "model.zip", timeout_s)
            folder = find_model_folder(Path(temporary) / "unzipped")
            load_cascade_model_folder(folder)
            return _install_folder(folder, cache_dir / name)
    except Exception as exc:  # URLError, HTTPException, BadZipFile, the checks' errors, ...
        raise ModelDownloadError(
            f"download of CASCADE model '{name}' from {link} failed: {type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _cached_or_downloaded(name: str, cache_dir: Path, offline: bool) -> tuple:
    """(folder, 'cache' or 'downloaded') for model ``name``, or (None, why it cannot be had).

    Remembered per process: a download that failed is not tried again for the next subject.
    """
    fetched = PROCESS_CACHE.setdefault("fetched", {})
    key, target, problem = (name, str(cache_dir), offline), cache_dir / name, ""
    if key not in fetched and target.exists():
        try:
            fetched[key] = Path(load_model_once(find_model_folder(target)).folder), "cache"
        except PipelineError as exc:
            problem = f"cache entry {target} is incomplete ({exc}); "
            log.warning(f"{problem}it will be replaced by a fresh download")
    if key not in fetched:
        link = official_models(cache_dir).get(name)
        if offline or link is None:
            why = "--offline forbids downloads" if offline else "it is not an official CASCADE model"
            fetched[key] = None, f"{problem}'{name}' is not in the cache {cache_dir} and {why}"
        else:
            try:
                fetched[key] = download_model(name, link, cache_dir), "downloaded"
            except ModelDownloadError as exc:
                fetched[key] = None, f"{problem}{exc}"
    return fetched[key]


def _builtin(frame_rate_hz: float | None, source: str, requested: str, why: str = "") -> CascadeModel:
    try:
        return _choose(nearest_builtin_folder(frame_rate_hz), source, requested, why)
    except PipelineError as exc:
        raise ModelResolutionError(f"builtin CASCADE model: {exc}; restore models/ or pass --model_dir DIR") from None


def resolve_model(
    requested: str = "builtin",
    *,
    model_dir=None,
    cache_dir=None,
    frame_rate_hz: float | None = None,
    strict: bool = False,
    offline: bool = False,
) -> CascadeModel:
    """The CASCADE model for ``requested`` (a name, 'auto' or 'builtin'; ``model_dir`` wins), loaded.

    ``frame_rate_hz`` (the subject's) picks the 'builtin' and 'auto' models; comparing it with the
    model's rate is the caller's (rate_mismatch). ``strict``: an official model that cannot be had is
    an error instead of the builtin fallback. ``offline``: never download. Order: see above.
    """
    if model_dir not in (None, ""):
        try:
            return _choose(find_model_folder(model_dir), "model_dir", str(model_dir))
        except PipelineError as exc:
            raise ModelResolutionError(f"--model_dir {model_dir} is not a usable CASCADE model: {exc}") from None
    name = str(requested or BUILTIN_MODEL_KEYWORD).strip()
    if name.lower() == BUILTIN_MODEL_KEYWORD:
        return _builtin(frame_rate_hz, "builtin", name)
    cache = Path(cache_dir or DEFAULT_MODEL_CACHE_DIR).expanduser()
    is_auto = name.lower() == AUTO_MODEL_KEYWORD
    if is_auto:
        if frame_rate_hz is None or not math.isfinite(frame_rate_hz) or frame_rate_hz <= 0:
            raise ModelResolutionError("--cascade_model auto needs the subject's frame rate; pass a model name")
        try:
            name = choose_auto_model_name(frame_rate_hz, official_models(cache))
        except ValueError as exc:
            raise ModelResolutionError(f"--cascade_model auto: {exc}; pass a model name or --model_dir DIR") from None
    elif not _MODEL_NAME_RE.match(name) or ".." in name:
        raise ModelResolutionError(f"invalid CASCADE model name {name!r}: use an official name, 'auto' or 'builtin'")
    elif not (cache / name).exists() and name not in (links := official_models(cache)):
        close = " or ".join(difflib.get_close_matches(name, links, n=3))
        raise ModelResolutionError(
            f"unknown CASCADE model '{name}' (not official, not in the cache {cache}); "
            + (f"did you mean {close}? " if close else "")
            + "Official names are in models/official_models.yaml; or use 'auto', 'builtin' or --model_dir DIR"
        )
    folder, found = _cached_or_downloaded(name, cache, offline)
    if folder is not None:
        return _choose(folder, found, str(requested))
    if is_auto and offline:  # by design, not a fallback: the best model this machine has
        return _builtin(frame_rate_hz, "builtin", str(requested), why=f"'auto' chose {name}, but {found}")
    if strict:
        raise ModelResolutionError(
            f"--strict_model: CASCADE model '{name}' is unavailable: {found}. Fix: run once where the internet "
            f"can be reached (without --offline), or unzip the model's download into {cache / name} (copy that "
            "folder to machines without internet), or pass --model_dir DIR"
        )
    return _builtin(frame_rate_hz, f"{FALLBACK_SOURCE_PREFIX}{found})", str(requested))


def load_cascade_model(
    folder_or_name, *, cache_dir=None, strict: bool = False, frame_rate_hz: float | None = None
) -> CascadeModel:
    """A CASCADE model from a folder (read afresh), or by name as on the command line (resolve_model)."""
    if Path(str(folder_or_name)).expanduser().is_dir():
        return load_cascade_model_folder(find_model_folder(folder_or_name), "model_dir", str(folder_or_name))
    return resolve_model(str(folder_or_name), cache_dir=cache_dir, strict=strict, frame_rate_hz=frame_rate_hz)


# =============================================================================================
# Inference: noise levels, the fully-convolutional CASCADE engine, thresholds
# =============================================================================================


def calculate_noise_levels(dff: np.ndarray, frame_rate_hz: float) -> np.ndarray:
    """CASCADE's standardised noise level per trace: nanmedian(|diff|)/sqrt(rate) * 100.

    ``frame_rate_hz`` is the model's sampling rate, as in CASCADE. All-NaN traces give NaN.
    """
    dff = np.asarray(dff, dtype=np.float64)
    diffs = np.abs(np.diff(dff, axis=1))
    noise = np.full(dff.shape[0], np.nan)
    has_data = ~np.all(np.isnan(diffs), axis=1) if diffs.shape[1] else np.zeros(len(noise), bool)
    if has_data.any():
        noise[has_data] = np.nanmedian(diffs[has_data], axis=1) / np.sqrt(frame_rate_hz) * 100
    return noise


def assign_model_noise_levels(noise_levels: np.ndarray, model_levels: Sequence[int]) -> np.ndarray:
    """Nearest model noise level per trace (ties go up, as CASCADE's +-0.5 bins); NaN -> lowest.

    For CASCADE's consecutive integer levels this is exactly its selection rule; for gapped level
    lists it still gives every trace a model, where CASCADE would leave some at zero.
    """
    levels = np.asarray(sorted(model_levels), dtype=np.float64)
    noise = np.where(np.isnan(noise_levels), levels[0], noise_levels)
    # index of the first level with level + 0.5 > noise (half-up rounding between neighbours)
    midpoints = (levels[:-1] + levels[1:]) / 2
    index = np.searchsorted(midpoints, noise, side="right")
    return levels[index].astype(int)


def _tensorflow():
    """TensorFlow, imported once per process and quietly (~3 s, ~700 MB: only workers need it).

    TensorFlow's C++ start-up chatter (oneDNN notices, 'failed call to cuInit' on machines
    without a GPU) goes to file descriptor 2 before its log settings apply, so descriptor 2 is
    pointed at /dev/null while it starts; what it found is logged once in our own words. Every
    GPU gets memory growth before first use, so that several workers can share one GPU.
    """
    if "tensorflow" in PROCESS_CACHE:
        return PROCESS_CACHE["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved_stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(devnull)
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # TensorFlow already used the GPU in this process
            log.warning("cannot enable memory growth on %s: %s", gpu.name, exc)
    device = f"{gpus[0].name} (of {len(gpus)} GPU(s), memory growth on)" if gpus else "the CPU (no GPU found)"
    log.info("TensorFlow %s in process %d runs on %s", tf.__version__, os.getpid(), device)
    PROCESS_CACHE["tensorflow"] = tf
    return tf


def configure_tensorflow_threads(num_threads: int | None) -> None:
    """Cap TensorFlow's CPU threads (workers share the cores); no-op once TF has started."""
    if not num_threads:
        return
    tf = _tensorflow()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(num_threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised in this process: keep its settings


class ConvolutionalCascade:
    """CASCADE's network evaluated on whole traces at once, never building windows.

    CASCADE predicts frame t from the window dff[t-o : t-o+W] (o = window_offset) with conv -> conv -> maxpool(2) ->
    conv -> maxpool(2) -> per-position dense -> flatten -> dense. Sliding the window by one frame
    shifts every layer by one sample, so the whole trace is one convolutional pass in which the
    stride-2 poolings become dilations: pooling 1 is max(h[s], h[s+1]), conv 3 reads every 2nd
    sample, pooling 2 is max(h[s], h[s+2]) and the output dense reads every 4th sample.
    Tensors are (B, 1, T, C) so that oneDNN fuses each convolution with its bias and ReLU. Conv 2
    runs polyphase: (T, C) reshaped (free) to (T/2, 2C) holds frames 2i and 2i+1 side by side, and
    one conv with a (K//2 + 1, 2C, 2C') kernel gives both output phases (wider channel blocks
    vectorise better). One ``tf.function`` call per member and chunk; weights are arguments,
    converted once per model; members are summed in float64 in NumPy (an in-graph sum changed the
    last bit with the chunk's shape and kept all members' activations alive). A row's arithmetic
    never depends on the other rows of its chunk (tests/test_inference.py checks it bit for bit).
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

        self._forward = tf.function(forward, reduce_retracing=True)
        self._tf = tf
        self._prepared = {}

    def _constants(self, members: tuple, dense_expansion: int) -> list:
        """Each member's weights as TensorFlow constants in the engine's layout, made once per model."""
        if id(members) not in self._prepared:
            prepared = []
            for w in members:
                k2 = w.conv2_kernel  # (K, C, C') -> polyphase (M, 2C, 2C'): out[2i+q] += k2[2m+p-q] x[2(i+m)+p]
                width, channels, filters = k2.shape
                poly = np.zeros((width // 2 + 1, 2 * channels, 2 * filters), np.float32)
                for m, p, q in itertools.product(range(len(poly)), range(2), range(2)):
                    if 0 <= 2 * m + p - q < width:
                        poly[m, p * channels : (p + 1) * channels, q * filters : (q + 1) * filters] = k2[2 * m + p - q]
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


def _engine() -> ConvolutionalCascade:
    if "engine" not in PROCESS_CACHE:
        PROCESS_CACHE["engine"] = ConvolutionalCascade()
    return PROCESS_CACHE["engine"]


def _nan_window_mask(nan_frames: np.ndarray, window_size: int, num_windows: int) -> np.ndarray:
    """True for every window start whose window holds at least one NaN frame."""
    counts = np.concatenate(
        [np.zeros((nan_frames.shape[0], 1), np.int32), np.cumsum(nan_frames, axis=1, dtype=np.int32)], axis=1
    )
    return (counts[:, window_size : window_size + num_windows] - counts[:, :num_windows]) > 0


def predict_raw_rates(dff: np.ndarray, model: CascadeModel, *, max_chunk_frames: int = 1 << 19) -> tuple:
    """Ensemble-mean network output per frame (no threshold, no padding) and the noise report.

    Returns (rates (N, T) float64 with NaN where no prediction exists, noise_levels (N,),
    model_noise_levels (N,)). Traces are processed in chunks of about ``max_chunk_frames``
    neuron-frames so memory stays a small multiple of one chunk whatever N is.
    """
    dff = np.asarray(dff)
    if dff.ndim != 2:
        raise ValueError(f"dF/F must be 2-D (neurons, frames), got shape {dff.shape}")
    num_neurons, num_frames = dff.shape
    window = model.window_size
    rates = np.full((num_neurons, num_frames), np.nan)
    noise = calculate_noise_levels(dff, model.sampling_rate_hz)
    model_noise = assign_model_noise_levels(noise, model.noise_levels)
    num_windows = num_frames - window + 1
    if num_neurons == 0 or num_windows <= 0:
        return rates, noise, model_noise
    engine = _engine()
    rows_per_chunk = max(1, max_chunk_frames // num_frames)
    first = model.window_offset
    for level in model.noise_levels:
        rows = np.flatnonzero(model_noise == level)
        members = model.ensembles[level]
        for start in range(0, len(rows), rows_per_chunk):
            chunk_rows = rows[start : start + rows_per_chunk]
            traces = dff[chunk_rows].astype(np.float32)
            nan_frames = np.isnan(traces)
            traces[nan_frames] = 0.0  # masked below: any NaN in a window gives NaN
            total = engine(traces, members, model.dense_expansion)[:, :num_windows] / np.float64(len(members))
            if nan_frames.any():
                total[_nan_window_mask(nan_frames, window, num_windows)] = np.nan
            rates[chunk_rows, first : first + num_windows] = total
    return rates, noise, model_noise


def _single_spike_peak(smoothing_frames: float) -> float:
    """Peak of one spike smoothed with CASCADE's Gaussian (scipy's gaussian_filter of a delta)."""
    from scipy.ndimage import gaussian_filter1d

    delta = np.zeros(1001)
    delta[501] = 1.0
    return float(gaussian_filter1d(delta, sigma=smoothing_frames).max())


def apply_cascade_threshold(rates: np.ndarray, model: CascadeModel, threshold) -> np.ndarray:
    """CASCADE's output post-processing, in place: threshold False (raw), 0 or 1.

    threshold 0: negative rates -> 0. threshold 1: CASCADE's noise-floor cut: keep only frames
    within int(smoothing*rate) frames of a rate above 1/e of a single smoothed spike's peak,
    everything else (NaN included, exactly as CASCADE) -> 0, then negatives -> 0.
    """
    if threshold is False or threshold is None:
        return rates
    if threshold == 1:
        from scipy.ndimage import maximum_filter1d

        threshold_value = _single_spike_peak(model.smoothing_frames) / math.e
        with np.errstate(invalid="ignore"):
            active = rates > threshold_value
        reach = int(model.smoothing_frames)
        if reach > 0:
            active = maximum_filter1d(active.view(np.uint8), size=2 * reach + 1, axis=1, mode="constant").astype(bool)
        else:
            # scipy's binary_dilation with iterations=0 dilates until nothing changes
            active = np.repeat(active.any(axis=1, keepdims=True), rates.shape[1], axis=1)
        rates[~active] = 0.0
        with np.errstate(invalid="ignore"):
            rates[rates < 0] = 0.0
        return rates
    if threshold == 0:
        with np.errstate(invalid="ignore"):
            rates[rates < 0] = 0.0
        return rates
    raise ValueError(f"threshold must be 0, 1 or False, got {threshold!r}")


def predict_spike_rates(
    dff: np.ndarray,
    model: CascadeModel,
    threshold=0,
    padding=np.nan,
    *,
    return_noise: bool = False,
    max_chunk_frames: int = 1 << 19,
):
    """CASCADE spike rates (spikes per frame) for dF/F traces shaped (neurons, frames).

    Same semantics as ``cascade2p.cascade.predict``: dF/F as fractions; each neuron uses the
    ensemble of its nearest model noise level; ensemble mean; ``threshold`` 0, 1 or False; the
    first int(before_frac*W) and last int((1-before_frac)*W) frames set to ``padding``. Unlike
    CASCADE (whose max-pooling can swallow a NaN), any NaN inside a window gives NaN; traces whose
    NaNs are whole rows give identical results. With ``return_noise`` also returns a per-neuron
    report {'noise_level', 'model_noise_level'}.
    """
    rates, noise, model_noise = predict_raw_rates(dff, model, max_chunk_frames=max_chunk_frames)
    apply_cascade_threshold(rates, model, threshold)
    num_frames = rates.shape[1]
    rates[:, : min(model.frames_before, num_frames)] = padding
    if model.frames_after > 0:
        rates[:, max(0, num_frames - model.frames_after) :] = padding
    if return_noise:
        return rates, {"noise_level": noise, "model_noise_level": model_noise}
    return rates


# =============================================================================================
# Discrete spikes: deterministic greedy placement of smoothed unit spikes
# =============================================================================================


def _gaussian_kernel(sigma_frames: float) -> np.ndarray:
    """scipy.ndimage's Gaussian (truncate=4) as explicit taps; a unit spike's smoothed shape."""
    radius = max(1, int(4.0 * sigma_frames + 0.5))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / max(sigma_frames, 1e-6)) ** 2)
    return kernel / kernel.sum()


# A spike may raise the L1 error by up to 10% of its own mass: CASCADE's Monte-Carlo search,
# with its prune-and-refill passes, ends with about that many spikes (checked on its reference).
DISCRETE_MIN_L1_GAIN = -0.1


def _segment_positions(starts: np.ndarray, lengths: np.ndarray, pad: int) -> np.ndarray:
    """Flat indices of every segment, each extended by ``pad`` on both sides, concatenated."""
    extended = lengths + 2 * pad
    block_start = np.repeat(starts - pad - np.concatenate([[0], np.cumsum(extended)[:-1]]), extended)
    return block_start + np.arange(extended.sum())


def infer_discrete_spikes(rates: np.ndarray, model: CascadeModel) -> np.ndarray:
    """Integer spike counts per frame whose Gaussian-smoothed train best matches the rates.

    Same idea as CASCADE's infer_discrete_spikes: the rate is split into supported segments
    (rate > 0.03/sigma, dilated by 4 sigma), and spikes, each smoothed with CASCADE's Gaussian
    (sigma = smoothing * sampling_rate frames), are added while the segment's spike count is
    below its rounded summed rate and each new spike fits the rate about as well or better (L1).
    CASCADE places spikes by Monte-Carlo sampling; here every round adds, in every unfinished
    segment at once, the spike that lowers the error most (greedy, deterministic, vectorised over
    all segments of all neurons). NaN rates count as 0 and get no spikes.
    """
    from scipy.ndimage import maximum_filter1d

    rates = np.nan_to_num(np.asarray(rates, dtype=np.float64), nan=0.0)
    num_neurons, num_frames = rates.shape
    counts = np.zeros((num_neurons, num_frames), dtype=np.int32)
    if rates.size == 0:
        return counts
    sigma = max(model.smoothing_frames, 1e-6)
    kernel = _gaussian_kernel(sigma)
    radius = len(kernel) // 2
    support = rates > 0.03 / sigma
    support = maximum_filter1d(support.view(np.uint8), size=max(1, round(4 * sigma)), axis=1, mode="constant").astype(
        bool
    )
    # Rows laid end to end with `radius` zeros between them, so no kernel reaches a neighbour.
    width = num_frames + 2 * radius
    rate_flat = np.zeros((num_neurons, width))
    rate_flat[:, radius : radius + num_frames] = rates
    rate_flat = rate_flat.ravel()
    support_flat = np.zeros((num_neurons, width), bool)
    support_flat[:, radius : radius + num_frames] = support
    edges = np.diff(np.concatenate([[0], support_flat.ravel().view(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lengths = ends - starts
    segment_sum = np.add.reduceat(rate_flat, starts) if len(starts) else np.zeros(0)
    budget = np.floor(segment_sum + 0.5)  # at most the spikes the segment's rate mass stands for
    placed = np.zeros(len(starts), dtype=np.int64)
    approximation = np.zeros_like(rate_flat)
    spikes_flat = np.zeros(rate_flat.shape, dtype=np.int32)
    active = np.flatnonzero(placed < budget)
    offsets = np.arange(-radius, radius + 1)
    while active.size:
        seg_start, seg_length = starts[active], lengths[active]
        positions = _segment_positions(seg_start, seg_length, radius)
        error = rate_flat[positions] - approximation[positions]
        # L1 error change of adding one smoothed spike at each position, summed over its taps
        gain = np.zeros(len(positions) - 2 * radius)
        for tap, weight in enumerate(kernel):
            window_error = error[tap : tap + len(gain)]
            gain += np.abs(window_error) - np.abs(window_error - weight)
        # keep the core (un-padded) positions of every segment
        core_start = np.concatenate([[0], np.cumsum(seg_length + 2 * radius)[:-1]])
        core = _segment_positions(core_start + radius, seg_length, 0)
        core_gain = gain[core - radius]
        core_offset = np.concatenate([[0], np.cumsum(seg_length)[:-1]])
        best = np.maximum.reduceat(core_gain, core_offset)
        owner = np.repeat(np.arange(len(active)), seg_length)
        is_best = np.flatnonzero(core_gain == best[owner])
        first_owner, first_index = np.unique(owner[is_best], return_index=True)
        best_offset = is_best[first_index] - core_offset[first_owner]
        accept = best[first_owner] > DISCRETE_MIN_L1_GAIN
        chosen = active[first_owner[accept]]
        spike_at = starts[chosen] + best_offset[accept]
        np.add.at(approximation, (spike_at[:, None] + offsets).ravel(), np.tile(kernel, len(spike_at)))
        np.add.at(spikes_flat, spike_at, 1)
        placed[chosen] += 1
        active = chosen[placed[chosen] < budget[chosen]]
    counts[:] = spikes_flat.reshape(num_neurons, width)[:, radius : radius + num_frames]
    return counts


# =============================================================================================
# Spike binarisation: rates -> binary spikes, reproducible whatever the batching
# =============================================================================================


def binarize_spikes(
    rates: np.ndarray,
    cell_ids: np.ndarray,
    mode: str,
    *,
    seed: int = 42,
    spike_threshold: float = 0.5,
    model: CascadeModel | None = None,
) -> np.ndarray:
    """Binary spikes (N, T) bool from CASCADE rates (spikes/frame); NaN frames never spike.

    sample: Bernoulli(clip(rate, 0, 1)) from a random stream keyed by (seed, cell id), so a cell
    gets the same spikes whatever --workers or --batch_size; discrete: infer_discrete_spikes > 0;
    threshold: rate >= spike_threshold.
    """
    finite = np.nan_to_num(rates, nan=0.0)
    if mode == "threshold":
        return finite >= spike_threshold
    if mode == "discrete":
        if model is None:
            raise ValueError("discrete spikes need the CASCADE model (its smoothing)")
        return infer_discrete_spikes(rates, model) > 0
    if mode != "sample":
        raise ValueError(f"unknown spike mode {mode!r}")
    probability = np.clip(finite, 0.0, 1.0)
    spikes = np.zeros(rates.shape, dtype=bool)
    for row, cell_id in enumerate(np.asarray(cell_ids, dtype=np.int64)):
        stream = np.random.Generator(np.random.Philox(key=[int(seed) & (2**64 - 1), int(cell_id)]))
        spikes[row] = stream.random(rates.shape[1]) < probability[row]
    return spikes


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
    z_values: np.ndarray  # (Z,) distinct z positions, ascending
    cell_voxels: np.ndarray  # (N, 3) int32 [z, x, y] per cell

    @property
    def shape(self) -> tuple:
        return (self.num_timepoints, self.num_z_planes, self.height, self.width)

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def voxels_per_timepoint(self) -> int:
        return self.num_z_planes * self.height * self.width


def _scale_to_pixels(values: np.ndarray, size: int, low: float, high: float) -> np.ndarray:
    """Min-max scale [low, high] to [0, size-1] and floor (the original's mapping), clipped."""
    if high <= low:
        return np.zeros(len(values), dtype=np.int32)
    scaled = np.floor((values - low) / (high - low) * (size - 1))
    return np.clip(scaled, 0, size - 1).astype(np.int32)


def make_grid_spec(
    positions: np.ndarray,
    num_timepoints: int,
    height: int,
    width: int,
    z_markers: bool = True,
    valid: np.ndarray | None = None,
) -> GridSpec:
    """x (column 1) -> [0, H-1], y (column 2) -> [0, W-1], one plane per distinct z value.

    Scaling and planes come from the ``valid`` cells only (all cells by default); other cells
    get the voxel of their clipped position (they carry no spikes).
    """
    valid = np.ones(len(positions), bool) if valid is None else np.asarray(valid, bool)
    reference = positions[valid]
    z_values = np.unique(reference[:, 2])
    if z_markers and len(z_values) + 1 > width:
        raise PipelineError(
            f"{len(z_values)} z-planes need a grid width of at least "
            f"{len(z_values) + 1} for the z markers (--grid_shape or --no_z_markers)"
        )
    low, high = reference.min(axis=0), reference.max(axis=0)
    z_index = np.clip(np.searchsorted(z_values, positions[:, 2]), 0, len(z_values) - 1)
    voxels = np.stack(
        [
            z_index.astype(np.int32),
            _scale_to_pixels(positions[:, 0], height, low[0], high[0]),
            _scale_to_pixels(positions[:, 1], width, low[1], high[1]),
        ],
        axis=1,
    )
    return GridSpec(num_timepoints, len(z_values), height, width, z_values, voxels)


def z_marker_coords(grid: GridSpec, timepoints: range | None = None) -> np.ndarray:
    """The original's 'preaugmented' z markers: rows 0-1, columns W-(z+2)..W-1 for every (t, z)."""
    timepoints = range(grid.num_timepoints) if timepoints is None else timepoints
    per_plane = []
    for z in range(grid.num_z_planes):
        rows, cols = np.meshgrid(np.arange(2), np.arange(grid.width - (z + 2), grid.width), indexing="ij")
        per_plane.append(np.stack([np.full(rows.size, z), rows.ravel(), cols.ravel()], axis=1))
    plane_pixels = np.concatenate(per_plane).astype(np.int32)  # (P, 3) [z, x, y]
    t = np.repeat(np.asarray(timepoints, dtype=np.int32), len(plane_pixels))
    return np.column_stack([t, np.tile(plane_pixels, (len(timepoints), 1))])


def _linear_index(coords: np.ndarray, shape: tuple) -> np.ndarray:
    return np.ravel_multi_index(tuple(coords.T.astype(np.int64)), shape)


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
    spike_cells: np.ndarray,
    spike_frames: np.ndarray,
    grid: GridSpec,
    frame_to_timepoint: np.ndarray,
    z_markers: bool = True,
    timepoints: range | None = None,
) -> tuple:
    """Unique, sorted [t, z, x, y] int32 coordinates of every active voxel, and CooCounts.

    ``spike_frames`` are original frame numbers; frames mapped to -1 (dropped) are skipped.
    Several cells in one voxel at one time give one active voxel (counted as collisions).
    ``timepoints`` limits the z markers to a block of timepoints (all by default); the spikes
    given must then fall in that block.
    """
    timepoint = frame_to_timepoint[spike_frames]
    keep = timepoint >= 0
    cell_flat = _linear_index(grid.cell_voxels, grid.shape[1:])
    spike_linear = np.unique(timepoint[keep] * grid.voxels_per_timepoint + cell_flat[spike_cells[keep]])
    marker_linear = _linear_index(z_marker_coords(grid, timepoints), grid.shape) if z_markers else np.zeros(0, np.int64)
    all_linear = np.union1d(spike_linear, marker_linear)  # sorted, unique
    coords = np.stack(np.unravel_index(all_linear, grid.shape), axis=1).astype(np.int32)
    spikes_in_grid = int(keep.sum())
    counts = CooCounts(
        spike_pixels=len(spike_linear),
        marker_pixels=len(marker_linear),
        marker_spike_overlap=len(spike_linear) + len(marker_linear) - len(all_linear),
        spikes_in_grid=spikes_in_grid,
        collisions=spikes_in_grid - len(spike_linear),
    )
    return coords, counts


def train_test_split(num_timepoints: int, block_frames: int = 330, split_ratio: float = 0.95, seed: int = 42) -> tuple:
    """The original's split: blocks of ``block_frames`` shuffled with RandomState(seed); the
    first max(1, int(num_blocks*(1-split_ratio))) shuffled blocks are test, the rest and any
    leftover frames train. Returns (is_train (T,) uint8, test block indices)."""
    num_blocks = max(1, num_timepoints // block_frames)
    order = np.random.RandomState(seed).permutation(num_blocks)
    test_blocks = np.sort(order[: max(1, int(num_blocks * (1 - split_ratio)))])
    is_train = np.ones(num_timepoints, dtype=np.uint8)
    for block in test_blocks:
        is_train[block * block_frames : (block + 1) * block_frames] = 0
    return is_train, test_blocks


@dataclass(frozen=True)
class GridPlan:
    """Everything gridding decides before any spike is placed: the grid, kept frames, split."""

    grid: GridSpec
    kept_frames: np.ndarray  # (T,) original frame of each timepoint
    frame_to_timepoint: np.ndarray  # (frames,) timepoint of each frame, -1 if dropped
    predicted: np.ndarray  # (frames,) bool: frames CASCADE could predict
    is_train: np.ndarray  # (T,) uint8
    test_blocks: np.ndarray


def plan_grid(positions, valid, num_frames: int, model: CascadeModel, config: PipelineConfig) -> GridPlan:
    """Kept frames (CASCADE's edge frames are dropped unless --keep_edge_frames), grid and split."""
    predicted = np.zeros(num_frames, dtype=bool)
    predicted[model.frames_before : num_frames - model.frames_after] = True
    kept_frames = np.arange(num_frames) if config.keep_edge_frames else np.flatnonzero(predicted)
    frame_to_timepoint = np.full(num_frames, -1, dtype=np.int64)
    frame_to_timepoint[kept_frames] = np.arange(len(kept_frames))
    grid = make_grid_spec(
        positions, len(kept_frames), config.grid_height, config.grid_width, config.z_markers, valid=valid
    )
    is_train, test_blocks = train_test_split(len(kept_frames), config.split_block, config.split_ratio, config.seed)
    return GridPlan(grid, kept_frames, frame_to_timepoint, predicted, is_train, test_blocks)


def coo_blocks(spikes: SubjectSpikes, plan: GridPlan, z_markers: bool) -> Iterator[tuple]:
    """build_coo over consecutive blocks of timepoints: yields (coords, counts) in sorted order."""
    per_timepoint = spikes.frame_counts[plan.kept_frames]
    bounds = [0]
    budget = 0
    for t, count in enumerate(per_timepoint):
        if budget + count > SPIKES_PER_GRID_BLOCK and t > bounds[-1]:
            bounds.append(t)
            budget = 0
        budget += count
    bounds.append(len(plan.kept_frames))
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        if t1 <= t0:
            continue
        cells, frames = spikes.events_in_frames(plan.kept_frames[t0], plan.kept_frames[t1 - 1] + 1)
        yield build_coo(cells, frames, plan.grid, plan.frame_to_timepoint, z_markers, range(t0, t1))


def coo_to_dense_grid(spike_coords: np.ndarray, grid_shape, spike_values=None, dtype=np.uint8) -> np.ndarray:
    """Dense (T, Z, H, W) array from COO coordinates (vectorised). Mind the size: T*Z*H*W bytes."""
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

CELLS_PER_CHUNK = 2048  # cells streamed through dF/F -> CASCADE -> spikes at once in a worker
RATE_SUM_SCALE = 2.0**32  # population rate summed in fixed point: exact whatever the batching
PROGRESS_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class InferenceSettings:
    """What a worker needs to turn traces into spikes (the same for every batch of a subject)."""

    is_fluorescence: bool
    frame_rate_hz: float
    baseline_window_s: float
    baseline_percentile: float
    cascade_threshold: object
    spike_mode: str
    spike_threshold: float
    seed: int


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


@dataclass
class BatchResult:
    """A batch's spikes as (frame, cell) events sorted by frame, and per-cell summaries."""

    start: int
    spike_frames: np.ndarray  # (S,) int32, ascending
    spike_cells: np.ndarray  # (S,) int32 subject rows, ascending within a frame
    spike_count: np.ndarray  # (B,) int32 spikes per cell (all frames)
    noise_level: np.ndarray  # (B,) CASCADE noise level per cell
    model_noise_level: np.ndarray  # (B,) the model noise level each cell used
    nan_frames: np.ndarray  # (B,) int32 frames without a value (NaN or infinite)
    infinite_values: np.ndarray  # (B,) int32 infinite values (treated as NaN)
    rate_sum_fixed: np.ndarray  # (T,) int64 sum of rates over cells * RATE_SUM_SCALE
    plot_rows: np.ndarray
    plot_dff: np.ndarray
    plot_rates: np.ndarray
    plot_spikes: np.ndarray
    seconds: float


def infer_spikes(traces: np.ndarray, cell_ids: np.ndarray, model: CascadeModel, settings: InferenceSettings):
    """dF/F -> CASCADE rates -> binary spikes for a chunk of cells: (dff, rates, spikes, noise report)."""
    dff = (
        compute_dff(traces, settings.frame_rate_hz, settings.baseline_window_s, settings.baseline_percentile)
        if settings.is_fluorescence
        else traces
    )
    rates, report = predict_spike_rates(dff, model, threshold=settings.cascade_threshold, return_noise=True)
    spikes = binarize_spikes(
        rates, cell_ids, settings.spike_mode, seed=settings.seed, spike_threshold=settings.spike_threshold, model=model
    )
    return dff, rates, spikes, report


def process_batch(task: BatchTask) -> BatchResult:
    """One batch, a chunk of cells at a time; only compact results leave the worker."""
    started = time.perf_counter()
    model = load_model_once(task.model_folder, task.model_source)
    num_frames = task.trace_file.num_frames
    parts: dict = {key: [] for key in ("frames", "cells", "count", "noise", "level", "nan", "inf", "plot")}
    rate_sum_fixed = np.zeros(num_frames, dtype=np.int64)
    for start in range(task.start, task.stop, CELLS_PER_CHUNK):
        stop = min(start + CELLS_PER_CHUNK, task.stop)
        traces = task.trace_file.read_raw(start, stop)
        parts["inf"].append(mark_infinite_as_missing(traces))
        parts["nan"].append(np.isnan(traces).sum(axis=1).astype(np.int32))
        ids = task.cell_ids[start - task.start : stop - task.start]
        dff, rates, spikes, report = infer_spikes(traces, ids, model, task.settings)
        frames, cells = np.nonzero(spikes.T)  # sorted by frame, then cell
        parts["frames"].append(frames.astype(np.int32))
        parts["cells"].append((cells + start).astype(np.int32))
        parts["count"].append(spikes.sum(axis=1).astype(np.int32))
        parts["noise"].append(report["noise_level"])
        parts["level"].append(report["model_noise_level"])
        rate_sum_fixed += np.round(np.nan_to_num(rates) * RATE_SUM_SCALE).astype(np.int64).sum(axis=0)
        local = task.plot_rows[(task.plot_rows >= start) & (task.plot_rows < stop)] - start
        parts["plot"].append((dff[local].astype(np.float32), rates[local].astype(np.float32), spikes[local]))
    frames = np.concatenate(parts["frames"])
    order = np.argsort(frames, kind="stable")  # chunks ascend in cell: (frame, cell) order overall
    plot_dff, plot_rates, plot_spikes = (np.concatenate(p) for p in zip(*parts["plot"]))
    return BatchResult(
        start=task.start,
        spike_frames=frames[order],
        spike_cells=np.concatenate(parts["cells"])[order],
        spike_count=np.concatenate(parts["count"]),
        noise_level=np.concatenate(parts["noise"]),
        model_noise_level=np.concatenate(parts["level"]),
        nan_frames=np.concatenate(parts["nan"]),
        infinite_values=np.concatenate(parts["inf"]),
        rate_sum_fixed=rate_sum_fixed,
        plot_rows=task.plot_rows,
        plot_dff=plot_dff,
        plot_rates=plot_rates,
        plot_spikes=plot_spikes,
        seconds=time.perf_counter() - started,
    )


@dataclass
class SubjectSpikes:
    """A subject's inference results, gathered from its batches in order of their cells."""

    batches: list  # BatchResult per batch, ascending cells; each holds its frame-sorted events
    num_frames: int

    def cells(self, key: str) -> np.ndarray:
        """A per-cell summary over all batches, e.g. cells('spike_count')."""
        return np.concatenate([getattr(batch, key) for batch in self.batches])

    @property
    def valid(self) -> np.ndarray:
        """Cells with at least one value (all-NaN cells are left out of the grid)."""
        return self.cells("nan_frames") < self.num_frames

    @property
    def frame_counts(self) -> np.ndarray:
        """(frames,) spikes per frame over all cells."""
        return sum(np.bincount(b.spike_frames, minlength=self.num_frames) for b in self.batches)

    @property
    def rate_sum(self) -> np.ndarray:
        """(frames,) sum of CASCADE rates over cells (spikes/frame), identical whatever the batching."""
        return sum(b.rate_sum_fixed for b in self.batches) / RATE_SUM_SCALE

    def events_in_frames(self, first: int, stop: int) -> tuple:
        """(cells, frames) of every spike in frames [first, stop)."""
        cells, frames = [], []
        for batch in self.batches:
            lo, hi = np.searchsorted(batch.spike_frames, [first, stop])
            cells.append(batch.spike_cells[lo:hi])
            frames.append(batch.spike_frames[lo:hi])
        return np.concatenate(cells), np.concatenate(frames)

    def events_of_cells(self, rows: np.ndarray) -> tuple:
        """(cells, frames) of every spike of the given cells."""
        cells, frames = [], []
        for batch in self.batches:
            mine = np.isin(batch.spike_cells, rows)
            cells.append(batch.spike_cells[mine])
            frames.append(batch.spike_frames[mine])
        return np.concatenate(cells), np.concatenate(frames)

    def plot_traces(self) -> tuple:
        """(rows, dff, rates, spikes) of the cells shown in the PDF."""
        return tuple(
            np.concatenate([getattr(b, key) for b in self.batches])
            for key in ("plot_rows", "plot_dff", "plot_rates", "plot_spikes")
        )


def available_cpus() -> int:
    """CPUs this process may use (respects SLURM/cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _init_worker(num_threads: int, log_level: int) -> None:
    # The parent stops the workers itself: a Ctrl-C or SLURM's SIGTERM reaching the whole process
    # group must not print one traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [worker] %(message)s")
    configure_tensorflow_threads(num_threads)


class WorkerDied(PipelineError):
    """A worker process died (killed by the OOM killer, a signal, or a crash) during a batch."""


class WorkerPool:
    """Worker processes for CASCADE (or the calling process when there is one worker).

    Built on concurrent.futures' ProcessPoolExecutor, which reports a worker that died instead
    of waiting for it forever (multiprocessing.Pool hangs); the pool is then rebuilt for the next
    subject. Workers are started with 'spawn': TensorFlow is not fork-safe.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.threads_per_worker = max(1, available_cpus() // workers)
        self._executor = None
        if workers == 1:
            configure_tensorflow_threads(available_cpus())

    def _start(self):
        import concurrent.futures
        import multiprocessing

        if self._executor is None:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads_per_worker, logging.getLogger().level),
            )
        return self._executor

    def close(self, kill: bool = False) -> None:
        """Stop the workers; ``kill`` ends them at once (interrupts, dead pools)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        processes = list((getattr(executor, "_processes", None) or {}).values())
        if kill:
            for process in processes:
                with contextlib.suppress(Exception):
                    process.kill()
        executor.shutdown(wait=not kill, cancel_futures=True)

    def map(self, tasks: Iterator[BatchTask], progress: Progress) -> list:
        """Results of every task in order; at most workers + 1 tasks in flight."""
        if self.workers == 1:
            results = []
            for task in tasks:
                results.append(process_batch(task))
                progress.advance(task.stop - task.start)
            return results
        from collections import deque
        from concurrent.futures.process import BrokenProcessPool

        executor = self._start()
        pending: deque = deque()
        results = []
        try:
            for task in itertools.chain(tasks, [None]):
                if task is not None:
                    pending.append((task, executor.submit(process_batch, task)))
                while pending and (len(pending) > self.workers or task is None):
                    done_task, future = pending.popleft()
                    results.append(future.result())
                    progress.advance(done_task.stop - done_task.start)
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
        processes = (getattr(self._executor, "_processes", None) or {}).values()
        codes = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
        if not codes:
            return "exit status unknown"
        code = codes[0]
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"


class Progress:
    """A tqdm bar on a terminal; elsewhere (SLURM and cron logs) a log line per finished batch,
    at most one a minute: batches done, neuron-frames/s, time left and memory."""

    def __init__(self, subject: str, num_batches: int, num_cells: int, num_frames: int):
        self.subject, self.num_batches, self.num_frames = subject, num_batches, num_frames
        self.num_cells, self.done_batches, self.done_cells = num_cells, 0, 0
        self.started = self.last_log = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=num_batches, desc=f"{subject} CASCADE", unit="batch", leave=False)

    def advance(self, cells: int) -> None:
        self.done_batches += 1
        self.done_cells += cells
        if self.bar is not None:
            self.bar.update()
            return
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_LOG_INTERVAL_S and self.done_batches < self.num_batches:
            self.last_log = now
            rate = self.done_cells * self.num_frames / max(now - self.started, 1e-9)
            left_s = (self.num_cells - self.done_cells) * self.num_frames / max(rate, 1e-9)
            log.info(
                "%s: CASCADE %d/%d batches, %.0f neuron-frames/s, about %.0f min left, RSS %.2f GB",
                self.subject,
                self.done_batches,
                self.num_batches,
                rate,
                left_s / 60,
                rss_gb(),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
# 9. Outputs: atomic writers for the COO grid, metadata and combined metadata; readers
# =============================================================================================
# Every file is written to a temporary name in its final folder and renamed into place, so a
# crash, a kill or a full disk never leaves half a file under a final name. A subject's metadata
# is its commit record: it is removed before and renamed last after the other files, so the
# presence of metadata.h5 with a matching run id means the subject's set of files is complete.

COO_FILENAME = "preaugmented_grids_coo.h5"
METADATA_FILENAME = "metadata.h5"
COMBINED_FILENAME = "combined_metadata.h5"
COO_BYTES_PER_ENTRY = 4 * 4 + 1  # four int32 coordinates + one uint8 value
COO_CHUNK_ROWS = 1 << 16  # row chunks: a window of timepoints reads only its own chunks
TEMPORARY_MARKER = ".tmp-"


class WriteFailed(PipelineError):
    """Writing an output failed (full disk, quota, permissions): the run stops cleanly."""


def pdf_filename(subject_name: str) -> str:
    return f"{subject_name}_visualization.pdf"


def temporary_path(final: Path) -> Path:
    """A hidden sibling of ``final`` naming this host and process (to find leftovers of dead runs)."""
    return final.with_name(
        f".{final.name}{TEMPORARY_MARKER}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )


def _set_attrs(h5, attrs: dict) -> None:
    for key, value in attrs.items():
        h5.attrs[key] = h5_attr_value(value)


def _write_dataset(h5, name, data, compress: bool = True):
    data = np.asarray(data)
    if compress and data.size > 0 and data.ndim > 0:
        return h5.create_dataset(name, data=data, compression="gzip", compression_opts=4, shuffle=True)
    return h5.create_dataset(name, data=data)


def write_coo_file(path: Path, blocks: Iterable[tuple], plan: GridPlan, attrs: dict) -> tuple:
    """Stream COO blocks (coords, counts) into ``path``; returns (CooCounts, per-plane entries).

    Datasets: spike_coords (E, 4) int32 [t, z, x, y] sorted, spike_values (E,) uint8 ones,
    timepoint_offsets (T+1,) int64 (entries of timepoint t are rows offsets[t]:offsets[t+1]),
    grid_shape, timepoint_indices (original frame of each t), is_train.
    """
    import h5py

    grid = plan.grid
    counts = CooCounts()
    plane_entries = np.zeros(grid.num_z_planes, dtype=np.int64)
    per_timepoint = np.zeros(grid.num_timepoints, dtype=np.int64)
    with h5py.File(path, "w") as h5:
        options = dict(chunks=(COO_CHUNK_ROWS, 1), compression="gzip", compression_opts=4, shuffle=True)
        coords_out = h5.create_dataset("spike_coords", (0, 4), np.int32, maxshape=(None, 4), **options)
        written = 0
        for coords, block_counts in blocks:
            counts += block_counts
            if len(coords):
                coords_out.resize(written + len(coords), axis=0)
                coords_out[written:] = coords
                written += len(coords)
            plane_entries += np.bincount(coords[:, 1], minlength=grid.num_z_planes)
            per_timepoint += np.bincount(coords[:, 0], minlength=grid.num_timepoints)
        h5.create_dataset(
            "spike_values",
            data=np.ones(written, np.uint8),
            chunks=(min(COO_CHUNK_ROWS, written),) if written else None,
            compression="gzip" if written else None,
            shuffle=bool(written),
        )
        _write_dataset(h5, "timepoint_offsets", np.concatenate([[0], np.cumsum(per_timepoint)]).astype(np.int64))
        _write_dataset(h5, "grid_shape", np.asarray(grid.shape, dtype=np.int32), compress=False)
        _write_dataset(h5, "timepoint_indices", plan.kept_frames.astype(np.int32))
        _write_dataset(h5, "is_train", plan.is_train.astype(np.uint8))
        _set_attrs(h5, {**attrs, **coo_attrs(counts, written, grid)})
    return counts, plane_entries


def coo_attrs(counts: CooCounts, num_entries: int, grid: GridSpec) -> dict:
    """The counts every COO and metadata file records (total_spikes counts every entry, markers
    included, as the original defined it)."""
    return {
        "total_spikes": num_entries,
        "total_pixels": grid.num_voxels,
        "sparsity_percent": 100.0 * num_entries / max(grid.num_voxels, 1),
        **dataclasses.asdict(counts),
    }


def write_metadata_file(path: Path, attrs: dict, datasets: dict, cells: dict) -> None:
    import h5py

    with h5py.File(path, "w") as h5:
        _set_attrs(h5, attrs)
        for key, value in datasets.items():
            _write_dataset(h5, key, value)
        group = h5.create_group("cells")
        for key, value in cells.items():
            _write_dataset(group, key, value)


def read_attrs(path: Path) -> dict | None:
    """A file's HDF5 attributes, or None when it is absent or unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return {key: h5.attrs[key] for key in h5.attrs}
    except (OSError, KeyError):
        return None


def write_combined_metadata(output_dir: Path, subject_dirs: list, excluded: dict) -> dict:
    """combined_metadata.h5: one group per subject (a copy of its metadata.h5), totals, and the
    subject folders left out with the reason (attribute `excluded`)."""
    import h5py

    totals = {"total_subjects": 0, "total_spikes": 0, "total_pixels": 0}
    final = output_dir / COMBINED_FILENAME
    temporary = temporary_path(final)
    try:
        with h5py.File(temporary, "w") as combined:
            for subject_dir in subject_dirs:
                with h5py.File(subject_dir / METADATA_FILENAME, "r") as source:
                    source.copy(source["/"], combined, name=subject_dir.name)
                    totals["total_subjects"] += 1
                    totals["total_spikes"] += int(source.attrs["total_spikes"])
                    totals["total_pixels"] += int(source.attrs["total_pixels"])
            totals["overall_sparsity_percent"] = (
                100.0 * totals["total_spikes"] / totals["total_pixels"] if totals["total_pixels"] else 0.0
            )
            _set_attrs(combined, totals)
            _set_attrs(
                combined,
                {
                    "format": "COO_sparse",
                    "software_version": __version__,
                    "subjects": [p.name for p in subject_dirs],
                    "excluded": excluded,
                },
            )
        os.replace(temporary, final)
    finally:
        remove_quietly(temporary)
    return totals


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def load_coo_grid(path) -> dict:
    """Everything in a preaugmented_grids_coo.h5 as numpy arrays plus its attributes."""
    import h5py

    with h5py.File(path, "r") as h5:
        result = {key: h5[key][()] for key in h5}
        result["attrs"] = dict(h5.attrs)
    return result


# =============================================================================================
# 10. Plots: one PDF per subject, one function per page
# =============================================================================================


@dataclass
class PlotData:
    """What the PDF shows: small arrays gathered from a subject's results."""

    subject: str
    frame_rate_hz: float
    summary_lines: list  # first page: what was run, and every warning
    cell_ids: np.ndarray  # the few cells whose traces are drawn
    dff: np.ndarray
    rates: np.ndarray
    spikes: np.ndarray
    spike_mode: str
    raster_cells: np.ndarray  # rank of the cell in the raster (sorted by plane)
    raster_frames: np.ndarray
    raster_size: int
    population_rate_hz: np.ndarray
    test_spans_frames: list
    edge_spans_frames: list
    cell_voxels: np.ndarray
    cell_spike_counts: np.ndarray
    grid: GridSpec
    noise_level: np.ndarray
    model: CascadeModel


def _spans(mask: np.ndarray) -> list:
    """[start, stop) frame spans where mask is True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def plot_subject_pdf(path: Path, plot: PlotData) -> None:
    """The original's pages (dF/F, rate, spikes for a few cells) plus a summary and population views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        for page in (_page_summary, _page_traces, _page_spikes, _page_raster, _page_planes, _page_noise):
            for fig in page(plt, plot):
                pdf.savefig(fig)
                plt.close(fig)


def _page_summary(plt, plot: PlotData):
    fig = plt.figure(figsize=(11, 8.5))
    fig.text(0.05, 0.95, f"{plot.subject}", fontsize=16, va="top", weight="bold")
    text = "\n".join(plot.summary_lines)
    fig.text(0.05, 0.88, text, fontsize=9, va="top", family="monospace", wrap=True)
    yield fig


def _page_traces(plt, plot: PlotData):
    time_s = np.arange(plot.dff.shape[1]) / plot.frame_rate_hz
    labels = [f"cell {int(c)}" for c in plot.cell_ids]
    for traces, title, unit in ((plot.dff, "dF/F", "dF/F"), (plot.rates, "CASCADE spike rate", "spikes/frame")):
        fig, ax = plt.subplots(figsize=(11, 8.5))
        spacing = np.nanpercentile(np.abs(traces), 99) * 1.2 if np.isfinite(traces).any() else 1.0
        spacing = spacing if spacing > 0 else 1.0
        for i, trace in enumerate(traces):
            ax.plot(time_s, trace + i * spacing, lw=0.7)
        ax.set_yticks(np.arange(len(traces)) * spacing, labels)
        ax.set_xlabel("time (s)")
        ax.set_title(f"{plot.subject}: {title} of {len(traces)} cells (offset {spacing:.2g} {unit} per row)")
        fig.tight_layout()
        yield fig


def _page_spikes(plt, plot: PlotData):
    time_s = np.arange(plot.spikes.shape[1]) / plot.frame_rate_hz
    fig, ax = plt.subplots(figsize=(11, 8.5))
    for i, row in enumerate(plot.spikes):
        ax.vlines(time_s[np.flatnonzero(row)], i + 0.1, i + 0.9, lw=1.0)
    ax.set_yticks(np.arange(len(plot.cell_ids)) + 0.5, [f"cell {int(c)}" for c in plot.cell_ids])
    ax.set_xlim(time_s[0], time_s[-1] if len(time_s) > 1 else 1)
    ax.set_xlabel("time (s)")
    ax.set_title(f"{plot.subject}: binary spikes ({plot.spike_mode}) of the same cells")
    fig.tight_layout()
    yield fig


def _page_raster(plt, plot: PlotData):
    rate = plot.frame_rate_hz
    fig, (raster_ax, rate_ax) = plt.subplots(
        2, 1, figsize=(11, 8.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    raster_ax.plot(plot.raster_frames / rate, plot.raster_cells, "|", ms=2, color="k", alpha=0.6)
    raster_ax.set_ylabel("cell (sorted by z-plane)")
    raster_ax.set_title(f"{plot.subject}: spikes of {plot.raster_size} random cells")
    rate_ax.plot(np.arange(len(plot.population_rate_hz)) / rate, plot.population_rate_hz, lw=0.8, color="C3")
    for start, stop in plot.test_spans_frames:
        rate_ax.axvspan(start / rate, stop / rate, color="C0", alpha=0.15, lw=0)
        raster_ax.axvspan(start / rate, stop / rate, color="C0", alpha=0.08, lw=0)
    for start, stop in plot.edge_spans_frames:
        rate_ax.axvspan(start / rate, stop / rate, color="0.6", alpha=0.3, lw=0)
    rate_ax.set_ylabel("mean rate (Hz/cell)")
    rate_ax.set_xlabel("time (s); blue: test blocks, grey: frames without prediction")
    fig.tight_layout()
    yield fig


def _page_planes(plt, plot: PlotData):
    # one dot per cell at its (x, y) voxel, coloured by its spikes (sparse voxels are invisible as images)
    voxels, counts, grid = plot.cell_voxels, plot.cell_spike_counts, plot.grid
    columns = min(6, grid.num_z_planes)
    rows = int(math.ceil(grid.num_z_planes / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(11, 8.5), squeeze=False)
    vmax = max(1.0, float(np.percentile(counts, 99))) if counts.size else 1.0
    image = None
    for z, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if z >= grid.num_z_planes:
            ax.axis("off")
            continue
        in_plane = voxels[:, 0] == z
        order = np.argsort(counts[in_plane])  # active cells drawn on top
        image = ax.scatter(
            voxels[in_plane, 2][order],
            voxels[in_plane, 1][order],
            c=counts[in_plane][order],
            s=4,
            cmap="viridis",
            vmin=0,
            vmax=vmax,
            linewidths=0,
        )
        ax.set_xlim(-1, grid.width)
        ax.set_ylim(grid.height, -1)
        ax.set_aspect("equal")
        ax.set_title(f"plane {z} (z={grid.z_values[z]:g})", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="spikes per cell (kept frames)")
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


# =============================================================================================
# 11. Driver: one subject as a list of stages; a run over many subjects (resume, shards, locks)
# =============================================================================================


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
    def from_metadata(cls, attrs: dict, up_to_date: bool = True) -> SubjectSummary:
        warnings_text = str(attrs.get("warnings", ""))
        return cls(
            subject=str(attrs["subject"]),
            total_spikes=int(attrs["total_spikes"]),
            spike_pixels=int(attrs["spike_pixels"]),
            marker_pixels=int(attrs["marker_pixels"]),
            total_pixels=int(attrs["total_pixels"]),
            coo_file_bytes=int(attrs["coo_file_bytes"]),
            model=str(attrs["cascade_model"]),
            model_source=str(attrs["model_source"]),
            warnings=[w for w in warnings_text.split("; ") if w],
            seconds=float(attrs.get("total_s", 0.0)),
            up_to_date=up_to_date,
        )


def choose_model(subject: SubjectData, config: PipelineConfig) -> CascadeModel:
    """The subject's CASCADE model; refuse a frame rate too far from it, warn beyond CASCADE's 5 %."""
    model = resolve_model(
        config.cascade_model,
        model_dir=config.model_dir,
        cache_dir=config.model_cache,
        frame_rate_hz=subject.frame_rate_hz,
        strict=config.strict_model,
        offline=config.offline,
    )
    if model.is_fallback:
        subject.warnings.append(f"model fallback: {model.source}")
    mismatch = rate_mismatch(model, subject.frame_rate_hz)
    if mismatch > config.max_rate_mismatch:
        raise PipelineError(
            f"frame rate {subject.frame_rate_hz:.3g} Hz is {mismatch:.0%} away from model "
            f"{model.name}'s {model.sampling_rate_hz:g} Hz: pick a matching model "
            "(--cascade_model auto or --model_dir) or raise --max_rate_mismatch"
        )
    if mismatch > RATE_MISMATCH_WARN_FRACTION:
        subject.warn(
            f"frame rate {subject.frame_rate_hz:.3g} Hz differs from model {model.name}'s "
            f"{model.sampling_rate_hz:g} Hz by {mismatch:.0%} (CASCADE's tolerance: 5%)"
        )
    if subject.num_frames < model.window_size + 1:
        raise PipelineError(
            f"{subject.num_frames} frames are fewer than CASCADE's window of {model.window_size} frames"
        )
    return model


def subject_fingerprint(subject: SubjectData, config: PipelineConfig, model: CascadeModel) -> dict:
    """What made a subject's outputs: input files (size, modification time), the parameters that
    change outputs, the model's identity (digest of its weights and config) and the software."""
    inputs = {}
    for path in subject.source_files:
        stat = os.stat(path)
        inputs[Path(path).name] = [stat.st_size, stat.st_mtime_ns]
    return {"inputs": inputs, "params": config.output_params(), "model": model.digest, "software_version": __version__}


def outputs_out_of_date(out_dir: Path, fingerprint: dict, plots: bool) -> str | None:
    """Why a subject's outputs must be (re)computed, or None when they are complete and match."""
    metadata = read_attrs(out_dir / METADATA_FILENAME)
    if metadata is None or "fingerprint" not in metadata:
        return "no finished outputs"
    coo = read_attrs(out_dir / COO_FILENAME)
    if coo is None or coo.get("run_id") != metadata.get("run_id"):
        return "outputs incomplete"
    if plots and not (out_dir / pdf_filename(out_dir.name)).is_file():
        return "PDF missing"
    return fingerprint_difference(json.loads(metadata["fingerprint"]), fingerprint)


def fingerprint_difference(old: dict, new: dict) -> str | None:
    """A short reason naming what changed between two fingerprints, or None."""
    if old.get("software_version") != new["software_version"]:
        return f"software version changed ({old.get('software_version')} -> {new['software_version']})"
    if old.get("inputs") != new["inputs"]:
        changed = sorted(
            k
            for k in set(old.get("inputs", {})) | set(new["inputs"])
            if old.get("inputs", {}).get(k) != new["inputs"].get(k)
        )
        return f"input files changed ({', '.join(changed)})"
    changed = [k for k in new["params"] if old.get("params", {}).get(k) != new["params"][k]]
    if changed:
        return "parameters changed (" + ", ".join(f"--{k}" for k in changed) + ")"
    if old.get("model") != new["model"]:
        return "CASCADE model changed"
    return None


def decide_subject_trace_type(subject: SubjectData, config: PipelineConfig) -> tuple:
    if config.trace_type != "auto":
        return config.trace_type, "set by --trace_type"
    sample_rows = np.unique(np.linspace(0, subject.num_cells - 1, min(subject.num_cells, 2000)).astype(int))
    return decide_trace_type(subject.trace_file.read_rows(sample_rows), subject.trace_type_hint)


def infer_subject(subject, model, trace_type: str, config: PipelineConfig, pool: WorkerPool) -> SubjectSpikes:
    """CASCADE over the subject's cells in batches (at least one per worker) across the pool."""
    settings = InferenceSettings(
        is_fluorescence=trace_type == "fluorescence",
        frame_rate_hz=subject.frame_rate_hz,
        baseline_window_s=config.baseline_window_s,
        baseline_percentile=config.baseline_percentile,
        cascade_threshold=config.cascade_threshold,
        spike_mode=config.spike_mode,
        spike_threshold=config.spike_threshold,
        seed=config.seed,
    )
    plot_rows = plot_cells(subject, config)
    batch_cells = min(config.batch_size, -(-subject.num_cells // pool.workers))  # every worker busy
    starts = range(0, subject.num_cells, batch_cells)
    tasks = (
        BatchTask(
            subject.trace_file,
            start,
            min(start + batch_cells, subject.num_cells),
            subject.cell_ids[start : start + batch_cells],
            plot_rows[(plot_rows >= start) & (plot_rows < start + batch_cells)],
            model.folder,
            model.source,
            settings,
        )
        for start in starts
    )
    progress = Progress(subject.name, len(starts), subject.num_cells, subject.num_frames)
    try:
        batches = pool.map(tasks, progress)
    finally:
        progress.close()
    return SubjectSpikes(batches, subject.num_frames)


def plot_cells(subject: SubjectData, config: PipelineConfig) -> np.ndarray:
    """The few cells whose traces the PDF shows (seeded; chosen among all cells)."""
    rng = np.random.default_rng([config.seed, 7])
    return np.sort(rng.choice(subject.num_cells, size=min(config.num_neurons, subject.num_cells), replace=False))


def check_inferred_traces(subject: SubjectData, spikes: SubjectSpikes) -> None:
    """Doubts that only the traces reveal (read by the workers): refuse or record a warning."""
    valid = spikes.valid
    if not valid.any():
        raise PipelineError(f"{subject.trace_file.path}: every trace value is NaN")
    infinite = int(spikes.cells("infinite_values").sum())
    if infinite:
        subject.warn(f"{infinite} infinite trace values treated as missing (NaN)")
    if (~valid).any():
        subject.warn(f"{int((~valid).sum())} cells have all-NaN traces and are left out")
    partial = int(((spikes.cells("nan_frames") > 0) & valid).sum())
    if partial:
        subject.warn(f"{partial} cells have some NaN frames (no spikes in windows touching them)")


def plot_data(subject, spikes: SubjectSpikes, plan: GridPlan, model, config, summary_lines) -> PlotData:
    """The PDF's content, from the subject's results (small arrays only)."""
    valid = spikes.valid
    valid_rows = np.flatnonzero(valid)
    rng = np.random.default_rng([config.seed, 11])
    raster_pool = valid_rows if len(valid_rows) <= 300 else np.sort(rng.choice(valid_rows, 300, replace=False))
    order = raster_pool[np.lexsort((raster_pool, plan.grid.cell_voxels[raster_pool, 0]))]  # by plane
    rank = np.full(subject.num_cells, -1)
    rank[order] = np.arange(len(order))
    raster_cells, raster_frames = spikes.events_of_cells(order)
    kept_cells, _ = spikes.events_in_frames(plan.kept_frames[0], plan.kept_frames[-1] + 1)
    cell_spikes_kept = np.bincount(kept_cells, minlength=subject.num_cells)
    test_mask = np.zeros(subject.num_frames, bool)
    test_mask[plan.kept_frames[plan.is_train == 0]] = True
    rows, dff, rates, binary = spikes.plot_traces()
    return PlotData(
        subject=subject.name,
        frame_rate_hz=subject.frame_rate_hz,
        summary_lines=summary_lines,
        cell_ids=subject.cell_ids[rows],
        dff=dff,
        rates=rates,
        spikes=binary,
        spike_mode=config.spike_mode,
        raster_cells=rank[raster_cells],
        raster_frames=raster_frames,
        raster_size=len(order),
        population_rate_hz=population_rate_hz(spikes, subject),
        test_spans_frames=_spans(test_mask),
        edge_spans_frames=_spans(~plan.predicted),
        cell_voxels=plan.grid.cell_voxels[valid],
        cell_spike_counts=cell_spikes_kept[valid],
        grid=plan.grid,
        noise_level=spikes.cells("noise_level"),
        model=model,
    )


def population_rate_hz(spikes: SubjectSpikes, subject: SubjectData) -> np.ndarray:
    """Mean CASCADE rate per valid cell in Hz, per frame."""
    return spikes.rate_sum / max(int(spikes.valid.sum()), 1) * subject.frame_rate_hz


def write_subject(out_dir: Path, subject, spikes, plan: GridPlan, model, config, attrs: dict, run) -> SubjectSummary:
    """COO grid, PDF and metadata of one subject, each written to a temporary and renamed into place
    (metadata last: it marks the set complete); a failure removes this subject's temporaries."""
    timings = attrs["timings"]
    finals = [out_dir / COO_FILENAME, out_dir / pdf_filename(subject.name), out_dir / METADATA_FILENAME]
    temporaries = [temporary_path(path) for path in finals]
    try:
        started = time.perf_counter()
        counts, plane_entries = write_coo_file(temporaries[0], coo_blocks(spikes, plan, config.z_markers), plan, attrs)
        timings["grid_and_write_s"] = time.perf_counter() - started
        attrs.update(coo_attrs(counts, plane_entries.sum(), plan.grid), coo_file_bytes=temporaries[0].stat().st_size)
        if config.plots:
            started = time.perf_counter()
            lines = summary_page_lines(subject, model, attrs)
            plot_subject_pdf(temporaries[1], plot_data(subject, spikes, plan, model, config, lines))
            timings["plots_s"] = time.perf_counter() - started
        timings["total_s"] = time.perf_counter() - run.subject_started
        write_metadata_file(
            temporaries[2], {**attrs, **timings}, *metadata_arrays(subject, spikes, plan, plane_entries)
        )
        with run.signals_held():  # the renames below happen all together or not at all
            remove_quietly(finals[2])
            for temporary, final in zip(temporaries, finals):
                if temporary.exists():
                    os.replace(temporary, final)
                elif final != finals[2]:
                    remove_quietly(final)  # e.g. an old PDF after --no_plots: not from this run
    except OSError as exc:
        raise WriteFailed(f"cannot write to {out_dir}: {describe_os_error(exc, out_dir)}") from None
    finally:
        for temporary in temporaries:
            remove_quietly(temporary)
    return SubjectSummary.from_metadata(dict(attrs, **timings), up_to_date=False)


def describe_os_error(exc: OSError, folder: Path) -> str:
    """Plain words for a write error; HDF5's own message often hides the cause (a full disk)."""
    if exc.errno == errno.ENOSPC or "No space left" in str(exc) or _disk_nearly_full(folder):
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied ({exc.strerror})"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return " ".join(str(exc).split())[:300]


def _disk_nearly_full(folder: Path) -> bool:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free < 1 << 20
    return False


def metadata_arrays(subject: SubjectData, spikes: SubjectSpikes, plan: GridPlan, plane_entries) -> tuple:
    """(datasets, cells) of metadata.h5."""
    grid, is_train = plan.grid, plan.is_train
    plane_pixels = grid.num_timepoints * grid.height * grid.width
    datasets = {
        "z_values": grid.z_values,
        "is_train": is_train,
        "train_timepoints": np.flatnonzero(is_train == 1),
        "test_timepoints": np.flatnonzero(is_train == 0),
        "test_blocks": plan.test_blocks,
        "timepoint_indices": plan.kept_frames.astype(np.int32),
        "per_plane_active_pixels": plane_entries,
        "per_plane_sparsity_percent": 100.0 * plane_entries / max(plane_pixels, 1),
        "population_rate_hz": population_rate_hz(spikes, subject),
    }
    cells = {
        "trace_column": np.arange(subject.num_cells, dtype=np.int32),
        "cell_id": subject.cell_ids,
        "position": subject.positions,
        "voxel_zxy": grid.cell_voxels,
        "noise_level": spikes.cells("noise_level"),
        "model_noise_level": spikes.cells("model_noise_level"),
        "spike_count": spikes.cells("spike_count"),
        "valid": spikes.valid.astype(np.uint8),
    }
    return datasets, cells


def summary_page_lines(subject: SubjectData, model: CascadeModel, attrs: dict) -> list:
    lines = [
        f"{subject.num_cells:,} cells x {subject.num_frames:,} frames at {subject.frame_rate_hz:.3g} Hz "
        f"({subject.layout} layout); traces treated as {attrs['trace_type']} ({attrs['trace_type_reason']})",
        f"CASCADE model {model.name} ({model.source}), threshold {attrs['param_cascade_threshold']}",
        f"grid {'x'.join(map(str, attrs['grid_shape']))}: {attrs['total_spikes']:,} entries "
        f"({attrs['spike_pixels']:,} spike pixels, {attrs['marker_pixels']:,} marker pixels, "
        f"{attrs['collisions']:,} collisions)",
        f"software {__version__}, run {attrs['run_id']}, {attrs['created_utc']}",
        "",
        "Warnings:" if subject.warnings else "No warnings.",
    ]
    return lines + [f"  - {w}" for w in subject.warnings]


def subject_attrs(subject, model, config, trace_type: tuple, fingerprint: dict, run, plan: GridPlan) -> dict:
    """Attributes every output file of the subject records: how it was made."""
    return {
        "format": "COO_sparse",
        "subject": subject.name,
        "frame_rate_hz": subject.frame_rate_hz,
        "num_timepoints": plan.grid.num_timepoints,
        "num_z_planes": plan.grid.num_z_planes,
        "grid_height": plan.grid.height,
        "grid_width": plan.grid.width,
        "grid_shape": plan.grid.shape,
        "num_cells": subject.num_cells,
        "num_valid_cells": 0,
        "num_original_frames": subject.num_frames,
        "trace_type": trace_type[0],
        "trace_type_reason": trace_type[1],
        "layout": subject.layout,
        "source_files": list(subject.source_files),
        "software_version": __version__,
        "coordinate_order": "t,z,x,y",
        "warnings": "; ".join(subject.warnings),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_id": run.run_id,
        "fingerprint": fingerprint,
        "timings": {},
        **model.provenance(),
        **config.as_attrs(),
    }


def process_subject(folder: Path, config: PipelineConfig, pool: WorkerPool, run: RunContext) -> SubjectSummary:
    """One subject: load -> model -> (up to date? skip) -> infer -> grid -> write -> plot."""
    run.subject_started = started = time.perf_counter()
    subject = load_subject(folder, config.coordinates)
    log.info(
        "%s: %d cells x %d frames at %.3g Hz (%s layout)",
        subject.name,
        subject.num_cells,
        subject.num_frames,
        subject.frame_rate_hz,
        subject.layout,
    )
    model = choose_model(subject, config)
    fingerprint = subject_fingerprint(subject, config, model)
    out_dir = Path(config.output_dir) / subject.name
    reason = "--overwrite" if config.overwrite else outputs_out_of_date(out_dir, fingerprint, config.plots)
    if reason is None:
        log.info("%s: outputs up to date (same inputs, parameters, model and software): skipped", subject.name)
        return SubjectSummary.from_metadata(read_attrs(out_dir / METADATA_FILENAME))
    log.info("%s: computing (%s)", subject.name, reason)
    trace_type = decide_subject_trace_type(subject, config)
    log.info("%s: traces treated as %s (%s)", subject.name, *trace_type)
    load_s = time.perf_counter() - started
    spikes = infer_subject(subject, model, trace_type[0], config, pool)
    inference_s = time.perf_counter() - started - load_s
    log.info(
        "%s: CASCADE in %.1f s (%.0f neuron-frames/s); RSS %.2f GB with workers",
        subject.name,
        inference_s,
        subject.num_cells * subject.num_frames / max(inference_s, 1e-9),
        rss_gb(),
    )
    check_inferred_traces(subject, spikes)
    plan = plan_grid(subject.positions, spikes.valid, subject.num_frames, model, config)
    attrs = subject_attrs(subject, model, config, trace_type, fingerprint, run, plan)
    attrs.update(num_valid_cells=int(spikes.valid.sum()), warnings="; ".join(subject.warnings))
    attrs["timings"] = {"load_s": load_s, "inference_s": inference_s}
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = write_subject(out_dir, subject, spikes, plan, model, config, attrs, run)
    log.info(
        "%s: %d active voxels (%d spike, %d marker) in a %s grid, written to %s in %.1f s; RSS %.2f GB",
        subject.name,
        summary.total_spikes,
        summary.spike_pixels,
        summary.marker_pixels,
        "x".join(map(str, plan.grid.shape)),
        out_dir,
        summary.seconds,
        rss_gb(),
    )
    return summary


# --- a run over many subjects: locks, signals, shards, combine --------------------------------

LOCK_DIRNAME = ".locks"
LOCK_HEARTBEAT_S = 60.0  # a live run touches its lock files this often
LOCK_STALE_S = 600.0  # a lock not touched for this long belongs to a dead run (any host)


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the run (BaseException: no subject's except clause swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT


class RunContext:
    """This run's identity (host, pid, start) and what it holds: lock files and deferred signals.

    Locks are files created atomically (O_CREAT | O_EXCL works on NFS and Lustre, unlike fcntl
    locks on many clusters) holding host, PID and start time; a heartbeat thread touches them so a
    run on another host can tell a live lock from one left by a run that died.
    """

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.run_id = f"{self.host}-{self.pid}-{uuid.uuid4().hex[:8]}"
        self.lock_dir = output_dir / LOCK_DIRNAME
        self.held: set = set()
        self.subject_started = time.perf_counter()
        self._pending_signal = None
        self._holding_signals = False
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._touch_locks, daemon=True)

    # signals ---------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self._holding_signals:
            self._pending_signal = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def signals_held(self):
        """Delay SIGTERM/SIGINT until the block is done (a subject's files renamed together)."""
        self._holding_signals = True
        try:
            yield
        finally:
            self._holding_signals = False
            if self._pending_signal is not None:
                raise Interrupted(self._pending_signal)

    # locks -----------------------------------------------------------------------------------
    def acquire(self, name: str) -> str | None:
        """Take the lock ``name``; None when taken, else who holds it."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        path = self.lock_dir / f"{name}.lock"
        record = {"host": self.host, "pid": self.pid, "run_id": self.run_id, "started_utc": _utc_now()}
        for _attempt in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(path)
                if holder is not None:
                    return holder
                remove_quietly(path)  # stale: its run is dead
                log.info("removed stale lock %s", path)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self.held.add(path)
            if not self._heartbeat.is_alive():
                self._heartbeat.start()
            return None
        return "another run (lock contended)"

    def release(self, name: str) -> None:
        path = self.lock_dir / f"{name}.lock"
        self.held.discard(path)
        remove_quietly(path)

    @contextlib.contextmanager
    def lock(self, name: str, wait_s: float = 0.0):
        """Hold lock ``name`` for the block, waiting up to ``wait_s`` for another run to free it."""
        deadline = time.monotonic() + wait_s
        while (holder := self.acquire(name)) is not None:
            if time.monotonic() > deadline:
                raise LockBusy(f"{name} is locked by {holder}")
            time.sleep(0.5)
        try:
            yield
        finally:
            self.release(name)

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


class LockBusy(PipelineError):
    """Another live run holds the lock."""


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _lock_holder(path: Path) -> str | None:
    """Who holds a lock file, or None when the lock is stale (its run is dead)."""
    try:
        record = json.loads(path.read_text())
        age_s = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record, age_s = {}, 0.0  # being written right now, or unreadable: treat as live unless old
    if record.get("host") == socket.gethostname() and not _pid_alive(record.get("pid")):
        return None
    if age_s > LOCK_STALE_S:
        return None
    return f"run {record.get('run_id', '?')} on {record.get('host', '?')} (PID {record.get('pid', '?')}, since {record.get('started_utc', '?')})"


def _pid_alive(pid) -> bool:
    import psutil

    return isinstance(pid, int) and psutil.pid_exists(pid)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temporaries of dead runs (this host: their process is gone; other hosts: a day old)."""
    if not output_dir.is_dir():
        return
    pattern = re.compile(rf"\.(.+){re.escape(TEMPORARY_MARKER)}(.+)-(\d+)-[0-9a-f]{{8}}$")
    for path in itertools.chain(output_dir.glob(".*"), output_dir.glob("*/.*")):
        match = pattern.match(path.name)
        if not match:
            continue
        host, pid = match.group(2), int(match.group(3))
        with contextlib.suppress(OSError):
            dead = (host == socket.gethostname() and not _pid_alive(pid)) or time.time() - path.stat().st_mtime > 86400
            if dead:
                path.unlink()
                log.info("removed %s, left by a run that died", path)


def resolve_shard(shard: tuple | None, environ=os.environ) -> tuple | None:
    """--shard K/N, else the SLURM array task's place in its array, else None (all subjects)."""
    if shard is not None:
        return shard
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    try:
        task = int(environ["SLURM_ARRAY_TASK_ID"])
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(environ.get("SLURM_ARRAY_TASK_COUNT") or int(environ["SLURM_ARRAY_TASK_MAX"]) - first + 1)
    except (KeyError, ValueError) as exc:
        raise PipelineError(
            f"cannot read the SLURM array task from the environment ({exc}); pass --shard K/N"
        ) from None
    return task - first + 1, count


def subject_size(folder: Path) -> int:
    """cells x frames of a subject (0 when it cannot be read: it will fail with its own error)."""
    import h5py

    for name, dataset in (("TimeSeries.h5", "CellResp"), ("traces.h5", "traces")):
        with contextlib.suppress(Exception), h5py.File(folder / name, "r") as h5:
            return int(np.prod(h5[dataset].shape))
    return 0


def select_shard(subjects: list, shard: tuple | None) -> list:
    """The K-th of N deterministic parts of the subject list, balanced by size (cells x frames):
    largest first, each to the lightest part so far (ties: lower part). Natural order within."""
    if shard is None:
        return subjects
    k, n = shard
    loads = [0] * n
    parts: list = [[] for _ in range(n)]
    sized = sorted(((subject_size(f), i, f) for i, f in enumerate(subjects)), key=lambda s: (-s[0], s[1]))
    for size, index, folder in sized:
        lightest = loads.index(min(loads))
        loads[lightest] += max(size, 1)
        parts[lightest].append((index, folder))
    return [folder for _, folder in sorted(parts[k - 1], key=lambda item: item[0])]


@dataclass
class RunOutcome:
    """What happened to each subject of a run."""

    done: list = dataclasses.field(default_factory=list)  # SubjectSummary (computed or up to date)
    failed: dict = dataclasses.field(default_factory=dict)  # name -> reason
    not_processed: list = dataclasses.field(default_factory=list)  # names, after a stop
    locked: dict = dataclasses.field(default_factory=dict)  # name -> holder

    @property
    def exit_code(self) -> int:
        return 1 if (self.failed or self.not_processed or self.locked) else 0


def run_subjects(subjects: list, config: PipelineConfig, run: RunContext) -> RunOutcome:
    """Each subject under its lock; one bad subject never stops the others, a full disk does."""
    outcome = RunOutcome()
    pool = WorkerPool(config.workers)
    remaining = [folder.name for folder in subjects]
    try:
        for folder in subjects:
            holder = run.acquire(folder.name)
            if holder is not None:
                outcome.locked[folder.name] = holder
                log.warning("%s: skipped, locked by %s", folder.name, holder)
                remaining.remove(folder.name)
                continue
            try:
                outcome.done.append(process_subject(folder, config, pool, run))
            except WriteFailed as exc:
                outcome.failed[folder.name] = str(exc)
                log.error("%s: %s; stopping: the remaining subjects were not processed", folder.name, exc)
                remaining.remove(folder.name)
                outcome.not_processed = remaining
                return outcome
            except PipelineError as exc:
                outcome.failed[folder.name] = str(exc)
                log.error("%s: %s", folder.name, exc)
            except MemoryError:
                outcome.failed[folder.name] = "out of memory"
                log.error("%s: out of memory; lower --workers or ask for more memory", folder.name)
            except Exception as exc:  # our bug: one bad subject must not stop the others
                outcome.failed[folder.name] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "%s: unexpected %s: %s (a bug: please report it; run with --verbose for the traceback)",
                    folder.name,
                    type(exc).__name__,
                    exc,
                )
                log.debug("traceback", exc_info=True)
            finally:
                run.release(folder.name)
            remaining.remove(folder.name)
    except Interrupted as stop:
        pool.close(kill=True)
        pool = None
        finished = [s.subject for s in outcome.done]
        log.error(
            "interrupted by %s: finished %s; not finished: %s",
            stop,
            ", ".join(finished) or "none",
            ", ".join(remaining) or "none",
        )
        raise
    finally:
        if pool is not None:
            pool.close()
    return outcome


def combine_outputs(config: PipelineConfig, run: RunContext) -> dict:
    """combined_metadata.h5 over the subject folders whose outputs match this run's parameters;
    the others are named in a WARNING and in the file's `excluded` attribute."""
    output_dir = Path(config.output_dir)
    wanted = config.output_params()
    included, excluded = [], {}
    folders = sorted(
        (p for p in output_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: _natural_key(p.name),
    )
    for folder in folders:
        reason = _combine_exclusion(folder, wanted)
        if reason is None:
            included.append(folder)
        elif reason:
            excluded[folder.name] = reason
    if excluded:
        log.warning(
            "combined_metadata.h5 leaves out %s", "; ".join(f"{name} ({why})" for name, why in excluded.items())
        )
    with run.lock("combined_metadata", wait_s=300):
        return write_combined_metadata(output_dir, included, excluded)


def _combine_exclusion(folder: Path, wanted: dict) -> str | None:
    """Why a subject folder is left out of combined_metadata.h5 ('' if it is no subject folder)."""
    metadata = read_attrs(folder / METADATA_FILENAME)
    if metadata is None:
        return "no finished outputs" if re.fullmatch(r"subject_\d+", folder.name) else ""
    try:
        fingerprint = json.loads(metadata["fingerprint"])
    except (KeyError, ValueError):
        return "made by an older version without a fingerprint"
    changed = [k for k in wanted if fingerprint.get("params", {}).get(k) != wanted[k]]
    if changed:
        return "other parameters: " + ", ".join(f"--{k}" for k in changed)
    if fingerprint.get("software_version") != __version__:
        return f"made by version {fingerprint.get('software_version')}"
    sources = [str(s) for s in np.atleast_1d(metadata.get("source_files", []))]
    for source in (s for part in sources for s in part.split(",") if s):
        stat = os.stat(source) if os.path.exists(source) else None
        recorded = fingerprint["inputs"].get(Path(source).name)
        if stat is None or recorded != [stat.st_size, stat.st_mtime_ns]:
            return f"input {Path(source).name} changed or missing since"
    return None


def run_pipeline(config: PipelineConfig, shard: tuple | None = None, run: RunContext | None = None) -> int:
    """Process the subjects (or this shard's share); returns the exit status (see --help)."""
    output_dir = Path(config.output_dir)
    run = run or RunContext(output_dir)
    try:
        remove_stale_temporaries(output_dir)
        if config.combine_only:
            totals = combine_outputs(config, run)
            summaries = [
                SubjectSummary.from_metadata(read_attrs(output_dir / s / METADATA_FILENAME)) for s in totals["subjects"]
            ]
            log_summary(RunOutcome(done=summaries), totals)
            return 0
        subjects = find_subjects(config.input_dir, config.subjects, config.skip)
        if not subjects:
            raise PipelineError(f"no subject_<n> folders under {config.input_dir} (or its Subjects/ folder)")
        mine = select_shard(subjects, shard)
        log.info(
            "unified_spike_processing_coo %s: %d of %d subjects%s from %s -> %s (%d workers, batches of up to %d cells)",
            __version__,
            len(mine),
            len(subjects),
            f" (shard {shard[0]}/{shard[1]})" if shard else "",
            config.input_dir,
            output_dir,
            config.workers,
            config.batch_size,
        )
        outcome = run_subjects(mine, config, run)
        totals = {}
        if shard is None and outcome.done and not outcome.not_processed:
            totals = combine_outputs(config, run)
        log_summary(outcome, totals)
        return outcome.exit_code
    finally:
        run.release_all()


def _format_bytes(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(num_bytes) < 1000 or unit == "TB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000


def summary_lines(outcome: RunOutcome, totals: dict) -> list:
    """The end-of-run summary, in the original's form but with honest memory figures."""
    summaries = outcome.done
    lines = ["", "=" * 72]
    for model, source in dict.fromkeys((s.model, s.model_source) for s in summaries):
        if source.startswith(FALLBACK_SOURCE_PREFIX):
            lines.append(
                f"! WARNING: CASCADE model {model} used as a FALLBACK: {source[len(FALLBACK_SOURCE_PREFIX) : -1]}"
            )
        else:
            lines.append(f"CASCADE model: {model} ({source})")
    lines.append("Processed subjects:")
    for s in summaries:
        coo_bytes = COO_BYTES_PER_ENTRY * s.total_spikes
        lines += [
            f"{s.subject}: {s.total_spikes:,} active voxels of {s.total_pixels:,} "
            f"({s.spike_pixels:,} spike pixels, {s.marker_pixels:,} z-marker pixels; model {s.model}, "
            + ("up to date, skipped)" if s.up_to_date else f"{s.seconds:.1f} s)"),
            f"  → Sparsity: {s.sparsity_percent:.4f}% of voxels active",
            f"  → Memory savings vs dense: ~{100.0 * (1 - coo_bytes / s.total_pixels):.2f}% in memory "
            f"({_format_bytes(coo_bytes)} COO at {COO_BYTES_PER_ENTRY} B/entry vs "
            f"{_format_bytes(s.total_pixels)} dense uint8), ~{100.0 * (1 - s.coo_file_bytes / s.total_pixels):.2f}% on disk "
            f"({_format_bytes(s.coo_file_bytes)})",
        ]
        lines += [f"  ! WARNING: {w}" for w in s.warnings if not w.startswith("model fallback")]
    lines += [f"{name}: FAILED: {reason}" for name, reason in outcome.failed.items()]
    lines += [f"{name}: SKIPPED: locked by {holder}" for name, holder in outcome.locked.items()]
    lines += [f"{name}: NOT PROCESSED (the run stopped)" for name in outcome.not_processed]
    total_spikes = sum(s.total_spikes for s in summaries)
    total_pixels = sum(s.total_pixels for s in summaries)
    coo_bytes = COO_BYTES_PER_ENTRY * total_spikes
    file_bytes = sum(s.coo_file_bytes for s in summaries)
    lines += [
        "",
        "Summary:",
        f"  Subjects: {len(summaries)} done ({sum(s.up_to_date for s in summaries)} already up to date), "
        f"{len(outcome.failed)} failed",
        f"  Total spikes (active voxels): {total_spikes:,} = {sum(s.spike_pixels for s in summaries):,} spike pixels "
        f"+ {sum(s.marker_pixels for s in summaries):,} z-marker pixels (- overlaps)",
    ]
    if total_pixels:
        lines += [
            f"  Overall sparsity: {100.0 * total_spikes / total_pixels:.4f}% of voxels active",
            f"  Memory savings: ~{100.0 * (1 - coo_bytes / total_pixels):.2f}% in memory "
            f"({_format_bytes(coo_bytes)} vs {_format_bytes(total_pixels)} dense), "
            f"~{100.0 * (1 - file_bytes / total_pixels):.2f}% on disk ({_format_bytes(file_bytes)})",
        ]
    if totals:
        lines.append(f"  combined_metadata.h5: {totals['total_subjects']} subjects")
    lines.append("=" * 72)
    return lines


def log_summary(outcome: RunOutcome, totals: dict) -> None:
    for line in summary_lines(outcome, totals):
        log.info(line)


# =============================================================================================
# 12. Command line
# =============================================================================================

EXIT_CODES = (
    "Exit status: 0 every subject done or already up to date; 1 some subject failed, was locked by "
    "another run or was not processed after a write failure (each named in the log); 2 bad arguments "
    "or no usable model; 130 / 143 interrupted by Ctrl-C / SIGTERM (finished subjects are kept; rerun "
    "the same command to resume)."
)


def build_parser() -> argparse.ArgumentParser:
    """The command line, built from PipelineConfig's declarations (defaults shown are the real ones)."""
    parser = argparse.ArgumentParser(
        prog="unified_spike_processing_coo.py",
        description="Turn whole-brain calcium imaging (one folder per subject) into COO-sparse spike "
        "grids (T, Z, H, W) with CASCADE spike inference. Finished subjects whose inputs, parameters "
        "and model are unchanged are skipped on a rerun.",
        epilog="Input layouts: subject_<n>/TimeSeries.h5 + data_full.mat (Chen et al. 2018) or "
        "subject_<n>/traces.h5 (traces (N,T), positions (N,3), attr frame_rate_hz), directly under "
        "--input_dir or under --input_dir/Subjects. " + EXIT_CODES + " For production SLURM runs, fill "
        "the model cache on a node with internet and pass --strict_model, so that a missing model is an "
        "error rather than a fallback; see cluster/ for an sbatch array script.",
    )
    groups: dict = {}
    for field in dataclasses.fields(PipelineConfig):
        meta = field.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flags = (meta["flag"] or f"--{field.name}").split("/")
        kwargs = dict(meta["kwargs"], dest=field.name, help=meta["help"])
        if isinstance(field.default, bool):
            kwargs["action"] = "store_false" if field.default else "store_true"
        else:
            kwargs["default"] = field.default
            if field.default not in (None, ()) and not kwargs.get("required"):
                shown = " ".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
                kwargs["help"] += f" (default: {shown})"
        group.add_argument(*flags, **kwargs)
    return parser


def _setup_logging(log_file: Path, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    for handler in [h for h in root.handlers if getattr(h, "spike_grids", False)]:
        root.removeHandler(handler)  # a second main() in one process (tests, notebooks)
        handler.close()
    file_handler = logging.FileHandler(log_file)  # OSError here: an unwritable log, exit 2
    for handler in (logging.StreamHandler(sys.stderr), file_handler):
        handler.setFormatter(formatter)
        handler.spike_grids = True
        root.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = PipelineConfig(**vars(args))
        shard = resolve_shard(config.shard)
    except PipelineError as exc:
        parser.error(str(exc))  # exit 2, before anything is created
    output_dir = Path(config.output_dir)
    default_log = f"processing_shard{shard[0]}of{shard[1]}.log" if shard else "processing.log"
    log_file = Path(config.log_file) if config.log_file else output_dir / default_log
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        _setup_logging(log_file, config.verbose)
    except OSError as exc:
        print(f"error: cannot write to {exc.filename or output_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    run = RunContext(output_dir)
    run.install_signal_handlers()
    try:
        return run_pipeline(config, shard, run)
    except Interrupted as stop:
        return stop.exit_code
    except PipelineError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
