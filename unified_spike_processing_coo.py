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
CASCADE models, inference, loading, dF/F, spike binarisation, gridding, writing, plotting,
orchestration and the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__version__ = "1.0.0"

log = logging.getLogger("spike_grids")

REPO_DIR = Path(__file__).resolve().parent
BUILTIN_MODEL_NAME = "builtin_2Hz_smoothing500ms"
BUILTIN_MODEL_DIR = REPO_DIR / "models" / BUILTIN_MODEL_NAME


class PipelineError(Exception):
    """An error with a one-line, user-facing explanation (which file, what to do)."""


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
CASCADE_LAYER_CLASSES = ("Conv1D", "Conv1D", "MaxPooling1D", "Conv1D", "MaxPooling1D",
                         "Dense", "Flatten", "Dense")


@dataclass(frozen=True)
class NetworkWeights:
    """Weights of one ensemble member, in Keras's layout (kernel: (width, in, out))."""
    conv1_kernel: np.ndarray
    conv1_bias: np.ndarray
    conv2_kernel: np.ndarray
    conv2_bias: np.ndarray
    conv3_kernel: np.ndarray
    conv3_bias: np.ndarray
    dense_kernel: np.ndarray      # (filters3, dense_expansion), applied at each position
    dense_bias: np.ndarray
    output_kernel: np.ndarray     # (positions * dense_expansion, 1), flattened position-major
    output_bias: np.ndarray
    source_file: str = ""

    def as_tuple(self) -> tuple:
        return (self.conv1_kernel, self.conv1_bias, self.conv2_kernel, self.conv2_bias,
                self.conv3_kernel, self.conv3_bias, self.dense_kernel, self.dense_bias,
                self.output_kernel, self.output_bias)


@dataclass(frozen=True)
class CascadeModel:
    """A CASCADE model: its configuration and the weights of every ensemble member."""
    name: str
    folder: str
    sampling_rate_hz: float
    noise_levels: tuple               # model noise levels, ascending ints
    smoothing_s: float
    causal_kernel: bool
    window_size: int
    before_frac: float
    filter_sizes: tuple
    filter_numbers: tuple
    dense_expansion: int
    ensemble_size: int
    ensembles: dict                   # noise level -> tuple of NetworkWeights
    source: str = "model_dir"         # how it was found (see resolve_model)

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

    def provenance(self) -> dict:
        """What outputs record about the model, so a file says how it was made."""
        return {"cascade_model": self.name, "model_source": self.source,
                "model_folder": self.folder, "model_sampling_rate_hz": self.sampling_rate_hz,
                "model_smoothing_s": self.smoothing_s,
                "model_noise_levels": list(self.noise_levels),
                "model_ensemble_size": self.ensemble_size}


def _read_model_config(folder: Path) -> dict:
    import yaml
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise PipelineError(f"CASCADE model folder {folder} has no config.yaml: "
                            "point --model_dir at a folder as CASCADE distributes it")
    try:
        config = yaml.safe_load(config_path.read_text())
    except Exception as exc:  # yaml raises many types
        raise PipelineError(f"cannot parse {config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise PipelineError(f"{config_path} is not a CASCADE config (expected a mapping)")
    required = ("sampling_rate", "noise_levels", "smoothing", "windowsize", "before_frac",
                "filter_sizes", "filter_numbers", "dense_expansion")
    missing = [key for key in required if key not in config]
    if missing:
        raise PipelineError(f"{config_path} lacks {', '.join(missing)}: not a CASCADE model config")
    return config


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
        raise PipelineError(f"{path}: layer stack {classes} is not CASCADE's "
                            f"{CASCADE_LAYER_CLASSES}; this engine cannot run it")
    convs = [layers[0]["config"], layers[1]["config"], layers[3]["config"]]
    for i, conv in enumerate(convs):
        expected = (int(config["filter_numbers"][i]), int(config["filter_sizes"][i]))
        found = (int(conv["filters"]), _as_int(conv["kernel_size"]))
        if found != expected or conv.get("activation") != "relu" \
                or conv.get("padding", "valid") != "valid" \
                or _as_int(conv.get("strides", 1)) != 1 or _as_int(conv.get("dilation_rate", 1)) != 1:
            raise PipelineError(f"{path}: convolution {i + 1} is {found} {conv.get('activation')}, "
                                f"config.yaml says {expected} relu valid")
    for pool in (layers[2]["config"], layers[4]["config"]):
        if _as_int(pool.get("pool_size", 2)) != 2 or _as_int(pool.get("strides", 2)) != 2 \
                or pool.get("padding", "valid") != "valid":
            raise PipelineError(f"{path}: max-pooling layers must be size 2, stride 2, valid")
    if layers[5]["config"].get("activation") != "relu" \
            or int(layers[5]["config"]["units"]) != int(config["dense_expansion"]):
        raise PipelineError(f"{path}: hidden dense layer is not relu x dense_expansion")
    if layers[7]["config"].get("activation") != "linear" or int(layers[7]["config"]["units"]) != 1:
        raise PipelineError(f"{path}: output layer must be a single linear unit")


def _read_network_weights(path: Path, config: dict) -> NetworkWeights:
    import h5py
    try:
        with h5py.File(path, "r") as h5:
            raw_config = h5.attrs.get("model_config")
            if raw_config is None:
                raise PipelineError(f"{path} has no 'model_config' attribute: "
                                    "not a Keras model file saved by CASCADE")
            if isinstance(raw_config, bytes):
                raw_config = raw_config.decode()
            layers = _layer_config_list(json.loads(raw_config))
            _check_architecture(layers, config, path)
            group = h5["model_weights"] if "model_weights" in h5 else h5
            layer_names = [n.decode() if isinstance(n, bytes) else str(n)
                           for n in group.attrs["layer_names"]]
            arrays = []
            for layer_name in layer_names:
                layer_group = group[layer_name]
                weight_names = [n.decode() if isinstance(n, bytes) else str(n)
                                for n in layer_group.attrs.get("weight_names", [])]
                if not weight_names:
                    continue
                weights = [np.asarray(layer_group[n], dtype=np.float32) for n in weight_names]
                kernel = next(w for w in weights if w.ndim >= 2)
                bias = next(w for w in weights if w.ndim == 1)
                arrays.append((kernel, bias))
    except PipelineError:
        raise
    except (OSError, KeyError, StopIteration, ValueError) as exc:
        raise PipelineError(f"cannot read CASCADE weights from {path} ({exc}); "
                            "the file is missing, truncated or not a Keras HDF5 model: "
                            "re-download the model folder") from None
    if len(arrays) != 5:
        raise PipelineError(f"{path}: expected 5 weighted layers, found {len(arrays)}")
    (k1, b1), (k2, b2), (k3, b3), (kd, bd), (ko, bo) = arrays
    return NetworkWeights(k1, b1, k2, b2, k3, b3, kd, bd, ko, bo, source_file=str(path))


def load_cascade_model_folder(folder, source: str = "model_dir") -> CascadeModel:
    """Load an official-layout CASCADE model folder (config.yaml + Model_NoiseLevel_*.h5)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"CASCADE model folder {folder} does not exist")
    config = _read_model_config(folder)
    members: dict = {}
    for path in sorted(folder.glob("*.h5")):
        match = MODEL_FILE_PATTERN.search(path.name)
        if match:
            members.setdefault(int(match.group(1)), []).append((int(match.group(2)), path))
    noise_levels = tuple(sorted(int(n) for n in config["noise_levels"]))
    absent = [n for n in noise_levels if n not in members]
    if absent:
        raise PipelineError(f"CASCADE model folder {folder} has no Model_NoiseLevel_{absent[0]}_"
                            "Ensemble_*.h5 file although config.yaml lists that noise level: "
                            "the download is incomplete, fetch the model again")
    ensembles = {level: tuple(_read_network_weights(path, config)
                              for _, path in sorted(members[level])) for level in noise_levels}
    return CascadeModel(
        name=str(config.get("model_name", folder.name)), folder=str(folder.resolve()),
        sampling_rate_hz=float(config["sampling_rate"]), noise_levels=noise_levels,
        smoothing_s=float(config["smoothing"]), causal_kernel=bool(config.get("causal_kernel", 0)),
        window_size=int(config["windowsize"]), before_frac=float(config["before_frac"]),
        filter_sizes=tuple(int(v) for v in config["filter_sizes"]),
        filter_numbers=tuple(int(v) for v in config["filter_numbers"]),
        dense_expansion=int(config["dense_expansion"]),
        ensemble_size=min(len(e) for e in ensembles.values()),
        ensembles=ensembles, source=source)


def load_cascade_model(folder_or_name, *, cache_dir=None, strict: bool = False,
                       frame_rate_hz: Optional[float] = None) -> CascadeModel:
    """Load a CASCADE model from a folder, or by name ('builtin' or an official model name).

    Names are resolved as on the command line (see resolve_model): local cache, then download,
    then the builtin model with a warning unless ``strict``.
    """
    candidate = Path(str(folder_or_name)).expanduser()
    if candidate.is_dir():
        return load_cascade_model_folder(candidate, source="model_dir")
    choice = resolve_model(str(folder_or_name), None, cache_dir=cache_dir,
                           strict=strict, frame_rate_hz=frame_rate_hz)
    return load_cascade_model_folder(choice.folder, source=choice.source)


# =============================================================================================
# Model resolution: --model_dir, cache, download, builtin fallback
# =============================================================================================
# (filled in below)

# MODEL_RESOLUTION_PLACEHOLDER


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
    """Import TensorFlow quietly (it costs ~3 s and ~700 MB, so only workers import it)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    return tf


def configure_tensorflow_threads(num_threads: Optional[int]) -> None:
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
            h = tf.expand_dims(traces, -1)                                    # (B, T, 1)
            h = tf.nn.relu(tf.nn.conv1d(h, k1, 1, "VALID") + b1)
            h = tf.nn.relu(tf.nn.conv1d(h, k2, 1, "VALID") + b2)
            h = tf.maximum(h[:, :-1], h[:, 1:])                               # pool 1
            h = tf.nn.relu(tf.nn.conv1d(h, k3, 1, "VALID", dilations=2) + b3)
            h = tf.maximum(h[:, :-2], h[:, 2:])                               # pool 2
            h = tf.nn.relu(tf.einsum("btc,cd->btd", h, kd) + bd)              # per position
            out = tf.nn.conv1d(h, ko, 1, "VALID", dilations=4) + bo           # flatten+dense
            return out[:, :, 0]

        self._forward = tf.function(forward, reduce_retracing=True)
        self._tf = tf

    def __call__(self, traces: np.ndarray, weights: NetworkWeights, dense_expansion: int) -> np.ndarray:
        """Raw network output for every window start: (B, T - W + 1 or more) float32."""
        ko = weights.output_kernel.reshape(-1, dense_expansion, 1)            # (positions, D, 1)
        args = list(weights.as_tuple())
        args[8] = ko
        return self._forward(self._tf.constant(traces, dtype=self._tf.float32),
                             *[self._tf.constant(a) for a in args]).numpy()


_ENGINE_CACHE: dict = {}  # one traced engine per process (a cache, not shared state)


def _engine() -> ConvolutionalCascade:
    if "engine" not in _ENGINE_CACHE:
        _ENGINE_CACHE["engine"] = ConvolutionalCascade()
    return _ENGINE_CACHE["engine"]


def _nan_window_mask(nan_frames: np.ndarray, window_size: int, num_windows: int) -> np.ndarray:
    """True for every window start whose window holds at least one NaN frame."""
    counts = np.concatenate([np.zeros((nan_frames.shape[0], 1), np.int32),
                             np.cumsum(nan_frames, axis=1, dtype=np.int32)], axis=1)
    return (counts[:, window_size:window_size + num_windows] - counts[:, :num_windows]) > 0


def predict_raw_rates(dff: np.ndarray, model: CascadeModel, *,
                      max_chunk_frames: int = 1 << 19) -> tuple:
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
            chunk_rows = rows[start:start + rows_per_chunk]
            traces = dff[chunk_rows].astype(np.float32)
            nan_frames = np.isnan(traces)
            traces[nan_frames] = 0.0  # masked below: any NaN in a window gives NaN
            total = np.zeros((len(chunk_rows), num_windows), np.float64)
            for weights in members:
                total += engine(traces, weights, model.dense_expansion)[:, :num_windows]
            total /= len(members)
            if nan_frames.any():
                total[_nan_window_mask(nan_frames, window, num_windows)] = np.nan
            rates[chunk_rows, first:first + num_windows] = total
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
            active = maximum_filter1d(active.view(np.uint8), size=2 * reach + 1, axis=1,
                                      mode="constant").astype(bool)
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


def predict_spike_rates(dff: np.ndarray, model: CascadeModel, threshold=0, padding=np.nan,
                        *, return_noise: bool = False, max_chunk_frames: int = 1 << 19):
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
    rates[:, :min(model.frames_before, num_frames)] = padding
    if model.frames_after > 0:
        rates[:, max(0, num_frames - model.frames_after):] = padding
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
    support = maximum_filter1d(support.view(np.uint8), size=max(1, round(4 * sigma)), axis=1,
                               mode="constant").astype(bool)
    # Rows laid end to end with `radius` zeros between them, so no kernel reaches a neighbour.
    width = num_frames + 2 * radius
    rate_flat = np.zeros((num_neurons, width))
    rate_flat[:, radius:radius + num_frames] = rates
    rate_flat = rate_flat.ravel()
    support_flat = np.zeros((num_neurons, width), bool)
    support_flat[:, radius:radius + num_frames] = support
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
            window_error = error[tap:tap + len(gain)]
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
    counts[:] = spikes_flat.reshape(num_neurons, width)[:, radius:radius + num_frames]
    return counts
