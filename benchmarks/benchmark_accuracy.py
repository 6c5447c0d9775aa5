#!/usr/bin/env python
"""Held-out spike-inference accuracy on real CASCADE ground truth at a slow frame rate.

For every ground-truth recording (simultaneous electrophysiology and calcium
imaging, CASCADE's ``Ground_truth/DSxx-*/CAttached*.mat``):

1. resample to the model's frame rate (mean of the original frames in each
   bin, spikes counted per bin; see tools/cascade_ground_truth.py),
2. add white Gaussian noise to reach each CASCADE noise level (seeded per
   recording and level); recordings already noisier than a level are left out
   of that level, as in CASCADE's own evaluation,
3. infer spike rates with
   (a) CASCADE models through the pipeline
       (``predict_spike_rates(dff, read_model_folder(model), threshold=0)``),
       each recording with a model that was NOT trained on its dataset (see
       "Held-out evaluation" below),
   (b) OASIS deconvolution made fair: explicit robust noise estimate
       ``sn = median|diff| / (0.6745 sqrt 2)``, AR(1) decay fitted to each trace,
       spikes smoothed with the same Gaussian; several variants, the best
       (highest median correlation over the scored recordings at that noise
       level) is reported,
   (c) the floor: rectified dF/F derivative smoothed with the same Gaussian,
4. score each method by the Pearson correlation with the true spike rate (spikes
   per frame smoothed with a Gaussian of ``smoothing * frame rate`` frames) on
   the frames where the model gives a value (all methods use the same frames).

Held-out evaluation
-------------------
The datasets are split into ``FOLDS`` (by dataset; folders holding the same
neurons stay together). A model set is either one folder or a pattern with
``{k}`` naming one folder per fold (trained without the datasets of fold k,
see ``--train_folds``). A recording is scored by a model only if the model's
``training_datasets`` (config.yaml) do not contain its dataset; recordings that
some model set has seen are not scored at all, so every method is compared on
the same held-out recordings.

Usage::

    # train the fold models of some variants (resumable), then score them
    python benchmarks/benchmark_accuracy.py --train_folds exc all --fold_dir FOLDS \\
        --train_args "--epochs 10 ..."
    python benchmarks/benchmark_accuracy.py --model_set exc='FOLDS/exc/fold{k}' \\
        --model_set all='FOLDS/all/fold{k}' --members 1 2 --markdown benchmarks/RESULTS_accuracy.md

The ground truth is looked up in ``--ground_truth_dir``, else
``$SPIKE_SHARED_DIR/cascade/Ground_truth``, else ``../shared/cascade/Ground_truth``
beside the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
import warnings
import zlib
from collections import defaultdict

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tools.cascade_ground_truth import (  # noqa: E402
    add_noise_to_level,
    dataset_group,
    is_excitatory,
    load_ground_truth,
    resample_recording,
    usable_at_rate,
)
from tools.synthetic_calcium import MEDIAN_ABS_DIFF_PER_SIGMA, smoothed_spike_targets  # noqa: E402

DEFAULT_MODEL = os.path.join(REPO_ROOT, "models", "builtin_2Hz_smoothing500ms")

# Folds by dataset (folder-name prefixes), balanced by hand for indicator, species and cell type.
# DS12 and X-DS11 are the same neurons (with / without neuropil correction): same fold.
# DS03 and X-DS00 (8-s recordings) and DS18/DS19 (30-s recordings) are too short for a 64-frame
# window at 2 Hz; they are listed so that every folder belongs to a fold.
FOLDS = [
    ["DS01-", "DS06-", "DS14-", "DS20-", "DS32-", "DS22-", "DS24-"],
    ["DS02-", "DS08-", "DS15-", "DS21-", "DS18-", "DS19-", "DS25-"],
    ["DS04-", "DS09-", "DS16-", "DS28-", "DS12-", "X-DS11-", "DS26-", "DS27-"],
    ["DS05-", "DS17-", "DS40-", "DS03-", "X-DS00-", "DS23-", "DS41-"],
]

# Training variants compared with --train_folds (arguments added to --train_args).
VARIANTS = {
    "all": [],
    "exc": ["--cell_types", "excitatory"],
    "exc_syn": ["--cell_types", "excitatory", "--synthetic_fraction", "1"],
    "all_syn": ["--synthetic_fraction", "1"],
    "exc_fastsyn": ["--cell_types", "excitatory", "--synthetic_fraction", "1", "--synthetic_decay_s", "0.15", "2.5"],
}


def fold_of(dataset: str) -> int:
    for k, prefixes in enumerate(FOLDS):
        if dataset.startswith(tuple(prefixes)):
            return k
    raise KeyError(f"dataset {dataset} is in no fold: add it to FOLDS")


def default_ground_truth_dir() -> str:
    shared = os.environ.get("SPIKE_SHARED_DIR") or os.path.join(os.path.dirname(REPO_ROOT), "shared")
    return os.path.join(shared, "cascade", "Ground_truth")


# --------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------


def fill_nan(y: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN frames (OASIS and the derivative need finite input)."""
    y = np.asarray(y, float).copy()
    bad = ~np.isfinite(y)
    if bad.any() and (~bad).sum() >= 2:
        idx = np.arange(y.size)
        y[bad] = np.interp(idx[bad], idx[~bad], y[~bad])
    return y


def robust_noise_sd(y: np.ndarray) -> float:
    """White-noise standard deviation from the median absolute frame difference."""
    return float(np.nanmedian(np.abs(np.diff(y))) / MEDIAN_ABS_DIFF_PER_SIGMA)


# Fair OASIS variants: name -> keyword arguments for deconvolve (besides tau_d, sn).
OASIS_VARIANTS = {"AR1 L1": dict(penalty=1), "AR1 L1 refit-g": dict(penalty=1, optimize_g=5), "AR1 L0": dict(penalty=0)}


def oasis_rates(y: np.ndarray, frame_rate_hz: float, smoothing_s: float, variant: dict, seed: int) -> np.ndarray:
    """OASIS spikes with an explicit robust noise estimate and a fitted AR(1) decay,
    smoothed like the targets."""
    from oasis.functions import ar1_to_tau, deconvolve, estimate_time_constant

    y = fill_nan(y)
    sn = robust_noise_sd(y)
    # estimate_time_constant draws from numpy's global generator when it has to
    # repair a root; seed it so the benchmark is reproducible.
    np.random.seed(seed)
    g = float(estimate_time_constant(y, p=1, sn=sn)[0])
    g = min(max(g, 0.05), 0.995)  # keep a valid, decaying AR(1) if the fit is degenerate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = deconvolve(
            y, tau_d=ar1_to_tau(g, frame_rate_hz), framerate=frame_rate_hz, sn=sn, b_nonneg=False, **variant
        )
    return smoothed_spike_targets(np.asarray(result[1], float), frame_rate_hz, smoothing_s)


def derivative_rates(y: np.ndarray, frame_rate_hz: float, smoothing_s: float) -> np.ndarray:
    """Rectified frame-to-frame increase of dF/F, smoothed like the targets."""
    y = fill_nan(y)
    rise = np.maximum(np.diff(y, prepend=y[0]), 0.0)
    return smoothed_spike_targets(rise, frame_rate_hz, smoothing_s)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.std(a) == 0 or np.std(b) == 0:
        return np.nan
    return float(np.corrcoef(a, b)[0, 1])


# --------------------------------------------------------------------------
# Model sets
# --------------------------------------------------------------------------


class ModelSet:
    """One model folder, or one folder per fold (a pattern with ``{k}``)."""

    def __init__(self, name: str, pattern: str, usp, members: int | None = None):
        self.name, self.pattern, self.members = name, pattern, members
        self._usp = usp
        self._models: dict = {}

    def folder(self, fold: int) -> str:
        return self.pattern.format(k=fold)

    def model(self, fold: int):
        folder = self.folder(fold)
        if folder not in self._models:
            import yaml

            model = self._usp.read_model_folder(folder)
            if self.members:
                ens = {lv: e[: self.members] for lv, e in model.ensembles.items()}
                model = dataclasses.replace(model, ensembles=ens, ensemble_size=self.members)
            with open(os.path.join(folder, "config.yaml")) as fh:
                trained = (yaml.safe_load(fh) or {}).get("training_datasets") or []
            self._models[folder] = (model, {dataset_group(d) for d in trained})
        return self._models[folder]

    def holds_out(self, dataset: str) -> bool:
        return dataset_group(dataset) not in self.model(fold_of(dataset))[1]


def parse_model_sets(specs, usp, members) -> list:
    sets = []
    for spec in specs:
        name, _, pattern = spec.partition("=")
        if not pattern:
            name, pattern = os.path.basename(os.path.normpath(spec)), spec
        sets.append(ModelSet(name, pattern, usp))
    # Fewer ensemble members of the first (main) model set: accuracy vs inference cost.
    for n in members or []:
        sets.append(ModelSet(f"{sets[0].name} ({n} member{'s' if n > 1 else ''})", sets[0].pattern, usp, n))
    return sets


# --------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------


def recording_seed(seed: int, rec, level: float) -> list:
    """Noise seed from the recording's identity (stable when other recordings change)."""
    key = zlib.crc32(f"{rec.dataset}/{rec.file}/{rec.index}".encode())
    return [seed, key, int(round(level * 1000))]


def run(args) -> dict:
    import unified_spike_processing_coo as usp

    if args.threads:
        usp.configure_tensorflow_threads(args.threads)
    sets = parse_model_sets(args.model_set or [DEFAULT_MODEL], usp, args.members)
    first_model = sets[0].model(args.folds[0] if args.folds else 0)[0]
    frame_rate_hz = float(first_model.sampling_rate_hz)
    smoothing_s = float(first_model.smoothing_s)
    window = int(first_model.window_size)

    load_skipped: list = []
    recordings = load_ground_truth(args.ground_truth_dir, args.datasets, load_skipped)
    if not recordings:
        sys.exit(f"no CAttached*.mat recordings under {args.ground_truth_dir}")
    # left_out[reason][dataset] -> count of recordings not scored at all
    left_out = defaultdict(lambda: defaultdict(int))
    for s in load_skipped:
        left_out[s.reason if "differ" not in s.reason else "fluo_time and fluo_mean differ in length"][s.dataset] += 1
    scored_recs = []
    for rec in recordings:
        if args.folds is not None and fold_of(rec.dataset) not in args.folds:
            continue
        why = usable_at_rate(rec, frame_rate_hz, 2 * window)
        if why is not None:
            reason = why.split(",")[0] if "below" in why else f"shorter than {2 * window} frames"
            left_out[reason][rec.dataset] += 1
            continue
        seen = [s.name for s in sets if not s.holds_out(rec.dataset)]
        if seen:
            left_out["in the training data of " + ", ".join(seen)][rec.dataset] += 1
            continue
        dff, counts = resample_recording(rec, frame_rate_hz)
        if counts.sum() == 0:
            left_out["no spikes"][rec.dataset] += 1
            continue
        scored_recs.append((rec, dff, counts))

    # scores[level][dataset][method] -> list of per-recording correlations
    scores = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    too_noisy = defaultdict(int)
    inference_s = defaultdict(float)
    for level in args.noise_levels:
        noisy = []
        for rec, dff, counts in scored_recs:
            y = add_noise_to_level(
                dff, frame_rate_hz, level, np.random.default_rng(recording_seed(args.seed, rec, level))
            )
            if y is None:
                too_noisy[level] += 1
                continue
            noisy.append((rec, y, counts))
        if not noisy:
            continue
        # rates[set name][row]: each recording with its fold's model; one call per model,
        # padded to a common length with NaN (padded frames get NaN rates).
        rates = {}
        for s in sets:
            out = [None] * len(noisy)
            by_fold = defaultdict(list)
            for row, (rec, _, _) in enumerate(noisy):
                by_fold[fold_of(rec.dataset)].append(row)
            for fold, rows in by_fold.items():
                n_max = max(noisy[r][1].size for r in rows)
                batch = np.full((len(rows), n_max), np.nan)
                for j, r in enumerate(rows):
                    batch[j, : noisy[r][1].size] = noisy[r][1]
                t0 = time.perf_counter()
                pred = usp.predict_spike_rates(batch, s.model(fold)[0], threshold=0)
                inference_s[s.name] += time.perf_counter() - t0
                for j, r in enumerate(rows):
                    out[r] = pred[j, : noisy[r][1].size]
            rates[s.name] = out

        for row, (rec, y, counts) in enumerate(noisy):
            truth = smoothed_spike_targets(counts, frame_rate_hz, smoothing_s)
            valid = np.isfinite(truth)
            for s in sets:
                valid &= np.isfinite(rates[s.name][row])
            if valid.sum() < 10:
                too_noisy[level] += 1
                continue
            per_method = {s.name: rates[s.name][row] for s in sets}
            seed = recording_seed(args.seed, rec, level)[1] % (2**31)
            for name, variant in OASIS_VARIANTS.items():
                per_method["OASIS " + name] = oasis_rates(y, frame_rate_hz, smoothing_s, variant, seed=seed)
            per_method["dF/F derivative"] = derivative_rates(y, frame_rate_hz, smoothing_s)
            scopes = [rec.dataset, "all", "excitatory" if is_excitatory(rec.dataset) else "inhibitory"]
            for name, pred in per_method.items():
                r = pearson(pred[valid], truth[valid])
                for scope in scopes:
                    scores[level][scope][name].append(r)
    return {
        "scores": scores,
        "left_out": left_out,
        "too_noisy": too_noisy,
        "n_scored": len(scored_recs),
        "frame_rate_hz": frame_rate_hz,
        "smoothing_s": smoothing_s,
        "sets": sets,
        "inference_s": inference_s,
        "n_recordings": len(recordings) + len(load_skipped),
    }


def median(values) -> float:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else np.nan


SCOPES = {"all": "all held-out", "excitatory": "excitatory", "inhibitory": "inhibitory"}


def format_tables(result: dict, noise_levels) -> str:
    scores = result["scores"]
    names = [s.name for s in result["sets"]]
    main = names[0]
    oasis_names = ["OASIS " + n for n in OASIS_VARIANTS]
    lines = [
        "Median Pearson correlation with the true spike rate (per recording, then median), held out "
        "by dataset: every recording is scored by a model that never saw its dataset.",
        f"Frame rate {result['frame_rate_hz']:g} Hz, smoothing {result['smoothing_s']:g} s; "
        "n = recordings at that noise level (noisier ones left out).",
        "",
        "| recordings | noise level | n | "
        + " | ".join(names)
        + " | OASIS (best variant) | dF/F derivative | CASCADE - OASIS |",
        "|---|---|---|" + "---|" * (len(names) + 3),
    ]
    best_variant = {}
    for level in noise_levels:
        if level not in scores:
            continue
        best_variant[level] = max(oasis_names, key=lambda n: median(scores[level]["all"][n]))
        for scope, label in SCOPES.items():
            s = scores[level][scope]
            if not s:
                continue
            oasis = median(s[best_variant[level]])
            lines.append(
                f"| {label} | {level:g} | {len(s[main])} | "
                + " | ".join(f"{median(s[n]):.3f}" for n in names)
                + f" | {oasis:.3f} | {median(s['dF/F derivative']):.3f} | {median(s[main]) - oasis:+.3f} |"
            )
        # Every dataset weighted equally: median over datasets of the per-dataset medians.
        per_ds = [scores[level][d] for d in scores[level] if d not in SCOPES]
        by_method = {m: median([median(s[m]) for s in per_ds]) for m in names + [best_variant[level]]}
        by_method["dF/F derivative"] = median([median(s["dF/F derivative"]) for s in per_ds])
        lines.append(
            f"| median of {len(per_ds)} dataset medians | {level:g} | {len(per_ds)} datasets | "
            + " | ".join(f"{by_method[n]:.3f}" for n in names)
            + f" | {by_method[best_variant[level]]:.3f} | {by_method['dF/F derivative']:.3f} | "
            f"{by_method[main] - by_method[best_variant[level]]:+.3f} |"
        )
    lines += [
        "",
        "OASIS variant chosen per noise level (best median over all held-out recordings): "
        + ", ".join(f"{lv:g}: {v[6:]}" for lv, v in best_variant.items()),
        "",
        "Per dataset:",
        "",
        "| dataset | noise level | n | " + " | ".join(names) + " | OASIS (best variant) | dF/F derivative |",
        "|---|---|---|" + "---|" * (len(names) + 2),
    ]
    for level in best_variant:
        for dataset in sorted(d for d in scores[level] if d not in SCOPES):
            s = scores[level][dataset]
            lines.append(
                f"| {dataset} | {level:g} | {len(s[main])} | "
                + " | ".join(f"{median(s[n]):.3f}" for n in names)
                + f" | {median(s[best_variant[level]]):.3f} | {median(s['dF/F derivative']):.3f} |"
            )
    lines += [
        "",
        "All OASIS variants, median over all held-out recordings:",
        "",
        "| noise level | " + " | ".join(oasis_names) + " |",
        "|---|" + "---|" * len(oasis_names),
    ]
    for level in best_variant:
        lines.append(
            f"| {level:g} | " + " | ".join(f"{median(scores[level]['all'][n]):.3f}" for n in oasis_names) + " |"
        )
    lines += ["", "Model inference time in this benchmark (1 TensorFlow thread unless --threads):", ""]
    lines += [f"- {n}: {result['inference_s'][n]:.1f} s" for n in names]
    lines += [
        "",
        f"Recordings: {result['n_recordings']} struct elements read, {result['n_scored']} scored. "
        "Left out at every noise level:",
        "",
        "| reason | recordings (by dataset) |",
        "|---|---|",
    ]
    for reason, by_ds in sorted(result["left_out"].items()):
        detail = ", ".join(
            f"{d.split('-')[0] if not d.startswith('X-') else '-'.join(d.split('-')[:2])}: {n}"
            for d, n in sorted(by_ds.items())
        )
        lines.append(f"| {reason} | {sum(by_ds.values())} ({detail}) |")
    lines += [
        "",
        "Left out per noise level because already noisier than the level: "
        + ", ".join(f"{lv:g}: {result['too_noisy'][lv]}" for lv in noise_levels),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Fold training
# --------------------------------------------------------------------------


def fold_commands(variant: str, fold_dir: str, train_args: str, ground_truth_dir: str, folds=None) -> list:
    """Training commands (argument lists) of the fold models of one variant."""
    commands = []
    for k, prefixes in enumerate(FOLDS):
        if folds is not None and k not in folds:
            continue
        present = sorted(d for d in os.listdir(ground_truth_dir) if d.startswith(tuple(prefixes)))
        commands.append(
            [sys.executable, os.path.join("tools", "train_cascade_model.py")]
            + ["--out", os.path.join(fold_dir, variant, f"fold{k}")]
            + ["--ground_truth_dir", ground_truth_dir, "--exclude_datasets", *present]
            + shlex.split(train_args)
            + VARIANTS[variant]
        )
    return commands


def train_folds(args) -> int:
    for variant in args.train_folds:
        for command in fold_commands(variant, args.fold_dir, args.train_args, args.ground_truth_dir, args.folds):
            print("+ " + shlex.join(command), flush=True)
            rc = subprocess.call(command, cwd=REPO_ROOT)
            if rc:
                return rc
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model_set",
        action="append",
        default=None,
        help="NAME=FOLDER or NAME=PATTERN with {k} (one folder per fold); repeat to compare; the "
        "first is the main one (default: the builtin 2 Hz model)",
    )
    p.add_argument("--members", type=int, nargs="*", default=None, help="also score the main set with only N members")
    p.add_argument(
        "--ground_truth_dir",
        default=None,
        help="folder of DSxx-*/CAttached*.mat (default: $SPIKE_SHARED_DIR/cascade/Ground_truth "
        "or ../shared/cascade/Ground_truth)",
    )
    p.add_argument("--datasets", nargs="*", default=None, help="only these DSxx folder names")
    p.add_argument("--folds", type=int, nargs="*", default=None, help="only the datasets of these folds")
    p.add_argument("--noise_levels", type=float, nargs="+", default=[2, 4, 6, 8])
    p.add_argument("--seed", type=int, default=0, help="seed of the added noise")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow threads")
    p.add_argument("--markdown", default=None, help="also write the table and the command to this file")
    p.add_argument(
        "--train_folds", nargs="*", default=None, choices=sorted(VARIANTS), help="train these variants' folds"
    )
    p.add_argument("--fold_dir", default="heldout_models", help="where --train_folds puts the fold models")
    p.add_argument("--train_args", default="", help="arguments for tools/train_cascade_model.py (--train_folds)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.ground_truth_dir = args.ground_truth_dir or default_ground_truth_dir()
    if not os.path.isdir(args.ground_truth_dir):
        sys.exit(
            f"ground truth not found at {args.ground_truth_dir}: pass --ground_truth_dir or set "
            "SPIKE_SHARED_DIR to the folder holding cascade/Ground_truth"
        )
    if args.train_folds:
        return train_folds(args)
    t0 = time.time()
    result = run(args)
    table = format_tables(result, args.noise_levels)
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(os.path.abspath(__file__), REPO_ROOT)] + argv
    )
    print(table)
    print(f"\n{result['n_recordings']} recordings, {time.time() - t0:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("# Held-out accuracy on CASCADE ground truth\n\n")
            fh.write(f"Command (from the repository root):\n\n    {command}\n\n")
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
