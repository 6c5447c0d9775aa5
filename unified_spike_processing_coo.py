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
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Iterable, Sequence
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
# Configuration of a run
# =============================================================================================


@dataclass(frozen=True)
class PipelineConfig:
    """Every parameter of a run; recorded in each output so a file says how it was made."""

    input_dir: str
    output_dir: str
    subjects: tuple = ()
    skip: tuple = ()
    workers: int = 1
    batch_size: int = 30000
    cascade_model: str = "Global_EXC_2Hz_smoothing500ms"
    model_dir: str | None = None
    model_cache: str | None = None
    strict_model: bool = False
    offline: bool = False
    cascade_threshold: object = 1  # 0, 1 or False
    trace_type: str = "auto"  # auto | fluorescence | dff
    baseline_percentile: float = 8.0
    baseline_window_s: float = 30.0
    spike_mode: str = "sample"  # sample | discrete | threshold
    spike_threshold: float = 0.5
    seed: int = 42
    keep_edge_frames: bool = False
    grid_height: int = 256
    grid_width: int = 128
    coordinates: str = "raw"  # raw (CellXYZ) | registered (CellXYZ_norm)
    z_markers: bool = True
    split_block: int = 330
    split_ratio: float = 0.95
    num_neurons: int = 10
    plots: bool = True
    max_rate_mismatch: float = 0.5

    def as_attrs(self) -> dict:
        """HDF5-friendly copy of the parameters (None -> '', tuples -> comma strings)."""
        attrs = {}
        for key, value in dataclasses.asdict(self).items():
            if value is None:
                value = ""
            elif isinstance(value, (tuple, list)):
                value = ",".join(str(v) for v in value)
            elif key == "cascade_threshold":
                value = "none" if value is False else str(value)
            attrs[f"param_{key}"] = value
        return attrs


# =============================================================================================
# Loading subjects: Chen et al. 2018 layout and a generic traces.h5
# =============================================================================================


@dataclass
class SubjectData:
    """One subject's cells: traces (N, T) and positions (N, 3) as [x, y, z]."""

    name: str
    folder: str
    traces: np.ndarray  # (N, T) float32, raw fluorescence or dF/F
    positions: np.ndarray  # (N, 3) float64: x (CellXYZ col 1), y (col 2), z (col 3)
    frame_rate_hz: float
    cell_ids: np.ndarray  # (N,) int64: 1-based row in CellXYZ (Chen) or 0-based index
    layout: str  # 'chen2018' | 'generic'
    trace_type_hint: str | None = None
    source_files: tuple = ()


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
            f"--subjects names {', '.join(unknown)}, not found under {input_dir} "
            f"(found: {', '.join(names) or 'none'})"
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
                return {
                    key: np.asarray(group[key][()]).T for key in group if isinstance(group[key], h5py.Dataset)
                }
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


def load_chen2018_subject(folder: Path, coordinates: str = "raw") -> SubjectData:
    """A fish in the Chen et al. 2018 layout (TimeSeries.h5 + data_full.mat)."""
    import h5py

    series_path, anatomy_path = folder / "TimeSeries.h5", folder / "data_full.mat"
    for path in (series_path, anatomy_path):
        if not path.is_file():
            raise PipelineError(f"{path} is missing (Chen 2018 layout needs TimeSeries.h5 and data_full.mat)")
    try:
        with h5py.File(series_path, "r") as h5:
            if "CellResp" not in h5:
                raise PipelineError(f"{series_path} has no dataset 'CellResp'")
            cell_resp = h5["CellResp"]
            if cell_resp.ndim != 2:
                raise PipelineError(f"{series_path}: CellResp has shape {cell_resp.shape}, expected (T, N)")
            # -> (N, T), a block of cells at a time so the transpose never doubles the memory
            num_frames_stored, num_cells_stored = cell_resp.shape
            traces = np.empty((num_cells_stored, num_frames_stored), dtype=np.float32)
            for start in range(0, num_cells_stored, 8192):
                traces[start : start + 8192] = cell_resp[:, start : start + 8192].T
            abs_ix = np.asarray(h5["absIX"][()]).ravel() if "absIX" in h5 else None
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"cannot read {series_path} ({exc}); the file is corrupt or truncated") from None
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
    num_cells = traces.shape[0]
    if abs_ix is not None:
        # absIX is 1-based into CellXYZ (MATLAB); forgetting the -1 shifts every cell by one row
        cell_ids = abs_ix.astype(np.int64)
        if len(cell_ids) != num_cells:
            raise PipelineError(
                f"{series_path}: absIX lists {len(cell_ids)} cells but CellResp has {num_cells}"
            )
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
        traces=traces,
        positions=cell_xyz[cell_ids - 1],
        frame_rate_hz=frame_rate_hz,
        cell_ids=cell_ids,
        layout="chen2018",
        source_files=(str(series_path), str(anatomy_path)),
    )


def load_generic_subject(folder: Path) -> SubjectData:
    """The generic layout: traces.h5 with traces (N, T), positions (N, 3), attr frame_rate_hz."""
    import h5py

    path = folder / "traces.h5"
    try:
        with h5py.File(path, "r") as h5:
            missing = [k for k in ("traces", "positions") if k not in h5]
            if missing or "frame_rate_hz" not in h5.attrs:
                raise PipelineError(
                    f"{path} lacks {', '.join(missing + (['attribute frame_rate_hz'] if 'frame_rate_hz' not in h5.attrs else []))}"
                )
            traces = np.asarray(h5["traces"][()], dtype=np.float32)
            positions = np.asarray(h5["positions"][()], dtype=np.float64)
            frame_rate_hz = float(h5.attrs["frame_rate_hz"])
            hint = h5.attrs.get("trace_type")
            hint = hint.decode() if isinstance(hint, bytes) else (str(hint) if hint is not None else None)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"cannot read {path} ({exc}); the file is corrupt or truncated") from None
    if traces.ndim != 2 or positions.shape != (traces.shape[0], 3):
        raise PipelineError(
            f"{path}: traces {traces.shape} and positions {positions.shape} must be (N, T) and (N, 3)"
        )
    return SubjectData(
        name=folder.name,
        folder=str(folder),
        traces=traces,
        positions=positions,
        frame_rate_hz=frame_rate_hz,
        cell_ids=np.arange(len(traces), dtype=np.int64),
        layout="generic",
        trace_type_hint=hint,
        source_files=(str(path),),
    )


def load_subject(folder, coordinates: str = "raw") -> SubjectData:
    """Load a subject folder in whichever supported layout it has, and check it is usable."""
    folder = Path(folder)
    if (folder / "TimeSeries.h5").exists() or (folder / "data_full.mat").exists():
        subject = load_chen2018_subject(folder, coordinates)
    elif (folder / "traces.h5").exists():
        if coordinates == "registered":
            raise PipelineError(
                f"{folder}: --coordinates registered needs the Chen 2018 layout (CellXYZ_norm)"
            )
        subject = load_generic_subject(folder)
    else:
        raise PipelineError(f"{folder} has neither TimeSeries.h5 + data_full.mat (Chen 2018) nor traces.h5")
    num_cells, num_frames = subject.traces.shape
    if num_cells == 0 or num_frames == 0:
        raise PipelineError(f"{folder}: empty recording ({num_cells} cells x {num_frames} frames)")
    if not (math.isfinite(subject.frame_rate_hz) and subject.frame_rate_hz > 0):
        raise PipelineError(f"{folder}: invalid frame rate {subject.frame_rate_hz!r} Hz")
    if not np.isfinite(subject.positions).all():
        raise PipelineError(f"{folder}: cell positions contain NaN or infinite values")
    infinite = np.isinf(subject.traces)
    if infinite.any():
        log.warning(
            "%s: %d infinite trace values treated as missing (NaN)", subject.name, int(infinite.sum())
        )
        subject.traces[infinite] = np.nan
    if np.isnan(subject.traces).all():
        raise PipelineError(f"{folder}: every trace value is NaN")
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
CASCADE_LAYER_CLASSES = (
    "Conv1D",
    "Conv1D",
    "MaxPooling1D",
    "Conv1D",
    "MaxPooling1D",
    "Dense",
    "Flatten",
    "Dense",
)


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
            f"{path}: layer stack {classes} is not CASCADE's "
            f"{CASCADE_LAYER_CLASSES}; this engine cannot run it"
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
                raise PipelineError(
                    f"{path} has no 'model_config' attribute: not a Keras model file saved by CASCADE"
                )
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
                    n.decode() if isinstance(n, bytes) else str(n)
                    for n in layer_group.attrs.get("weight_names", [])
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
        raise PipelineError(
            f"{path} is not a valid CASCADE config ({_one_line(exc)}): re-download it"
        ) from None
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
    ensembles = {
        level: tuple(_read_network_weights(path, config) for path in paths[level]) for level in paths
    }
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
MODEL_SEARCH_DIRS = (
    REPO_DIR / "models",
    Path(sys.prefix) / "share" / "unified_spike_processing_coo" / "models",
)
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
        return (
            round(abs(model_rate - rate), 9),
            variant,
            round(abs(smoothing_ms - 1000 / rate), 9),
            smoothing_ms,
        )

    return min(matches, key=lambda match: (*key(match), float(match[1]), match[0]))[0]


def official_models(cache_dir=None) -> dict:
    """Official CASCADE model name -> download link: models/official_models.yaml (CASCADE's index
    as shipped), updated by neuralib's copy of the index in the cache where there is one."""
    paths = [*(d / "official_models.yaml" for d in reversed(MODEL_SEARCH_DIRS))]
    links: dict = {}
    for path in [*paths, Path(cache_dir or DEFAULT_MODEL_CACHE_DIR).expanduser() / "available_models.yaml"]:
        try:
            text = path.read_text(encoding="utf-8") if path.is_file() else "{}"
            index = (
                yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
            )  # C: 7x faster
            links.update(
                (str(k), v["Link"]) for k, v in index.items() if isinstance(v, dict) and v.get("Link")
            )
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
        raise PipelineError(
            f"no builtin_<rate>Hz_smoothing<ms>ms folder in {', '.join(map(str, MODEL_SEARCH_DIRS))}"
        )
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
        raise ModelDownloadError(
            f"incomplete or oversized download from {url}: {written} of {expected} bytes"
        )
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
        raise ModelResolutionError(
            f"builtin CASCADE model: {exc}; restore models/ or pass --model_dir DIR"
        ) from None


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
            raise ModelResolutionError(
                f"--model_dir {model_dir} is not a usable CASCADE model: {exc}"
            ) from None
    name = str(requested or BUILTIN_MODEL_KEYWORD).strip()
    if name.lower() == BUILTIN_MODEL_KEYWORD:
        return _builtin(frame_rate_hz, "builtin", name)
    cache = Path(cache_dir or DEFAULT_MODEL_CACHE_DIR).expanduser()
    is_auto = name.lower() == AUTO_MODEL_KEYWORD
    if is_auto:
        if frame_rate_hz is None or not math.isfinite(frame_rate_hz) or frame_rate_hz <= 0:
            raise ModelResolutionError(
                "--cascade_model auto needs the subject's frame rate; pass a model name"
            )
        try:
            name = choose_auto_model_name(frame_rate_hz, official_models(cache))
        except ValueError as exc:
            raise ModelResolutionError(
                f"--cascade_model auto: {exc}; pass a model name or --model_dir DIR"
            ) from None
    elif not _MODEL_NAME_RE.match(name) or ".." in name:
        raise ModelResolutionError(
            f"invalid CASCADE model name {name!r}: use an official name, 'auto' or 'builtin'"
        )
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


# Old name the driver still uses, until it calls resolve_model per subject: then delete it.
OFFICIAL_GLOBAL_EXC_MODELS: tuple = ()


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


_ENGINE_CACHE = PROCESS_CACHE  # old name of PROCESS_CACHE (models section), still used just below


def _tensorflow():
    """TensorFlow, imported once per process and quietly (~3 s, ~700 MB: only workers need it).

    TensorFlow's C++ start-up chatter (oneDNN notices, 'failed call to cuInit' on machines
    without a GPU) goes to file descriptor 2 before its log settings apply, so descriptor 2 is
    pointed at /dev/null while it starts; what it found is logged once in our own words.
    """
    if "tensorflow" in _ENGINE_CACHE:
        return _ENGINE_CACHE["tensorflow"]
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
    log.info(
        "TensorFlow %s on %s", tf.__version__, f"{len(gpus)} GPU(s)" if gpus else "the CPU (no GPU found)"
    )
    _ENGINE_CACHE["tensorflow"] = tf
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
    The ``tf.function`` is traced once; weights are arguments so all models share the trace.
    """

    def __init__(self):
        tf = _tensorflow()

        def forward(traces, k1, b1, k2, b2, k3, b3, kd, bd, ko, bo):
            h = tf.expand_dims(traces, -1)  # (B, T, 1)
            h = tf.nn.relu(tf.nn.conv1d(h, k1, 1, "VALID") + b1)
            h = tf.nn.relu(tf.nn.conv1d(h, k2, 1, "VALID") + b2)
            h = tf.maximum(h[:, :-1], h[:, 1:])  # pool 1
            h = tf.nn.relu(tf.nn.conv1d(h, k3, 1, "VALID", dilations=2) + b3)
            h = tf.maximum(h[:, :-2], h[:, 2:])  # pool 2
            h = tf.nn.relu(tf.einsum("btc,cd->btd", h, kd) + bd)  # per position
            out = tf.nn.conv1d(h, ko, 1, "VALID", dilations=4) + bo  # flatten+dense
            return out[:, :, 0]

        self._forward = tf.function(forward, reduce_retracing=True)
        self._tf = tf

    def __call__(self, traces: np.ndarray, weights: NetworkWeights, dense_expansion: int) -> np.ndarray:
        """Raw network output for every window start: (B, T - W + 1 or more) float32."""
        ko = weights.output_kernel.reshape(-1, dense_expansion, 1)  # (positions, D, 1)
        args = list(weights.as_tuple())
        args[8] = ko
        return self._forward(
            self._tf.constant(traces, dtype=self._tf.float32), *[self._tf.constant(a) for a in args]
        ).numpy()


def _engine() -> ConvolutionalCascade:
    if "engine" not in _ENGINE_CACHE:
        _ENGINE_CACHE["engine"] = ConvolutionalCascade()
    return _ENGINE_CACHE["engine"]


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
            total = np.zeros((len(chunk_rows), num_windows), np.float64)
            for weights in members:
                total += engine(traces, weights, model.dense_expansion)[:, :num_windows]
            total /= len(members)
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
            active = maximum_filter1d(
                active.view(np.uint8), size=2 * reach + 1, axis=1, mode="constant"
            ).astype(bool)
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
    support = maximum_filter1d(
        support.view(np.uint8), size=max(1, round(4 * sigma)), axis=1, mode="constant"
    ).astype(bool)
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
# Gridding: cells -> voxels, spikes -> unique sorted COO coordinates, train/test split
# =============================================================================================


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


def z_marker_coords(grid: GridSpec) -> np.ndarray:
    """The original's 'preaugmented' z markers: rows 0-1, columns W-(z+2)..W-1 for every (t, z)."""
    per_plane = []
    for z in range(grid.num_z_planes):
        rows, cols = np.meshgrid(np.arange(2), np.arange(grid.width - (z + 2), grid.width), indexing="ij")
        per_plane.append(np.stack([np.full(rows.size, z), rows.ravel(), cols.ravel()], axis=1))
    plane_pixels = np.concatenate(per_plane).astype(np.int32)  # (P, 3) [z, x, y]
    t = np.repeat(np.arange(grid.num_timepoints, dtype=np.int32), len(plane_pixels))
    return np.column_stack([t, np.tile(plane_pixels, (grid.num_timepoints, 1))])


def _linear_index(coords: np.ndarray, shape: tuple) -> np.ndarray:
    return np.ravel_multi_index(tuple(coords.T.astype(np.int64)), shape)


def build_coo(
    spike_cells: np.ndarray,
    spike_frames: np.ndarray,
    grid: GridSpec,
    frame_to_timepoint: np.ndarray,
    z_markers: bool = True,
) -> dict:
    """Unique, sorted [t, z, x, y] coordinates of every active voxel, and what went into them.

    ``spike_frames`` are original frame numbers; frames mapped to -1 (dropped) are skipped.
    Several cells in one voxel at one time give one active voxel (counted as collisions).
    """
    timepoints = frame_to_timepoint[spike_frames]
    keep = timepoints >= 0
    voxels = grid.cell_voxels[spike_cells[keep]]
    spike_coords = np.column_stack([timepoints[keep], voxels]).astype(np.int64)
    spike_linear = np.unique(_linear_index(spike_coords, grid.shape))
    collisions = int(keep.sum() - len(spike_linear))
    marker_linear = _linear_index(z_marker_coords(grid), grid.shape) if z_markers else np.zeros(0, np.int64)
    all_linear = np.union1d(spike_linear, marker_linear)  # sorted, unique
    coords = np.stack(np.unravel_index(all_linear, grid.shape), axis=1).astype(np.int32)
    return {
        "coords": coords,
        "spike_pixels": len(spike_linear),
        "marker_pixels": len(marker_linear),
        "marker_spike_overlap": len(spike_linear) + len(marker_linear) - len(all_linear),
        "spikes_in_grid": int(keep.sum()),
        "collisions": collisions,
    }


def train_test_split(
    num_timepoints: int, block_frames: int = 330, split_ratio: float = 0.95, seed: int = 42
) -> tuple:
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


def coo_to_dense_grid(spike_coords: np.ndarray, grid_shape, spike_values=None, dtype=np.uint8) -> np.ndarray:
    """Dense (T, Z, H, W) array from COO coordinates (vectorised). Mind the size: T*Z*H*W bytes."""
    dense = np.zeros(tuple(int(s) for s in grid_shape), dtype=dtype)
    coords = np.asarray(spike_coords, dtype=np.int64)
    dense[tuple(coords.T)] = 1 if spike_values is None else spike_values
    return dense


def load_coo_grid(path) -> dict:
    """Everything in a preaugmented_grids_coo.h5 as numpy arrays plus its attributes."""
    import h5py

    with h5py.File(path, "r") as h5:
        result = {key: h5[key][()] for key in h5}
        result["attrs"] = dict(h5.attrs)
    return result


# =============================================================================================
# Batched inference across a worker pool
# =============================================================================================


@dataclass(frozen=True)
class BatchTask:
    """One batch of cells for a worker: raw traces in, sparse spikes and summaries out."""

    rows: np.ndarray  # (B,) row numbers in the subject
    traces: np.ndarray  # (B, T) float32
    cell_ids: np.ndarray  # (B,) ids that key each cell's random stream
    plot_rows: np.ndarray  # positions within this batch whose full traces come back
    model_folder: str
    model_source: str
    is_fluorescence: bool
    frame_rate_hz: float
    baseline_window_s: float
    baseline_percentile: float
    cascade_threshold: object
    spike_mode: str
    spike_threshold: float
    seed: int


# Old name used by process_batch until it calls load_model_once (models section): then delete it.
_cached_model = load_model_once


def process_batch(task: BatchTask) -> dict:
    """dF/F -> CASCADE rates -> binary spikes for one batch; returns only sparse results."""
    started = time.perf_counter()
    model = _cached_model(task.model_folder, task.model_source)
    dff = (
        compute_dff(task.traces, task.frame_rate_hz, task.baseline_window_s, task.baseline_percentile)
        if task.is_fluorescence
        else task.traces
    )
    rates, report = predict_spike_rates(dff, model, threshold=task.cascade_threshold, return_noise=True)
    spikes = binarize_spikes(
        rates,
        task.cell_ids,
        task.spike_mode,
        seed=task.seed,
        spike_threshold=task.spike_threshold,
        model=model,
    )
    cells, frames = np.nonzero(spikes)
    return {
        "rows": task.rows,
        "spike_cells": task.rows[cells].astype(np.int32),
        "spike_frames": frames.astype(np.int32),
        "spike_count": spikes.sum(axis=1).astype(np.int32),
        "noise_level": report["noise_level"],
        "model_noise_level": report["model_noise_level"],
        "rate_sum": np.nansum(rates, axis=0),
        "plot_dff": dff[task.plot_rows].astype(np.float32),
        "plot_rates": rates[task.plot_rows].astype(np.float32),
        "plot_spikes": spikes[task.plot_rows],
        "seconds": time.perf_counter() - started,
    }


def _init_worker(num_threads: int | None, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [worker] %(message)s")
    configure_tensorflow_threads(num_threads)


def available_cpus() -> int:
    """CPUs this process may use (respects SLURM/cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_batches(tasks: Iterable, num_tasks: int, pool, description: str) -> list:
    """Results of every task in order. ``tasks`` is consumed lazily and at most workers + 1
    tasks are in flight, so the batches' copies of the traces never pile up in memory."""
    from collections import deque

    from tqdm import tqdm

    results = []
    with tqdm(
        total=num_tasks, desc=description, unit="batch", leave=False, disable=None, file=sys.stderr
    ) as progress:
        if pool is None:
            for task in tasks:
                results.append(process_batch(task))
                progress.update()
            return results
        pending: deque = deque()
        max_pending = pool._processes + 1  # noqa: SLF001 (the pool's own size)
        for task in tasks:
            pending.append(pool.apply_async(process_batch, (task,)))
            while len(pending) >= max_pending:
                results.append(pending.popleft().get())
                progress.update()
        while pending:
            results.append(pending.popleft().get())
            progress.update()
    return results


# =============================================================================================
# Writing: COO grid, metadata, combined metadata (atomically: a crash never leaves half a file)
# =============================================================================================

COO_FILENAME = "preaugmented_grids_coo.h5"
METADATA_FILENAME = "metadata.h5"
COMBINED_FILENAME = "combined_metadata.h5"
COO_BYTES_PER_ENTRY = 4 * 4 + 1  # four int32 coordinates + one uint8 value


def _h5_attr(value):
    """Values h5py can store as attributes (None -> '', dicts -> JSON)."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return ",".join(value)
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    return value


def _write_dataset(h5, name, data, compress: bool = True):
    data = np.asarray(data)
    if compress and data.size > 0 and data.ndim > 0:
        return h5.create_dataset(name, data=data, compression="gzip", compression_opts=4, shuffle=True)
    return h5.create_dataset(name, data=data)


def _temporary_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_coo_file(
    path: Path, coo: dict, grid: GridSpec, timepoint_indices: np.ndarray, is_train: np.ndarray, attrs: dict
) -> None:
    import h5py

    with h5py.File(path, "w") as h5:
        coords = coo["coords"]
        _write_dataset(h5, "spike_coords", coords)
        _write_dataset(h5, "spike_values", np.ones(len(coords), dtype=np.uint8))
        _write_dataset(h5, "grid_shape", np.asarray(grid.shape, dtype=np.int32), compress=False)
        _write_dataset(h5, "timepoint_indices", timepoint_indices.astype(np.int32))
        _write_dataset(h5, "is_train", is_train.astype(np.uint8))
        for key, value in attrs.items():
            h5.attrs[key] = _h5_attr(value)


def write_metadata_file(path: Path, attrs: dict, datasets: dict, cells: dict) -> None:
    import h5py

    with h5py.File(path, "w") as h5:
        for key, value in attrs.items():
            h5.attrs[key] = _h5_attr(value)
        for key, value in datasets.items():
            _write_dataset(h5, key, value)
        group = h5.create_group("cells")
        for key, value in cells.items():
            _write_dataset(group, key, value)


def write_combined_metadata(output_dir: Path) -> dict:
    """combined_metadata.h5: a group per subject found in output_dir (this run's and earlier)."""
    import h5py

    subject_dirs = sorted(
        (p for p in output_dir.iterdir() if (p / METADATA_FILENAME).is_file()),
        key=lambda p: _natural_key(p.name),
    )
    totals = {"total_subjects": 0, "total_spikes": 0, "total_pixels": 0}
    final = output_dir / COMBINED_FILENAME
    temporary = _temporary_path(final)
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
        for key, value in totals.items():
            combined.attrs[key] = value
        combined.attrs["format"] = "COO_sparse"
        combined.attrs["software_version"] = __version__
        combined.attrs["subjects"] = ",".join(p.name for p in subject_dirs)
    os.replace(temporary, final)
    return totals


# =============================================================================================
# Plotting: one PDF per subject
# =============================================================================================


def plot_subject_pdf(path: Path, subject_name: str, frame_rate_hz: float, plot: dict) -> None:
    """The original's pages (dF/F, rate, spikes for a few cells) plus population views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    time_s = np.arange(plot["dff"].shape[1]) / frame_rate_hz
    labels = [f"cell {int(c)}" for c in plot["cell_ids"]]
    with PdfPages(path) as pdf:
        for key, title, unit in (("dff", "dF/F", "dF/F"), ("rates", "CASCADE spike rate", "spikes/frame")):
            traces = plot[key]
            fig, ax = plt.subplots(figsize=(11, 8.5))
            spacing = np.nanpercentile(np.abs(traces), 99) * 1.2 if np.isfinite(traces).any() else 1.0
            spacing = spacing if spacing > 0 else 1.0
            for i, trace in enumerate(traces):
                ax.plot(time_s, trace + i * spacing, lw=0.7)
            ax.set_yticks(np.arange(len(traces)) * spacing, labels)
            ax.set_xlabel("time (s)")
            ax.set_title(
                f"{subject_name}: {title} of {len(traces)} cells (offset {spacing:.2g} {unit} per row)"
            )
            fig.tight_layout()
            pdf.savefig(fig)
            plt.close(fig)

        fig, ax = plt.subplots(figsize=(11, 8.5))
        for i, row in enumerate(plot["spikes"]):
            ax.vlines(time_s[np.flatnonzero(row)], i + 0.1, i + 0.9, lw=1.0)
        ax.set_yticks(np.arange(len(labels)) + 0.5, labels)
        ax.set_xlim(time_s[0], time_s[-1] if len(time_s) > 1 else 1)
        ax.set_xlabel("time (s)")
        ax.set_title(f"{subject_name}: binary spikes ({plot['spike_mode']}) of the same cells")
        fig.tight_layout()
        pdf.savefig(fig)
        plt.close(fig)

        fig, (raster_ax, rate_ax) = plt.subplots(
            2, 1, figsize=(11, 8.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
        raster_cells, raster_frames = plot["raster"]
        raster_ax.plot(raster_frames / frame_rate_hz, raster_cells, "|", ms=2, color="k", alpha=0.6)
        raster_ax.set_ylabel("cell (sorted by z-plane)")
        raster_ax.set_title(f"{subject_name}: spikes of {plot['raster_size']} random cells")
        rate_ax.plot(time_s, plot["population_rate_hz"], lw=0.8, color="C3")
        for start, stop in plot["test_spans_frames"]:
            rate_ax.axvspan(start / frame_rate_hz, stop / frame_rate_hz, color="C0", alpha=0.15, lw=0)
            raster_ax.axvspan(start / frame_rate_hz, stop / frame_rate_hz, color="C0", alpha=0.08, lw=0)
        rate_ax.set_ylabel("mean rate (Hz/cell)")
        rate_ax.set_xlabel("time (s); blue: test blocks, grey: frames without prediction")
        for start, stop in plot["edge_spans_frames"]:
            rate_ax.axvspan(start / frame_rate_hz, stop / frame_rate_hz, color="0.6", alpha=0.3, lw=0)
        fig.tight_layout()
        pdf.savefig(fig)
        plt.close(fig)

        # one dot per cell at its (x, y) voxel, coloured by its spikes (sparse voxels are invisible as images)
        voxels, counts = plot["cell_voxels"], plot["cell_spike_counts"]
        num_planes = len(plot["z_values"])
        columns = min(6, num_planes)
        rows = int(math.ceil(num_planes / columns))
        fig, axes = plt.subplots(rows, columns, figsize=(11, 8.5), squeeze=False)
        vmax = max(1.0, float(np.percentile(counts, 99))) if counts.size else 1.0
        image = None
        for z, ax in enumerate(axes.ravel()):
            ax.set_xticks([])
            ax.set_yticks([])
            if z >= num_planes:
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
            ax.set_xlim(-1, plot["grid_width"])
            ax.set_ylim(plot["grid_height"], -1)
            ax.set_aspect("equal")
            ax.set_title(f"plane {z} (z={plot['z_values'][z]:g})", fontsize=8)
        if image is not None:
            fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="spikes per cell (kept frames)")
        fig.suptitle(f"{subject_name}: spike counts per cell in each plane (x down, y across)")
        pdf.savefig(fig)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(11, 8.5))
        noise = plot["noise_level"][np.isfinite(plot["noise_level"])]
        if noise.size:
            ax.hist(noise, bins=60, color="0.4")
        for level in plot["model_noise_levels"]:
            ax.axvline(level, color="C3", lw=1, ls="--")
        ax.set_xlabel("CASCADE noise level (% dF/F / sqrt(Hz)); dashed: the model's noise levels")
        ax.set_ylabel("cells")
        ax.set_title(f"{subject_name}: noise levels of {noise.size} cells vs model {plot['model_name']}")
        fig.tight_layout()
        pdf.savefig(fig)
        plt.close(fig)


# =============================================================================================
# One subject, end to end
# =============================================================================================


def _spans(mask: np.ndarray) -> list:
    """[start, stop) frame spans where mask is True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _rss_gb() -> float:
    """Resident memory of this process and its workers, in GB."""
    import psutil

    process = psutil.Process()
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / 1e9


def _plot_payload(
    results,
    subject,
    model,
    grid,
    valid,
    plot_rows,
    spike_cells,
    spike_frames,
    frame_to_timepoint,
    kept_frames,
    is_train,
    predicted,
    rate_sum,
    noise_level,
    spike_mode,
    rng,
) -> dict:
    """What the PDF shows, gathered from the batch results (small arrays only)."""
    num_cells, num_frames = subject.traces.shape
    valid_rows = np.flatnonzero(valid)
    in_grid = frame_to_timepoint[spike_frames] >= 0
    cell_spikes_kept = np.bincount(spike_cells[in_grid], minlength=num_cells)
    raster_pool = (
        valid_rows if len(valid_rows) <= 300 else np.sort(rng.choice(valid_rows, 300, replace=False))
    )
    order = raster_pool[np.lexsort((raster_pool, grid.cell_voxels[raster_pool, 0]))]  # by plane
    rank = np.full(num_cells, -1)
    rank[order] = np.arange(len(order))
    in_raster = rank[spike_cells] >= 0
    test_mask = np.zeros(num_frames, bool)
    test_mask[kept_frames[is_train == 0]] = True
    return {
        "dff": np.concatenate([r["plot_dff"] for r in results]),
        "rates": np.concatenate([r["plot_rates"] for r in results]),
        "spikes": np.concatenate([r["plot_spikes"] for r in results]),
        "cell_ids": subject.cell_ids[plot_rows],
        "spike_mode": spike_mode,
        "raster": (rank[spike_cells[in_raster]], spike_frames[in_raster]),
        "raster_size": len(order),
        "population_rate_hz": rate_sum / max(int(valid.sum()), 1) * subject.frame_rate_hz,
        "test_spans_frames": _spans(test_mask),
        "edge_spans_frames": _spans(~predicted),
        "cell_voxels": grid.cell_voxels[valid],
        "cell_spike_counts": cell_spikes_kept[valid],
        "grid_height": grid.height,
        "grid_width": grid.width,
        "z_values": grid.z_values,
        "noise_level": noise_level,
        "model_noise_levels": model.noise_levels,
        "model_name": model.name,
    }


def process_subject(folder: Path, config: PipelineConfig, model_choice, pool) -> dict:
    """Load, infer, binarise, grid and write one subject; returns its summary numbers."""
    timings = {}
    started = time.perf_counter()
    subject = load_subject(folder, config.coordinates)
    num_cells, num_frames = subject.traces.shape
    timings["load_s"] = time.perf_counter() - started
    log.info(
        "%s: %d cells x %d frames at %.3g Hz (%s layout)",
        subject.name,
        num_cells,
        num_frames,
        subject.frame_rate_hz,
        subject.layout,
    )

    trace_type, reason = (
        (config.trace_type, "set by --trace_type")
        if config.trace_type != "auto"
        else decide_trace_type(subject.traces, subject.trace_type_hint)
    )
    log.info("%s: traces treated as %s (%s)", subject.name, trace_type, reason)

    choice = model_choice(subject.frame_rate_hz)
    model = load_cascade_model_folder(choice.folder, source=choice.source)
    warnings_list = []
    if choice.is_fallback:
        warnings_list.append(f"model fallback: {choice.source}")
    mismatch = abs(model.sampling_rate_hz - subject.frame_rate_hz) / subject.frame_rate_hz
    if mismatch > config.max_rate_mismatch:
        raise PipelineError(
            f"frame rate {subject.frame_rate_hz:.3g} Hz is {mismatch:.0%} away from model "
            f"{model.name}'s {model.sampling_rate_hz:g} Hz: pick a matching model "
            "(--cascade_model auto or --model_dir) or raise --max_rate_mismatch"
        )
    if mismatch > RATE_MISMATCH_WARN_FRACTION:
        message = (
            f"frame rate {subject.frame_rate_hz:.3g} Hz differs from model {model.name}'s "
            f"{model.sampling_rate_hz:g} Hz by {mismatch:.0%} (CASCADE's tolerance: 5%)"
        )
        log.warning("%s: %s", subject.name, message)
        warnings_list.append(message)
    if num_frames < model.window_size + 1:
        raise PipelineError(
            f"{num_frames} frames are fewer than CASCADE's window of {model.window_size} frames"
        )

    nan_rows = np.isnan(subject.traces)
    valid = ~nan_rows.all(axis=1)
    partial_nan = int((nan_rows.any(axis=1) & valid).sum())
    if (~valid).any():
        message = f"{int((~valid).sum())} cells have all-NaN traces and are left out"
        log.warning("%s: %s", subject.name, message)
        warnings_list.append(message)
    if partial_nan:
        message = f"{partial_nan} cells have some NaN frames (no spikes in windows touching them)"
        log.warning("%s: %s", subject.name, message)
        warnings_list.append(message)

    rng = np.random.default_rng([config.seed, 7])
    valid_rows = np.flatnonzero(valid)
    plot_rows = np.sort(rng.choice(valid_rows, size=min(config.num_neurons, len(valid_rows)), replace=False))
    model_folder = str(choice.folder)

    def batch_tasks():
        for start in range(0, num_cells, config.batch_size):
            rows = np.arange(start, min(start + config.batch_size, num_cells))
            yield BatchTask(
                rows=rows,
                traces=subject.traces[rows],
                cell_ids=subject.cell_ids[rows],
                plot_rows=np.searchsorted(rows, plot_rows[(plot_rows >= rows[0]) & (plot_rows <= rows[-1])]),
                model_folder=model_folder,
                model_source=choice.source,
                is_fluorescence=trace_type == "fluorescence",
                frame_rate_hz=subject.frame_rate_hz,
                baseline_window_s=config.baseline_window_s,
                baseline_percentile=config.baseline_percentile,
                cascade_threshold=config.cascade_threshold,
                spike_mode=config.spike_mode,
                spike_threshold=config.spike_threshold,
                seed=config.seed,
            )

    num_batches = -(-num_cells // config.batch_size)
    inference_started = time.perf_counter()
    results = run_batches(batch_tasks(), num_batches, pool, f"{subject.name} CASCADE")
    timings["inference_s"] = time.perf_counter() - inference_started
    log.info(
        "%s: CASCADE on %d batches in %.1f s (%.0f neuron-frames/s); RSS %.2f GB with workers",
        subject.name,
        num_batches,
        timings["inference_s"],
        num_cells * num_frames / max(timings["inference_s"], 1e-9),
        _rss_gb(),
    )

    spike_cells = np.concatenate([r["spike_cells"] for r in results])
    spike_frames = np.concatenate([r["spike_frames"] for r in results])
    spike_count = np.concatenate([r["spike_count"] for r in results])
    noise_level = np.concatenate([r["noise_level"] for r in results])
    model_noise_level = np.concatenate([r["model_noise_level"] for r in results])
    rate_sum = np.sum([r["rate_sum"] for r in results], axis=0)
    keep_spikes = valid[spike_cells]
    spike_cells, spike_frames = spike_cells[keep_spikes], spike_frames[keep_spikes]

    # frames CASCADE could predict; the others are dropped unless --keep_edge_frames
    predicted = np.zeros(num_frames, dtype=bool)
    predicted[model.frames_before : num_frames - model.frames_after] = True
    kept_frames = np.arange(num_frames) if config.keep_edge_frames else np.flatnonzero(predicted)
    frame_to_timepoint = np.full(num_frames, -1, dtype=np.int64)
    frame_to_timepoint[kept_frames] = np.arange(len(kept_frames))

    grid_started = time.perf_counter()
    grid = make_grid_spec(
        subject.positions,
        len(kept_frames),
        config.grid_height,
        config.grid_width,
        config.z_markers,
        valid=valid,
    )
    coo = build_coo(spike_cells, spike_frames, grid, frame_to_timepoint, config.z_markers)
    is_train, test_blocks = train_test_split(
        len(kept_frames), config.split_block, config.split_ratio, config.seed
    )
    timings["grid_s"] = time.perf_counter() - grid_started

    num_entries = len(coo["coords"])
    total_pixels = grid.num_voxels
    sparsity_percent = 100.0 * num_entries / total_pixels
    plane_active = np.bincount(coo["coords"][:, 1], minlength=grid.num_z_planes)
    plane_pixels = grid.num_timepoints * grid.height * grid.width
    attrs = {
        "format": "COO_sparse",
        "subject": subject.name,
        "total_spikes": num_entries,
        "total_pixels": total_pixels,
        "sparsity_percent": sparsity_percent,
        "spike_pixels": coo["spike_pixels"],
        "marker_pixels": coo["marker_pixels"],
        "marker_spike_overlap": coo["marker_spike_overlap"],
        "spikes_in_grid": coo["spikes_in_grid"],
        "collisions": coo["collisions"],
        "cascade_model": model.name,
        "frame_rate_hz": subject.frame_rate_hz,
        "num_timepoints": grid.num_timepoints,
        "num_z_planes": grid.num_z_planes,
        "grid_height": grid.height,
        "grid_width": grid.width,
        "num_cells": num_cells,
        "num_valid_cells": int(valid.sum()),
        "num_original_frames": num_frames,
        "trace_type": trace_type,
        "trace_type_reason": reason,
        "layout": subject.layout,
        "source_files": list(subject.source_files),
        "software_version": __version__,
        "coordinate_order": "t,z,x,y",
        "warnings": "; ".join(warnings_list),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **model.provenance(),
        **config.as_attrs(),
    }
    out_dir = Path(config.output_dir) / subject.name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_started = time.perf_counter()
    finals = [
        out_dir / COO_FILENAME,
        out_dir / METADATA_FILENAME,
        out_dir / f"{subject.name}_visualization.pdf",
    ]
    temporaries = [_temporary_path(path) for path in finals]
    try:
        write_coo_file(temporaries[0], coo, grid, kept_frames, is_train, attrs)
        coo_bytes = temporaries[0].stat().st_size
        timings["write_s"] = time.perf_counter() - write_started
        metadata_attrs = dict(
            attrs,
            coo_file_bytes=coo_bytes,
            timings=json.dumps({k: round(v, 3) for k, v in timings.items()}),
            **dict(timings.items()),
        )
        train_timepoints = np.flatnonzero(is_train == 1)
        write_metadata_file(
            temporaries[1],
            metadata_attrs,
            {
                "z_values": grid.z_values,
                "is_train": is_train,
                "train_timepoints": train_timepoints,
                "test_timepoints": np.flatnonzero(is_train == 0),
                "test_blocks": test_blocks,
                "timepoint_indices": kept_frames.astype(np.int32),
                "per_plane_active_pixels": plane_active,
                "per_plane_sparsity_percent": 100.0 * plane_active / plane_pixels,
                "population_rate_hz": rate_sum / max(int(valid.sum()), 1) * subject.frame_rate_hz,
            },
            {
                "trace_column": np.arange(num_cells, dtype=np.int32),
                "cell_id": subject.cell_ids,
                "position": subject.positions,
                "voxel_zxy": grid.cell_voxels,
                "noise_level": noise_level,
                "model_noise_level": model_noise_level,
                "spike_count": spike_count,
                "valid": valid.astype(np.uint8),
            },
        )
        if config.plots:
            plot_subject_pdf(
                temporaries[2],
                subject.name,
                subject.frame_rate_hz,
                _plot_payload(
                    results,
                    subject,
                    model,
                    grid,
                    valid,
                    plot_rows,
                    spike_cells,
                    spike_frames,
                    frame_to_timepoint,
                    kept_frames,
                    is_train,
                    predicted,
                    rate_sum,
                    noise_level,
                    config.spike_mode,
                    rng,
                ),
            )
        for temporary, final in zip(temporaries, finals):
            if temporary.exists():
                os.replace(temporary, final)
    finally:
        for temporary in temporaries:
            if temporary.exists():
                temporary.unlink()
    timings["total_s"] = time.perf_counter() - started
    dense_bytes = total_pixels  # one uint8 per voxel
    summary = {
        "subject": subject.name,
        "total_spikes": num_entries,
        "total_pixels": total_pixels,
        "sparsity_percent": sparsity_percent,
        "coo_memory_bytes": COO_BYTES_PER_ENTRY * num_entries,
        "coo_file_bytes": coo_bytes,
        "dense_bytes": dense_bytes,
        "memory_savings_percent": 100.0 * (1 - COO_BYTES_PER_ENTRY * num_entries / dense_bytes),
        "disk_savings_percent": 100.0 * (1 - coo_bytes / dense_bytes),
        "model": model.name,
        "model_source": model.source,
        "warnings": warnings_list,
        "seconds": timings["total_s"],
    }
    log.info(
        "%s: %d active voxels (%d spike, %d marker; %d collisions) in a %s grid, written to %s in "
        "%.1f s; RSS %.2f GB",
        subject.name,
        num_entries,
        coo["spike_pixels"],
        coo["marker_pixels"],
        coo["collisions"],
        "x".join(map(str, grid.shape)),
        out_dir,
        timings["total_s"],
        _rss_gb(),
    )
    return summary


# =============================================================================================
# Command line
# =============================================================================================


def _comma_list(text: str) -> tuple:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _threshold_arg(text: str):
    value = text.strip().lower()
    if value in ("none", "false", "off"):
        return False
    if value in ("0", "1"):
        return int(value)
    raise argparse.ArgumentTypeError("must be 0, 1 or none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unified_spike_processing_coo.py",
        description="Turn whole-brain calcium imaging (one folder per subject) into COO-sparse spike "
        "grids (T, Z, H, W) with CASCADE spike inference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Input layouts: subject_<n>/TimeSeries.h5 + data_full.mat (Chen et al. 2018) or "
        "subject_<n>/traces.h5 (traces (N,T), positions (N,3), attr frame_rate_hz), directly under "
        "--input_dir or under --input_dir/Subjects. Exit status: 0 all subjects written, 1 some "
        "subjects failed (each named in the log), 2 bad arguments or no usable model. "
        "For production SLURM runs, fill the model cache on a node with internet and pass "
        "--strict_model, so that a missing model is an error rather than a fallback.",
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--input_dir", required=True, help="folder of subject_<n> folders")
    io.add_argument(
        "--output_dir", required=True, help="where <subject>/ outputs and combined_metadata.h5 go"
    )
    io.add_argument("--subjects", type=_comma_list, default=(), help="only these subjects (comma list)")
    io.add_argument("--skip", type=_comma_list, default=(), help="skip these subjects (comma list)")
    io.add_argument(
        "--coordinates",
        choices=("raw", "registered"),
        default="raw",
        help="cell positions: CellXYZ (raw) or CellXYZ_norm (registered Z-Brain frame, shared across fish)",
    )
    io.add_argument("--no_plots", dest="plots", action="store_false", help="skip the PDF of plots")
    io.add_argument("--num_neurons", type=int, default=10, help="cells shown in the PDF's trace pages")
    io.add_argument("--log_file", default=None, help="also log here (default: <output_dir>/processing.log)")
    io.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")

    run = parser.add_argument_group("compute")
    run.add_argument("--workers", type=int, default=1, help="worker processes for CASCADE inference")
    run.add_argument("--batch_size", type=int, default=30000, help="cells per batch sent to a worker")

    model = parser.add_argument_group("CASCADE model")
    model.add_argument(
        "--cascade_model",
        default="Global_EXC_2Hz_smoothing500ms",
        help="official model name, 'auto' (per subject, nearest sampling rate) or 'builtin'",
    )
    model.add_argument("--model_dir", default=None, help="a CASCADE model folder (overrides --cascade_model)")
    model.add_argument(
        "--model_cache",
        default=None,
        help="where official models are cached/downloaded (default: neuralib's ~/.cache/neuralib/cascade)",
    )
    model.add_argument(
        "--strict_model",
        action="store_true",
        help="error instead of falling back to the builtin model when the named one is unavailable",
    )
    model.add_argument(
        "--offline",
        action="store_true",
        help="never download: use --model_dir, the cache or the builtin model",
    )
    model.add_argument(
        "--cascade_threshold",
        type=_threshold_arg,
        default=1,
        help="CASCADE's post-processing: 0 (negatives to 0), 1 (noise-floor cut) or none",
    )
    model.add_argument(
        "--max_rate_mismatch",
        type=float,
        default=0.5,
        help="refuse a subject whose frame rate is this fraction away from the model's (warn above 0.05)",
    )

    traces = parser.add_argument_group("traces")
    traces.add_argument(
        "--trace_type",
        choices=("auto", "fluorescence", "dff"),
        default="auto",
        help="raw fluorescence (converted to dF/F) or dF/F; auto decides per subject",
    )
    traces.add_argument("--baseline_percentile", type=float, default=8.0, help="F0 percentile for dF/F")
    traces.add_argument("--baseline_window_s", type=float, default=30.0, help="sliding F0 window (seconds)")

    spikes = parser.add_argument_group("spikes and grid")
    spikes.add_argument(
        "--spike_mode",
        choices=("sample", "discrete", "threshold"),
        default="sample",
        help="sample: seeded Bernoulli(rate); discrete: inferred spike counts > 0; threshold: rate >= --spike_threshold",
    )
    spikes.add_argument(
        "--spike_threshold",
        type=float,
        default=0.5,
        help="rate threshold (spikes/frame) for --spike_mode threshold",
    )
    spikes.add_argument(
        "--seed", type=int, default=42, help="seed of spike sampling and the train/test split"
    )
    spikes.add_argument(
        "--keep_edge_frames",
        action="store_true",
        help="keep the frames at both ends where CASCADE's window gives no prediction",
    )
    spikes.add_argument(
        "--grid_shape",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=(256, 128),
        help="grid height (x) and width (y) in pixels",
    )
    spikes.add_argument(
        "--no_z_markers",
        dest="z_markers",
        action="store_false",
        help="do not add the z-plane marker pixels (rows 0-1, last z+2 columns)",
    )
    spikes.add_argument("--split_block", type=int, default=330, help="frames per train/test block")
    spikes.add_argument("--split_ratio", type=float, default=0.95, help="fraction of blocks for training")
    return parser


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    if args.workers < 1 or args.batch_size < 1:
        raise PipelineError("--workers and --batch_size must be at least 1")
    if not 0 < args.split_ratio <= 1 or args.split_block < 1:
        raise PipelineError("--split_ratio must be in (0, 1] and --split_block at least 1")
    if min(args.grid_shape) < 1:
        raise PipelineError("--grid_shape needs positive H and W")
    return PipelineConfig(
        input_dir=args.input_dir,
        output_dir=args.output_dir,
        subjects=tuple(args.subjects),
        skip=tuple(args.skip),
        workers=args.workers,
        batch_size=args.batch_size,
        cascade_model=args.cascade_model,
        model_dir=args.model_dir,
        model_cache=args.model_cache,
        strict_model=args.strict_model,
        offline=args.offline,
        cascade_threshold=args.cascade_threshold,
        trace_type=args.trace_type,
        baseline_percentile=args.baseline_percentile,
        baseline_window_s=args.baseline_window_s,
        spike_mode=args.spike_mode,
        spike_threshold=args.spike_threshold,
        seed=args.seed,
        keep_edge_frames=args.keep_edge_frames,
        grid_height=args.grid_shape[0],
        grid_width=args.grid_shape[1],
        coordinates=args.coordinates,
        z_markers=args.z_markers,
        split_block=args.split_block,
        split_ratio=args.split_ratio,
        num_neurons=args.num_neurons,
        plots=args.plots,
        max_rate_mismatch=args.max_rate_mismatch,
    )


def _setup_logging(log_file: Path, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    for handler in [h for h in root.handlers if getattr(h, "spike_grids", False)]:
        root.removeHandler(handler)  # a second main() in one process (tests, notebooks)
        handler.close()
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(log_file)):
        handler.setFormatter(formatter)
        handler.spike_grids = True
        root.addHandler(handler)


def _format_bytes(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(num_bytes) < 1000 or unit == "TB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000


def summary_lines(summaries: list, failures: dict, totals: dict) -> list:
    """The end-of-run summary, in the original's form but with honest memory figures."""
    lines = ["", "=" * 72]
    for model, source in dict.fromkeys((s["model"], s["model_source"]) for s in summaries):
        if source.startswith(FALLBACK_SOURCE_PREFIX):
            lines.append(
                f"! WARNING: CASCADE model {model} used as a FALLBACK: {source[len(FALLBACK_SOURCE_PREFIX) : -1]}"
            )
        else:
            lines.append(f"CASCADE model: {model} ({source})")
    lines.append("Processed subjects:")
    for s in summaries:
        lines += [
            f"{s['subject']}: {s['total_spikes']:,} active voxels of {s['total_pixels']:,} "
            f"(model {s['model']}, {s['seconds']:.1f} s)",
            f"  → Sparsity: {s['sparsity_percent']:.4f}% of voxels active",
            f"  → Memory savings vs dense: ~{s['memory_savings_percent']:.2f}% in memory "
            f"({_format_bytes(s['coo_memory_bytes'])} COO at {COO_BYTES_PER_ENTRY} B/entry vs "
            f"{_format_bytes(s['dense_bytes'])} dense uint8), ~{s['disk_savings_percent']:.2f}% on disk "
            f"({_format_bytes(s['coo_file_bytes'])})",
        ]
        for warning in s["warnings"]:
            if not warning.startswith("model fallback"):  # said once above
                lines.append(f"  ! WARNING: {warning}")
    for name, reason in failures.items():
        lines.append(f"{name}: FAILED: {reason}")
    total_spikes = sum(s["total_spikes"] for s in summaries)
    total_pixels = sum(s["total_pixels"] for s in summaries)
    coo_bytes = COO_BYTES_PER_ENTRY * total_spikes
    file_bytes = sum(s["coo_file_bytes"] for s in summaries)
    lines += [
        "",
        "Summary:",
        f"  Subjects processed: {len(summaries)} ({len(failures)} failed)",
        f"  Total spikes (active voxels): {total_spikes:,}",
    ]
    if total_pixels:
        lines += [
            f"  Overall sparsity: {100.0 * total_spikes / total_pixels:.4f}% of voxels active",
            f"  Memory savings: ~{100.0 * (1 - coo_bytes / total_pixels):.2f}% in memory "
            f"({_format_bytes(coo_bytes)} vs {_format_bytes(total_pixels)} dense), "
            f"~{100.0 * (1 - file_bytes / total_pixels):.2f}% on disk ({_format_bytes(file_bytes)})",
        ]
    if totals:
        lines.append(f"  combined_metadata.h5: {totals['total_subjects']} subjects in the output folder")
    lines.append("=" * 72)
    return lines


def run_pipeline(config: PipelineConfig, verbose: bool = False) -> int:
    """Process every subject; returns the exit status (0 ok, 1 some subjects failed)."""
    output_dir = Path(config.output_dir)
    subjects = find_subjects(config.input_dir, config.subjects, config.skip)
    if not subjects:
        raise PipelineError(f"no subject_<n> folders under {config.input_dir} (or its Subjects/ folder)")
    log.info(
        "unified_spike_processing_coo %s: %d subjects from %s -> %s (%d workers, batches of %d cells)",
        __version__,
        len(subjects),
        config.input_dir,
        output_dir,
        config.workers,
        config.batch_size,
    )

    resolved: dict = {}  # one resolution (and at most one download try) per model name per run

    def model_choice(frame_rate_hz: float):
        key = config.model_dir or (
            config.cascade_model
            if config.cascade_model != AUTO_MODEL_KEYWORD
            else choose_auto_model_name(frame_rate_hz, OFFICIAL_GLOBAL_EXC_MODELS)
        )
        if key not in resolved:
            resolved[key] = resolve_model(
                key if not config.model_dir else config.cascade_model,
                config.model_dir,
                cache_dir=config.model_cache,
                builtin_dir=BUILTIN_MODEL_DIR,
                strict=config.strict_model,
                allow_download=not config.offline,
            )
        return resolved[key]

    if config.cascade_model != AUTO_MODEL_KEYWORD or config.model_dir:
        model_choice(float("nan"))  # resolve up front: a strict failure stops before any work

    pool = None
    if config.workers > 1:
        import multiprocessing

        threads = max(1, available_cpus() // config.workers)
        # spawn: TensorFlow is not fork-safe, and each worker loads it once
        pool = multiprocessing.get_context("spawn").Pool(
            config.workers, initializer=_init_worker, initargs=(threads, logging.getLogger().level)
        )
    else:
        configure_tensorflow_threads(available_cpus())

    summaries, failures = [], {}
    try:
        for folder in subjects:
            try:
                summaries.append(process_subject(folder, config, model_choice, pool))
            except PipelineError as exc:
                failures[folder.name] = str(exc)
                log.error("%s: %s", folder.name, exc)
            except MemoryError:
                failures[folder.name] = "out of memory"
                log.error("%s: out of memory; lower --batch_size or --workers", folder.name)
            except Exception as exc:  # one bad subject must not stop the others
                failures[folder.name] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "%s: unexpected %s: %s (run with --verbose for the traceback)",
                    folder.name,
                    type(exc).__name__,
                    exc,
                )
                log.debug("traceback", exc_info=True)
    except BaseException:
        if pool is not None:
            pool.terminate()  # Ctrl-C or a crash: do not wait for batches nobody will read
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    totals = write_combined_metadata(output_dir) if summaries else {}
    for line in summary_lines(summaries, failures, totals):
        log.info(line)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create --output_dir {output_dir}: {exc}", file=sys.stderr)
        return 2
    _setup_logging(Path(args.log_file) if args.log_file else output_dir / "processing.log", args.verbose)
    try:
        config = config_from_args(args)
        return run_pipeline(config, verbose=args.verbose)
    except PipelineError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
