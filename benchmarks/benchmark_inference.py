#!/usr/bin/env python
"""Speed, memory and agreement of the fast CASCADE engine against neuralib's CASCADE.

On one model and one set of seeded synthetic dF/F traces (default 2,000 neurons x
3,000 frames at the model's rate, noise levels spread over the model's range), in
ONE invocation this runs, each in its own fresh subprocess (so that peak memory is
measured per method and TensorFlow is configured identically):

(a) the fast engine ``predict_spike_rates(dff, load_cascade_model(model))`` for
    each ``--chunk_sizes`` value of ``max_chunk_frames``,
(b) ``infer_discrete_spikes`` on the fast engine's output (first chunk size),
(c) the reference, neuralib's ``cascade_predict`` (PyPI package ``neura-library``;
    needs ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported, ``tf-keras``,
    ``numba`` and ``ruamel.yaml``), pointed at a private cache folder that holds a
    link to ``--model`` and a copy of ``available_models.yaml``, so it never
    touches the network.

and prints neuron-frames per second of each, their ratio, peak resident memory of
each (absolute, and the increase over the same process after its imports and the
input load), the max |difference| between the two outputs over the entries finite in
both, and whether their NaN layouts agree. Times are end to end and cold: model
loading (and, for the fast engine, tracing the ``tf.function``) included. Both
methods get the same TensorFlow thread counts (``--intra_threads``,
``--inter_threads``), set before any TensorFlow op runs.

Usage::

    python benchmarks/benchmark_inference.py [--neurons 2000] [--frames 3000]
        [--model DIR] [--threshold 0] [--chunk_sizes 131072 524288 2097152]
        [--intra_threads N] [--inter_threads N] [--skip_reference] [--seed 0]

``--model`` defaults to ``$SPIKE_SHARED_DIR/cascade/Pretrained_models/
OGB_zf_pDp_7.5Hz_smoothing200ms``, else ``../shared/...`` beside the repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MODEL_NAME = "OGB_zf_pDp_7.5Hz_smoothing200ms"


def default_model_dir() -> Path:
    shared = Path(os.environ.get("SPIKE_SHARED_DIR") or REPO_ROOT.parent / "shared")
    return shared / "cascade" / "Pretrained_models" / MODEL_NAME


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_threshold(text: str):
    if text.lower() in ("false", "none", "raw"):
        return False
    return int(text)


# ------------------------------------------------------------------------------------------------
# Workers: one method per fresh process
# ------------------------------------------------------------------------------------------------


def configure_threads(intra: int, inter: int) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    return {
        "tf_version": tf.__version__,
        "intra_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def prepare_reference_cache(model_dir: Path, cache_dir: Path) -> str:
    """A neuralib cache folder <cache>/<name> -> model_dir plus available_models.yaml: no downloads."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = model_dir.name
    link = cache_dir / name
    if not link.exists():
        link.symlink_to(model_dir.resolve(), target_is_directory=True)
    index = model_dir.parent / "available_models.yaml"
    target = cache_dir / "available_models.yaml"
    if index.is_file():
        shutil.copyfile(index, target)
    else:  # neuralib only needs the model's name listed (it warns that the list looks outdated)
        target.write_text(f"{name}:\n  Link: none\n")
    return name


def worker(args) -> None:
    result = {"method": args.method, "rss_start_mb": peak_rss_mb()}
    threshold = parse_threshold(args.threshold)
    if args.method == "reference":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow's first import
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result.update(configure_threads(args.intra_threads, args.inter_threads))
    if args.method == "reference":
        from neuralib.imaging.spikes.cascade import cascade_predict
    else:
        import unified_spike_processing_coo as usp
    dff = np.load(args.data)
    result["rss_baseline_mb"] = peak_rss_mb()  # after imports and the input load

    result["load_before"] = os.getloadavg()[0]
    cpu_start = cpu_seconds()
    if args.method == "fast":
        start = time.perf_counter()
        model = usp.load_cascade_model(args.model)
        loaded = time.perf_counter()
        rates, report = usp.predict_spike_rates(
            dff, model, threshold=threshold, padding=np.nan, return_noise=True, max_chunk_frames=args.max_chunk_frames
        )
        result["load_s"] = loaded - start
        result["seconds"] = time.perf_counter() - start
        result["max_chunk_frames"] = args.max_chunk_frames
        levels, counts = np.unique(report["model_noise_level"], return_counts=True)
        result["model_noise_levels"] = {int(k): int(v) for k, v in zip(levels, counts)}
        np.save(args.output, rates)
    elif args.method == "discrete":
        model = usp.load_cascade_model(args.model)
        rates = np.load(args.output)  # the fast engine's rates, written by the first fast run
        result["rss_baseline_mb"] = peak_rss_mb()
        cpu_start = cpu_seconds()
        start = time.perf_counter()
        counts = usp.infer_discrete_spikes(rates, model)
        result["seconds"] = time.perf_counter() - start
        result["total_spikes"] = int(counts.sum())
        result["rate_sum"] = float(np.nansum(rates))
    elif args.method == "reference":
        model_dir = Path(args.model)
        cache = Path(args.cache_dir)
        name = prepare_reference_cache(model_dir, cache)
        start = time.perf_counter()
        rates = cascade_predict(dff, name, threshold=threshold, padding=np.nan, verbose=False, cache_dir=cache)
        result["seconds"] = time.perf_counter() - start
        np.save(args.output, rates)
    else:
        raise SystemExit(f"unknown method {args.method!r}")
    result["cpu_s"] = cpu_seconds() - cpu_start
    result["load_after"] = os.getloadavg()[0]
    result["rss_peak_mb"] = peak_rss_mb()
    result["rss_increase_mb"] = result["rss_peak_mb"] - result["rss_baseline_mb"]
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def make_traces(args, sampling_rate_hz: float) -> tuple:
    from tools.synthetic_calcium import cascade_noise_level, simulate_dataset

    rng = np.random.default_rng(args.seed)
    levels = rng.uniform(args.noise_min, args.noise_max, args.neurons)
    data = simulate_dataset(
        args.neurons,
        args.frames,
        sampling_rate_hz,
        levels,
        smoothing_s=0.2,
        rng=rng,
        dff_kwargs={"noise_mode": "total"},
    )
    dff = data["dff"].astype(np.float64)  # as from a .mat file; both methods get the same array
    return dff, cascade_noise_level(dff, sampling_rate_hz)


def run_worker(args, method: str, workdir: Path, data: Path, output: Path, extra=()) -> dict:
    result_path = workdir / f"result_{method}_{len(list(workdir.glob('result_*')))}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--method",
        method,
        "--data",
        str(data),
        "--output",
        str(output),
        "--result",
        str(result_path),
        "--model",
        str(args.model),
        "--threshold",
        args.threshold,
        "--intra_threads",
        str(args.intra_threads),
        "--inter_threads",
        str(args.inter_threads),
        "--cache_dir",
        str(workdir / "neuralib_cache"),
        *extra,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)  # the reference worker sets it itself
    wall = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
        raise RuntimeError(f"{method} worker failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = wall
    return result


def compare(fast: np.ndarray, reference: np.ndarray) -> dict:
    both = np.isfinite(fast) & np.isfinite(reference)
    diff = np.abs(fast[both] - reference[both])
    return {
        "nan_layout_equal": bool(np.array_equal(np.isnan(fast), np.isnan(reference))),
        "finite_in_both": int(both.sum()),
        "max_abs_diff": float(diff.max()) if diff.size else float("nan"),
        "mean_abs_diff": float(diff.mean()) if diff.size else float("nan"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--neurons", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--noise_min", type=float, default=2.0, help="lowest target noise level")
    parser.add_argument("--noise_max", type=float, default=7.0, help="highest target noise level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(default_model_dir()), help="CASCADE model folder")
    parser.add_argument("--threshold", default="0", help="0, 1 or False (both methods)")
    parser.add_argument(
        "--chunk_sizes",
        type=int,
        nargs="+",
        default=[1 << 17, 1 << 19, 1 << 21],
        help="max_chunk_frames values for the fast engine; the first is compared "
        "with the reference and used for the discrete spikes",
    )
    parser.add_argument(
        "--intra_threads",
        type=int,
        default=os.cpu_count(),
        help="TensorFlow intra-op threads, both methods (default: CPU count)",
    )
    parser.add_argument(
        "--inter_threads",
        type=int,
        default=os.cpu_count(),
        help="TensorFlow inter-op threads, both methods (default: CPU count)",
    )
    parser.add_argument("--skip_reference", action="store_true", help="do not run neuralib")
    parser.add_argument("--markdown", help="also append the printed report to this file")
    # worker-only options
    parser.add_argument("--method", choices=["fast", "discrete", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    parser.add_argument("--max_chunk_frames", type=int, default=1 << 19, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        worker(args)
        return 0

    model_dir = Path(args.model)
    if not (model_dir / "config.yaml").is_file():
        parser.error(f"no CASCADE model at {model_dir} (set --model or SPIKE_SHARED_DIR)")
    import yaml

    sampling_rate_hz = float(yaml.safe_load((model_dir / "config.yaml").read_text())["sampling_rate"])

    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    say(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    say(f"command: {shlex.join([sys.executable, *sys.argv])}")
    say(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores visible; load average at start: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    say(
        f"python {platform.python_version()}, tensorflow {package_version('tensorflow')}, "
        f"tf-keras {package_version('tf-keras')}, neura-library {package_version('neura-library')}, "
        f"numpy {np.__version__}"
    )
    say(f"model: {model_dir} ({sampling_rate_hz} Hz), threshold {args.threshold}, padding NaN")

    start = time.perf_counter()
    dff, noise = make_traces(args, sampling_rate_hz)
    neuron_frames = dff.size
    say(
        f"traces: {args.neurons} neurons x {args.frames} frames = {neuron_frames:,} neuron-frames of "
        f"synthetic dF/F (tools/synthetic_calcium.py, seed {args.seed}, noise_mode='total', target "
        f"levels uniform in [{args.noise_min}, {args.noise_max}]; measured levels 5/50/95 %: "
        f"{' / '.join(f'{x:.2f}' for x in np.nanpercentile(noise, [5, 50, 95]))}), float64; "
        f"made in {time.perf_counter() - start:.1f} s"
    )

    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        workdir = Path(tmp)
        data = workdir / "dff.npy"
        np.save(data, dff)
        del dff
        fast_runs = []
        for chunk in args.chunk_sizes:
            output = workdir / f"fast_{chunk}.npy"
            fast_runs.append(run_worker(args, "fast", workdir, data, output, ["--max_chunk_frames", str(chunk)]))
            fast_runs[-1]["output"] = output
        first = fast_runs[0]
        say(
            f"TensorFlow threads (both methods): intra-op {first['intra_threads']}, "
            f"inter-op {first['inter_threads']} (TF {first['tf_version']})"
        )
        say(f"model noise levels assigned (level: neurons): {first['model_noise_levels']}")
        say()
        say("(a) fast engine, predict_spike_rates (cold: model load + tf.function tracing included)")
        say("  max_chunk_frames | wall s | neuron-frames/s | CPU s | peak RSS MB | increase MB | load 1-min")
        for run in fast_runs:
            say(
                f"  {run['max_chunk_frames']:>16,} | {run['seconds']:6.2f} | "
                f"{neuron_frames / run['seconds']:15,.0f} | {run['cpu_s']:5.1f} | {run['rss_peak_mb']:11.0f} | "
                f"{run['rss_increase_mb']:11.0f} | {run['load_before']:.1f} -> {run['load_after']:.1f}"
            )
        best = min(fast_runs, key=lambda run: run["seconds"])
        say(
            f"  fastest: max_chunk_frames = {best['max_chunk_frames']:,} "
            f"(model load {best['load_s']:.2f} s of its {best['seconds']:.2f} s); "
            f"import+input baseline RSS {first['rss_baseline_mb']:.0f} MB"
        )
        reference_rates = None
        base = np.load(first["output"])
        for run in fast_runs[1:]:
            other = compare(np.load(run["output"]), base)
            say(
                f"  max_chunk_frames {run['max_chunk_frames']:,} vs {first['max_chunk_frames']:,}: "
                f"max |diff| {other['max_abs_diff']:.3g}, NaN layout equal {other['nan_layout_equal']}"
            )
        del base

        discrete = run_worker(args, "discrete", workdir, data, first["output"])
        say()
        say(
            f"(b) infer_discrete_spikes on the fast output: {discrete['seconds']:.2f} s "
            f"(CPU {discrete['cpu_s']:.2f} s; {neuron_frames / discrete['seconds']:,.0f} neuron-frames/s), peak RSS "
            f"{discrete['rss_peak_mb']:.0f} MB (+{discrete['rss_increase_mb']:.0f} MB over rates loaded), "
            f"{discrete['total_spikes']:,} spikes for a rate sum of {discrete['rate_sum']:,.0f}"
        )

        say()
        if args.skip_reference:
            say("(c) reference skipped (--skip_reference)")
        else:
            output = workdir / "reference.npy"
            try:
                reference = run_worker(args, "reference", workdir, data, output)
            except RuntimeError as exc:
                say(f"(c) reference FAILED: {exc}")
                reference = None
            if reference is not None:
                if (reference["intra_threads"], reference["inter_threads"]) != (
                    first["intra_threads"],
                    first["inter_threads"],
                ):
                    say("  WARNING: thread counts differ between methods")
                say(
                    f"(c) reference, neuralib cascade_predict (model load included): "
                    f"{reference['seconds']:.2f} s wall, {neuron_frames / reference['seconds']:,.0f} neuron-frames/s, "
                    f"CPU {reference['cpu_s']:.1f} s, load 1-min {reference['load_before']:.1f} -> "
                    f"{reference['load_after']:.1f}, "
                    f"peak RSS {reference['rss_peak_mb']:.0f} MB (+{reference['rss_increase_mb']:.0f} MB "
                    f"over its import+input baseline {reference['rss_baseline_mb']:.0f} MB); "
                    f"TF threads intra {reference['intra_threads']}, inter {reference['inter_threads']}"
                )
                reference_rates = np.load(output)
                say()
                say("fast vs reference")
                for run in fast_runs:
                    say(
                        f"  speed ratio (reference s / fast s) at max_chunk_frames "
                        f"{run['max_chunk_frames']:,}: {reference['seconds'] / run['seconds']:.1f}x wall, "
                        f"{reference['cpu_s'] / run['cpu_s']:.1f}x CPU time"
                    )
                say(
                    f"  peak RSS increase: fast {first['rss_increase_mb']:.0f} MB "
                    f"(max_chunk_frames {first['max_chunk_frames']:,}) vs reference "
                    f"{reference['rss_increase_mb']:.0f} MB"
                )
                for run in fast_runs:
                    agreement = compare(np.load(run["output"]), reference_rates)
                    say(
                        f"  max_chunk_frames {run['max_chunk_frames']:,}: max |difference| "
                        f"{agreement['max_abs_diff']:.3g} (mean {agreement['mean_abs_diff']:.3g}) over "
                        f"{agreement['finite_in_both']:,} entries finite in both; NaN layouts agree: "
                        f"{agreement['nan_layout_equal']}"
                    )
                agreement = compare(np.load(first["output"]), reference_rates)
                ratio = reference["seconds"] / best["seconds"]
                ok = ratio >= 20 and agreement["max_abs_diff"] <= 1e-4 and agreement["nan_layout_equal"]
                say(
                    f"  goal (ratio >= 20x at the fastest setting, max |difference| <= 1e-4, same NaNs): "
                    f"{'MET' if ok else 'NOT MET'} ({ratio:.1f}x, {agreement['max_abs_diff']:.3g})"
                )
    say(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write("```\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
