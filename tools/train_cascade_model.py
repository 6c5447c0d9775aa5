#!/usr/bin/env python
"""Train a CASCADE-layout spike-inference model folder.

The folder holds ``config.yaml`` (CASCADE's keys plus provenance) and one Keras
HDF5 file per noise level and ensemble member,
``Model_NoiseLevel_<N>_Ensemble_<E>.h5``, with exactly CASCADE's network
(Rupprecht et al. 2021): a 64-frame window of dF/F centred on frame t
(``dff[t-31:t+33]``, CASCADE's offset int(before_frac*64 - 1)) -> Conv1D(30, 31) -> Conv1D(40, 19) -> MaxPool(2) ->
Conv1D(50, 5) -> MaxPool(2) -> Dense(30) per position -> Flatten -> Dense(1),
regressing the number of spikes in frame t smoothed with a Gaussian of
``smoothing`` seconds (units: spikes per frame).

Training data come either from the synthetic generator in
``tools/synthetic_calcium.py`` (default) or from CASCADE ground-truth
recordings (``--ground_truth_dir``), resampled to ``--sampling_rate`` with noise
added to reach each noise level, optionally mixed with synthetic traces
(``--synthetic_fraction``) and started from another model's weights
(``--init_from``).

For speed the network is trained in an equivalent fully-convolutional form
(stride-1 pooling and dilated later layers compute the windowed network's
output for every window of a long segment at once, sharing the work of
overlapping windows); the weights are then copied into the plain windowed
model, checked to give the same output, and saved.

Examples::

    # the shipped builtin models (RATE = 1.85, 2, 2.2, 2.4, 2.6; see benchmarks/RESULTS_accuracy.md)
    python tools/train_cascade_model.py --out models/builtin_RATEHz_smoothing500ms \\
        --sampling_rate RATE --smoothing 0.5 --noise_levels 1 2 3 4 5 6 7 8 9 --ensemble_size 2 \\
        --ground_truth_dir ../shared/cascade/Ground_truth --cell_types excitatory \\
        --synthetic_fraction 1 --init_from models/init/synthetic_2Hz_smoothing500ms \\
        --learning_rate 3e-4 --epochs 4 --gt_replicates 4 --seed 2021 --threads 1

    # synthetic data only (how models/init/synthetic_2Hz_smoothing500ms was made)
    python tools/train_cascade_model.py --out synthetic_2Hz_smoothing500ms --sampling_rate 2 \\
        --smoothing 0.5 --noise_levels 1 2 3 4 5 6 7 8 9 --ensemble_size 2 --epochs 10 \\
        --n_cells 1200 --n_val_cells 200 --duration_s 900 --seed 2021 --threads 2

    # a model for your own frame rate, from CASCADE ground truth
    python tools/train_cascade_model.py --out my_model --sampling_rate 15 --smoothing 0.1 \\
        --ground_truth_dir path/to/Ground_truth --ground_truth_datasets DS09-GCaMP6f-m-V1

Models already present in the output folder are kept (so an interrupted run
resumes where it stopped) unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import time
import warnings

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tools import synthetic_calcium as sc  # noqa: E402

WINDOW_FRAMES = 64
# CASCADE (and the pipeline's engine) predicts frame t from dff[t-31 : t+33]: the window offset is
# int(before_frac * windowsize - 1) = 31, checked against CASCADE's reference outputs. Training
# targets MUST use the same offset, or every prediction lands one frame late.
FRAMES_BEFORE = 31
FILTER_SIZES = (31, 19, 5)
FILTER_NUMBERS = (30, 40, 50)
DENSE_EXPANSION = 30
# Outputs per training segment: 256 windows of a segment of 64 + 255 frames.
# 32 segments per batch give 8192 windows per gradient step, CASCADE's batch size.
OUTPUTS_PER_SEGMENT = 256
SEGMENTS_PER_BATCH = 32


# --------------------------------------------------------------------------
# Keras setup
# --------------------------------------------------------------------------


def import_keras(n_threads: int):
    """Import TensorFlow limited to ``n_threads`` and return (tf, keras module).

    tf-keras (Keras 2) is preferred because its HDF5 files match CASCADE's own
    ('kernel:0' weight names, 'batch_input_shape'), so CASCADE's code can load
    them too; Keras 3 is the fallback.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n_threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TensorFlow already running in this process (e.g. under pytest): keep its setting
    try:
        import tf_keras as keras
    except ImportError:  # pragma: no cover - depends on the installation
        import keras
    return tf, keras


def build_windowed_model(keras):
    """CASCADE's network on one 64-frame window (the model that is saved)."""
    L = keras.layers
    inp = L.Input(shape=(WINDOW_FRAMES, 1))
    x = L.Conv1D(FILTER_NUMBERS[0], FILTER_SIZES[0], activation="relu")(inp)
    x = L.Conv1D(FILTER_NUMBERS[1], FILTER_SIZES[1], activation="relu")(x)
    x = L.MaxPooling1D(2)(x)
    x = L.Conv1D(FILTER_NUMBERS[2], FILTER_SIZES[2], activation="relu")(x)
    x = L.MaxPooling1D(2)(x)
    x = L.Dense(DENSE_EXPANSION, activation="relu")(x)
    x = L.Flatten()(x)
    out = L.Dense(1, activation="linear")(x)
    return keras.Model(inp, out)


def build_sequence_model(tf, keras):
    """The same function evaluated for every window of a longer input.

    With stride-2 pooling, window s and window s+1 do not share pooled values,
    but every window's values appear in the stride-1 pooled sequence at
    positions s, s+2, s+4, ...; so after the first pooling the convolutions are
    dilated by 2, after the second by 4. Output n is the windowed network's
    output for the window starting at input frame n.
    """
    L = keras.layers
    inp = L.Input(shape=(None, 1))
    x = L.Conv1D(FILTER_NUMBERS[0], FILTER_SIZES[0], activation="relu", name="c1")(inp)
    x = L.Conv1D(FILTER_NUMBERS[1], FILTER_SIZES[1], activation="relu", name="c2")(x)
    x = L.MaxPooling1D(pool_size=2, strides=1)(x)
    x = L.Conv1D(FILTER_NUMBERS[2], FILTER_SIZES[2], dilation_rate=2, activation="relu", name="c3")(x)
    x = L.Lambda(lambda v: tf.maximum(v[:, :-2], v[:, 2:]))(x)  # pool 2, dilation 2
    x = L.Conv1D(DENSE_EXPANSION, 1, activation="relu", name="d1")(x)
    out = L.Conv1D(1, 2, dilation_rate=4, name="d2")(x)  # Flatten + Dense over 2 positions
    return keras.Model(inp, out)


def copy_sequence_to_windowed(seq_model, win_model):
    """Copy trained weights into the windowed model (reshaping the dense layers)."""
    c1, c2, c3, d1, d2 = (seq_model.get_layer(n).get_weights() for n in ("c1", "c2", "c3", "d1", "d2"))
    win_layers = [layer for layer in win_model.layers if layer.get_weights()]
    conv_a, conv_b, conv_c, dense_a, dense_b = win_layers
    conv_a.set_weights(c1)
    conv_b.set_weights(c2)
    conv_c.set_weights(c3)
    dense_a.set_weights([d1[0][0], d1[1]])
    # Flatten of (2 positions, 30 channels) orders position-major, like the (2, 30, 1) kernel.
    dense_b.set_weights([d2[0].reshape(2 * DENSE_EXPANSION, 1), d2[1]])


def sliding_windows(dff: np.ndarray) -> np.ndarray:
    """(n_frames - 63, 64, 1) windows of a 1-D trace, window n starting at frame n."""
    view = np.lib.stride_tricks.sliding_window_view(np.asarray(dff, np.float32), WINDOW_FRAMES)
    return view[..., None]


# --------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------


def noise_level_range(level: float, all_levels: list[float]) -> tuple[float, float]:
    """Interval of actual noise levels the model for ``level`` is trained on.

    At inference a trace goes to the model with the nearest noise level, so each
    model sees levels up to half-way to its neighbours (0.5 at the ends). The
    noisiest model also receives every noisier trace, so its interval extends
    one more unit upwards.
    """
    levels = sorted(all_levels)
    i = levels.index(level)
    low = (levels[i - 1] + level) / 2 if i > 0 else max(level - 0.5, 0.1)
    high = (levels[i + 1] + level) / 2 if i + 1 < len(levels) else level + 1.5
    return low, high


def synthetic_traces(
    n_cells: int,
    n_frames: int,
    frame_rate_hz: float,
    smoothing_s: float,
    level_range: tuple[float, float],
    rng: np.random.Generator,
    max_rounds: int = 20,
    param_ranges: dict | None = None,
):
    """Synthetic dF/F and targets whose measured noise level lies in ``level_range``.

    Noise is added to reach a total (signal included) noise level drawn
    uniformly from the range, as a trace is classified at inference. Cells whose
    signal alone is already noisier than their drawn level (very active cells
    at low noise levels) cannot be brought there; they are redrawn, so each
    model learns from the kind of traces that will be routed to it.
    """
    dffs, targets, n_have = [], [], 0
    for _ in range(max_rounds):
        n_draw = max(16, int(1.3 * (n_cells - n_have)))
        spikes = sc.simulate_spike_trains(n_draw, n_frames, frame_rate_hz, rng)
        level = rng.uniform(*level_range, size=n_draw)
        dff = sc.simulate_dff(spikes, frame_rate_hz, level, rng, noise_mode="total", **(param_ranges or {}))
        measured = sc.cascade_noise_level(dff, frame_rate_hz)
        ok = np.abs(measured - level) <= 0.05 * level + 0.02
        dffs.append(dff[ok])
        targets.append(sc.smoothed_spike_targets(spikes[ok], frame_rate_hz, smoothing_s))
        n_have += int(ok.sum())
        if n_have >= n_cells:
            break
    dff = np.concatenate(dffs)[:n_cells]
    target = np.concatenate(targets)[:n_cells]
    return list(dff.astype(np.float32)), list(target.astype(np.float32))


def _fill_nan(y: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN frames (gaps of the resampled ground truth)."""
    y = y.copy()
    bad = ~np.isfinite(y)
    if bad.any() and (~bad).sum() >= 2:
        idx = np.arange(y.size)
        y[bad] = np.interp(idx[bad], idx[~bad], y[~bad])
    return y


def ground_truth_traces(
    resampled: list[tuple[np.ndarray, np.ndarray]],
    frame_rate_hz: float,
    smoothing_s: float,
    level_range: tuple[float, float],
    replicates: int,
    rng: np.random.Generator,
):
    """Noisy copies of resampled ground-truth recordings for one noise-level range.

    Each recording gets ``replicates`` independent noise draws, each to a level
    drawn from the range; recordings already noisier than the drawn level are
    left out for that draw (as CASCADE does).
    """
    from tools.cascade_ground_truth import add_noise_to_level

    dffs, targets = [], []
    for dff, counts in resampled:
        target = sc.smoothed_spike_targets(counts, frame_rate_hz, smoothing_s)
        for _ in range(replicates):
            noisy = add_noise_to_level(dff, frame_rate_hz, rng.uniform(*level_range), rng)
            if noisy is not None:
                dffs.append(_fill_nan(noisy).astype(np.float32))
                targets.append(target.astype(np.float32))
    return dffs, targets


def cut_segments(dffs, targets, rng: np.random.Generator):
    """Cut traces into training segments with a random phase.

    Each segment is 64 + 255 input frames with the 256 targets of its windows;
    consecutive segments overlap by 63 frames so every window of a trace occurs
    exactly once per epoch. The random phase changes segment borders each epoch.
    Traces shorter than a segment (short ground-truth recordings at slow rates)
    become one segment padded with their last value; the weights (third array,
    1 for real windows, 0 for padded ones) keep padded windows out of the loss.
    Returns ``(x, y, weights)`` shaped (n, 319, 1), (n, 256, 1) and (n, 256).
    """
    seg_len = WINDOW_FRAMES - 1 + OUTPUTS_PER_SEGMENT
    xs, ys, ws = [], [], []
    for dff, target in zip(dffs, targets):
        n_windows = dff.size - WINDOW_FRAMES + 1
        if n_windows < 1:
            continue
        if n_windows < OUTPUTS_PER_SEGMENT:
            xs.append(np.concatenate([dff, np.full(seg_len - dff.size, dff[-1], dff.dtype)]))
            y = np.zeros(OUTPUTS_PER_SEGMENT, np.float32)
            y[:n_windows] = target[FRAMES_BEFORE : FRAMES_BEFORE + n_windows]
            w = np.zeros(OUTPUTS_PER_SEGMENT, np.float32)
            w[:n_windows] = 1.0
            ys.append(y)
            ws.append(w)
            continue
        phase = int(rng.integers(0, OUTPUTS_PER_SEGMENT))
        starts = np.arange(phase, n_windows - OUTPUTS_PER_SEGMENT + 1, OUTPUTS_PER_SEGMENT)
        if starts.size == 0:
            starts = np.array([0])
        for s in starts:
            xs.append(dff[s : s + seg_len])
            ys.append(target[s + FRAMES_BEFORE : s + FRAMES_BEFORE + OUTPUTS_PER_SEGMENT])
            ws.append(np.ones(OUTPUTS_PER_SEGMENT, np.float32))
    return np.stack(xs)[..., None], np.stack(ys)[..., None], np.stack(ws)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def copy_windowed_to_sequence(win_model, seq_model):
    """Inverse of copy_sequence_to_windowed: start training from a saved model."""
    conv_a, conv_b, conv_c, dense_a, dense_b = [layer for layer in win_model.layers if layer.get_weights()]
    seq_model.get_layer("c1").set_weights(conv_a.get_weights())
    seq_model.get_layer("c2").set_weights(conv_b.get_weights())
    seq_model.get_layer("c3").set_weights(conv_c.get_weights())
    k, b = dense_a.get_weights()
    seq_model.get_layer("d1").set_weights([k[None], b])
    k, b = dense_b.get_weights()
    seq_model.get_layer("d2").set_weights([k.reshape(2, DENSE_EXPANSION, 1), b])


def train_one(tf, keras, train, val, args, seed: int, log, init: str | None = None):
    """Train one ensemble member; returns (windowed model, metrics dict).

    ``init``: a saved windowed model (.h5) to start from instead of random weights."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    seq = build_sequence_model(tf, keras)
    if init:
        copy_windowed_to_sequence(keras.models.load_model(init, compile=False), seq)
    seq.compile(optimizer=keras.optimizers.Adam(learning_rate=args.learning_rate), loss="mean_squared_error")
    x_val, y_val, w_val = cut_segments(*val, np.random.default_rng(seed + 1))

    best_loss, best_weights, history = np.inf, None, []
    for epoch in range(args.epochs):
        # Decay the learning rate over the last half of training for a smoother optimum.
        frac = epoch / max(1, args.epochs - 1)
        lr = args.learning_rate * (1.0 if frac < 0.5 else 0.1 ** (2 * (frac - 0.5)))
        seq.optimizer.learning_rate.assign(lr)
        x, y, w = cut_segments(*train, rng)
        fit = seq.fit(x, y, sample_weight=w, batch_size=SEGMENTS_PER_BATCH, epochs=1, shuffle=True, verbose=0)
        # Mean squared error over the real (unpadded) validation windows.
        val_pred = seq.predict(x_val, batch_size=64, verbose=0)[..., 0]
        val_loss = float(np.sum(w_val * (val_pred - y_val[..., 0]) ** 2) / np.sum(w_val))
        history.append((float(fit.history["loss"][-1]), val_loss))
        log(
            f"    epoch {epoch + 1}/{args.epochs}: lr {lr:.2e} train mse {history[-1][0]:.5f} "
            f"val mse {val_loss:.5f} ({x.shape[0]} segments)"
        )
        if val_loss < best_loss:
            best_loss, best_weights = val_loss, seq.get_weights()
    seq.set_weights(best_weights)

    win = build_windowed_model(keras)
    win.compile(optimizer=keras.optimizers.Adam(learning_rate=args.learning_rate), loss="mean_squared_error")
    copy_sequence_to_windowed(seq, win)

    # The saved windowed model must compute what was trained.
    probe = x_val[0, :, 0]
    direct = win.predict(sliding_windows(probe), verbose=0)[:, 0]
    via_seq = seq.predict(probe[None, :, None], verbose=0)[0, :, 0]
    max_diff = float(np.max(np.abs(direct - via_seq)))
    if max_diff > 1e-4 * (1.0 + np.max(np.abs(via_seq))):
        raise RuntimeError(f"windowed and sequence models disagree (max diff {max_diff})")

    real = w_val.ravel() > 0
    pred = seq.predict(x_val, batch_size=64, verbose=0)[..., 0].ravel()[real]
    corr = float(np.corrcoef(pred, y_val[..., 0].ravel()[real])[0, 1])
    metrics = {
        "val_mse": round(best_loss, 6),
        "val_pearson_r": round(corr, 4),
        "epochs_mse": [[round(a, 6), round(b, 6)] for a, b in history],
    }
    return win, metrics


def software_versions(tf, keras) -> dict:
    import scipy

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "tensorflow": tf.__version__,
        "keras": f"{keras.__name__} {getattr(keras, '__version__', '?')}",
        "platform": platform.platform(),
    }


def code_version() -> str:
    """Git commit of this repository (with '+modified' if the training code has
    uncommitted changes), or 'unknown' outside a git checkout."""
    import subprocess

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tools"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+modified" if dirty else "")


def write_config(path: str, config: dict) -> None:
    import yaml

    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("# CASCADE model configuration, written by tools/train_cascade_model.py\n")
        yaml.safe_dump(config, fh, sort_keys=False, default_flow_style=False, width=100)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for examples.",
    )
    p.add_argument("--out", required=True, help="output model folder (created)")
    p.add_argument("--model_name", default=None, help="model_name in config.yaml (default: folder name)")
    p.add_argument("--sampling_rate", type=float, default=2.0, help="frame rate of the model in Hz")
    p.add_argument(
        "--smoothing", type=float, default=0.5, help="sigma of the Gaussian smoothing of the targets in seconds"
    )
    p.add_argument(
        "--noise_levels",
        type=int,
        nargs="+",
        default=list(range(1, 10)),
        help="CASCADE noise levels to train a model for",
    )
    p.add_argument(
        "--level_grid",
        type=int,
        nargs="+",
        default=None,
        help="noise levels of the full model whose ranges apply (default: --noise_levels); lets "
        "held-out runs train only some levels with the shipped models' noise ranges",
    )
    p.add_argument("--ensemble_size", type=int, default=2, help="models per noise level")
    p.add_argument("--epochs", type=int, default=8, help="passes over the training traces per model")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="master seed (data, initialisation, shuffling)")
    p.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    syn = p.add_argument_group("synthetic training data (default source)")
    syn.add_argument("--n_cells", type=int, default=600, help="synthetic cells per model")
    syn.add_argument("--duration_s", type=float, default=900.0, help="length of each synthetic trace")
    syn.add_argument("--n_val_cells", type=int, default=100, help="synthetic validation cells per model")
    gt = p.add_argument_group("ground-truth training data")
    gt.add_argument(
        "--ground_truth_dir",
        default=None,
        help="train on CASCADE CAttached_*.mat ground truth in this folder (DSxx subfolders)",
    )
    gt.add_argument("--ground_truth_datasets", nargs="*", default=None, help="restrict to these DSxx folder names")
    gt.add_argument("--exclude_datasets", nargs="*", default=None, help="leave these DSxx folders out (held-out folds)")
    gt.add_argument(
        "--cell_types",
        choices=["all", "excitatory"],
        default="all",
        help="'excitatory': only CASCADE's excitatory datasets (as its Global_EXC models)",
    )
    gt.add_argument("--gt_replicates", type=int, default=5, help="independent noise draws per recording and model")
    gt.add_argument(
        "--synthetic_fraction",
        type=float,
        default=0.0,
        help="with ground truth: add synthetic traces (tools/synthetic_calcium.py) amounting to this "
        "fraction of the ground-truth training frames",
    )
    gt.add_argument(
        "--gt_val_fraction",
        type=float,
        default=0.1,
        help="fraction of recordings held out for validation / model selection",
    )
    p.add_argument(
        "--synthetic_decay_s",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="with --synthetic_fraction: decay time range of the synthetic indicators (default: the "
        "generator's 0.4-2.5 s); rise times are then drawn below half the fastest decay",
    )
    p.add_argument(
        "--init_from",
        default=None,
        help="start each model from the same-named model file of this folder (fine-tuning a "
        "neighbouring frame rate) instead of random weights",
    )
    p.add_argument("--overwrite", action="store_true", help="retrain models that already exist")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    tf, keras = import_keras(args.threads)
    os.makedirs(args.out, exist_ok=True)
    log_start = time.time()

    def log(msg):
        print(f"[{time.time() - log_start:7.1f} s] {msg}", flush=True)

    model_name = args.model_name or os.path.basename(os.path.normpath(args.out))
    levels = sorted(set(args.noise_levels))
    grid = sorted(set(args.level_grid or []) | set(levels))

    resampled, val_resampled = None, None
    if args.ground_truth_dir:
        from tools.cascade_ground_truth import is_excitatory, load_ground_truth, resample_recording, usable_at_rate

        skipped = []
        recs = load_ground_truth(args.ground_truth_dir, args.ground_truth_datasets, skipped)
        recs = [r for r in recs if r.dataset not in set(args.exclude_datasets or [])]
        if args.cell_types == "excitatory":
            recs = [r for r in recs if is_excitatory(r.dataset)]
        skip_counts: dict = {}
        for s in skipped:
            skip_counts[s.reason] = skip_counts.get(s.reason, 0) + 1
        usable = []
        for r in recs:
            why = usable_at_rate(r, args.sampling_rate, WINDOW_FRAMES)
            if why is None:
                usable.append(r)
            else:
                key = why.split(",")[0] if "below" in why else "shorter than one 64-frame window"
                skip_counts[key] = skip_counts.get(key, 0) + 1
        recs = usable
        if not recs:
            sys.exit(f"no usable CAttached*.mat recordings found in {args.ground_truth_dir}")
        resampled = [resample_recording(r, args.sampling_rate) for r in recs]
        order = np.random.default_rng(args.seed).permutation(len(resampled))
        n_val = max(1, int(round(args.gt_val_fraction * len(resampled)))) if len(resampled) > 1 else 0
        val_resampled = [resampled[i] for i in order[:n_val]] or resampled
        resampled = [resampled[i] for i in order[n_val:]] or resampled
        n_gt_frames = sum(d.size for d, _ in resampled)
        log(f"{len(recs)} recordings ({n_gt_frames} frames at {args.sampling_rate:g} Hz) for training")
        datasets = sorted({r.dataset for r in recs})
        data_description = {
            "source": "CASCADE ground truth",
            "ground_truth_dir": os.path.abspath(args.ground_truth_dir),
            "cell_types": args.cell_types,
            "excluded_datasets": sorted(args.exclude_datasets or []),
            "n_recordings": len(recs),
            "n_validation_recordings": n_val,
            "n_training_frames": int(n_gt_frames),
            "recordings_left_out": skip_counts,
            "resampling": "mean of the original frames in each 1/sampling_rate bin; spikes counted per bin",
            "noise": "white Gaussian noise added to reach a total noise level drawn uniformly in each "
            "model's noise range; recordings already noisier are skipped",
            "replicates_per_recording": args.gt_replicates,
            "synthetic_fraction": args.synthetic_fraction,
            "synthetic_decay_s": args.synthetic_decay_s or "generator default (0.4-2.5 s)",
        }
        if args.synthetic_fraction > 0:
            datasets = datasets + ["synthetic (tools/synthetic_calcium.py)"]
    else:
        datasets = ["synthetic (tools/synthetic_calcium.py)"]
        data_description = {
            "source": "synthetic (tools/synthetic_calcium.py defaults)",
            "cells_per_model": args.n_cells,
            "validation_cells_per_model": args.n_val_cells,
            "trace_duration_s": args.duration_s,
            "spikes": "inhomogeneous Poisson with slow log-normal rate modulation, half the cells bursty; "
            "mean rates log-uniform 0.01-2 Hz",
            "indicator": "double-exponential kernels, rise 50-200 ms, decay 0.4-2.5 s, peak 4-60 % dF/F "
            "per spike, mild supralinearity and saturation, per-cell exposure window "
            "inside the frame, slow baseline drift and offset",
            "noise": "white Gaussian plus partly shot-like noise, scaled per cell so the total CASCADE "
            "noise level (signal included) is uniform in each model's noise range",
        }

    config = {
        "model_name": model_name,
        "sampling_rate": float(args.sampling_rate),
        "training_datasets": datasets,
        "noise_levels": levels,
        "smoothing": float(args.smoothing),
        "causal_kernel": 0,
        "windowsize": WINDOW_FRAMES,
        "before_frac": 0.5,
        "filter_sizes": list(FILTER_SIZES),
        "filter_numbers": list(FILTER_NUMBERS),
        "dense_expansion": DENSE_EXPANSION,
        "loss_function": "mean_squared_error",
        "optimizer": "Adam",
        "nr_of_epochs": args.epochs,
        "ensemble_size": args.ensemble_size,
        "batch_size": SEGMENTS_PER_BATCH * OUTPUTS_PER_SEGMENT,
        "training_finished": "Running",
        "verbose": 1,
        # Provenance beyond CASCADE's keys.
        "training_command": "python "
        + " ".join(shlex.quote(a) for a in [os.path.relpath(os.path.abspath(__file__), REPO_ROOT)] + argv),
        "training_seed": args.seed,
        "training_initialised_from": args.init_from,
        "training_code_version": code_version(),
        "training_software": software_versions(tf, keras),
        "training_data": data_description,
        "training_noise_level_ranges": {int(n): [round(v, 3) for v in noise_level_range(n, grid)] for n in levels},
        "training_method": "fully-convolutional equivalent of the windowed network on segments of "
        f"{WINDOW_FRAMES - 1 + OUTPUTS_PER_SEGMENT} frames, {SEGMENTS_PER_BATCH} segments "
        "(= batch_size windows) per step, Adam with learning-rate decay over the "
        "second half, weights of the epoch with the lowest validation MSE",
        "output_units": "spikes per frame (multiply by sampling_rate for spikes per second)",
        "training_started": _dt.datetime.now().isoformat(timespec="seconds"),
        "training_metrics": {},
    }
    config_path = os.path.join(args.out, "config.yaml")
    if os.path.exists(config_path) and not args.overwrite:
        # Resuming: keep the metrics of models trained earlier.
        import yaml

        with open(config_path) as fh:
            old = yaml.safe_load(fh) or {}
        config["training_metrics"] = old.get("training_metrics", {}) or {}
        config["training_started"] = old.get("training_started", config["training_started"])
    write_config(config_path, config)

    n_frames = int(round(args.duration_s * args.sampling_rate))
    unreachable_levels: set[int] = set()
    for level in levels:
        level_range = noise_level_range(level, grid)
        for member in range(args.ensemble_size):
            name = f"Model_NoiseLevel_{level}_Ensemble_{member}.h5"
            path = os.path.join(args.out, name)
            if os.path.exists(path) and not args.overwrite:
                log(f"{name} exists, skipped")
                continue
            t0 = time.time()
            # One independent stream per model, so models do not depend on which
            # others were trained in this run.
            seed = int(np.random.SeedSequence([args.seed, level, member]).generate_state(1)[0] % (2**31))
            rng = np.random.default_rng(seed)
            if resampled is None:
                train = synthetic_traces(args.n_cells, n_frames, args.sampling_rate, args.smoothing, level_range, rng)
                val = synthetic_traces(args.n_val_cells, n_frames, args.sampling_rate, args.smoothing, level_range, rng)
            else:
                train = ground_truth_traces(
                    resampled, args.sampling_rate, args.smoothing, level_range, args.gt_replicates, rng
                )
                val = ground_truth_traces(
                    val_resampled, args.sampling_rate, args.smoothing, level_range, max(1, args.gt_replicates // 2), rng
                )
                if not train[0] or not val[0]:
                    log(f"{name}: no ground truth reaches noise level range {level_range}, skipped")
                    unreachable_levels.add(level)
                    continue
                if args.synthetic_fraction > 0:
                    n_syn_frames = args.synthetic_fraction * sum(d.size for d in train[0])
                    n_syn = max(1, int(round(n_syn_frames / n_frames)))
                    ranges = None
                    if args.synthetic_decay_s:
                        # Rise times stay below half the fastest decay (the kernel needs decay > rise).
                        low = args.synthetic_decay_s[0]
                        ranges = {
                            "decay_range_s": tuple(args.synthetic_decay_s),
                            "rise_range_s": (min(0.02, low / 4), min(0.2, low / 2)),
                        }
                    syn = synthetic_traces(
                        n_syn, n_frames, args.sampling_rate, args.smoothing, level_range, rng, param_ranges=ranges
                    )
                    train = (train[0] + syn[0], train[1] + syn[1])
            log(
                f"{name}: noise levels {level_range[0]:.2f}-{level_range[1]:.2f}, "
                f"{len(train[0])} training traces, data ready in {time.time() - t0:.1f} s"
            )
            init = os.path.join(args.init_from, name) if args.init_from else None
            if init and not os.path.exists(init):
                sys.exit(f"--init_from: {init} not found")
            model, metrics = train_one(tf, keras, train, val, args, seed, log, init=init)
            tmp = path[:-3] + ".tmp.h5"
            with warnings.catch_warnings():
                # HDF5 is deliberate: it is CASCADE's format, not Keras' preferred one.
                warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy.*")
                model.save(tmp)
            os.replace(tmp, path)
            metrics["wall_s"] = round(time.time() - t0, 1)
            metrics["seed"] = seed
            config["training_metrics"][name] = metrics
            write_config(config_path, config)
            log(f"{name}: saved, validation r = {metrics['val_pearson_r']:.3f}, {metrics['wall_s']:.0f} s")

    if unreachable_levels:
        # Only ground truth can be too noisy for a level; leave those levels out
        # of the model rather than shipping an incomplete ensemble.
        levels = [n for n in levels if n not in unreachable_levels]
        config["noise_levels"] = levels
        config["noise_levels_without_training_data"] = sorted(unreachable_levels)
    expected = [f"Model_NoiseLevel_{n}_Ensemble_{e}.h5" for n in levels for e in range(args.ensemble_size)]
    missing = [f for f in expected if not os.path.exists(os.path.join(args.out, f))]
    config["training_finished"] = "Yes" if not missing else "No"
    config["training_ended"] = _dt.datetime.now().isoformat(timespec="seconds")
    config["training_wall_s_this_run"] = round(time.time() - log_start, 1)
    write_config(config_path, config)
    log(f"done, training_finished: {config['training_finished']}" + (f", missing {missing}" if missing else ""))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
