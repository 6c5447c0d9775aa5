#!/usr/bin/env python
"""The engine against the machine's limit: multiply-adds per second as a fraction of numpy's float32 matmul.

For the builtin 2 Hz model (2 members) and the official OGB 7.5 Hz model (5 members), on seeded random
traces (default 400 x 2,000), this measures in ONE process, repeats interleaved between methods:

- the host: CPU model, its vector extensions (/proc/cpuinfo flags), the BLAS numpy uses and the kernel
  it picked (OpenBLAS core name), oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``), load average before/after;
- the ceiling: numpy float32 matrix products of the engine's shapes (conv 2 as im2col, polyphase and
  plain; a square one for reference), best of repeats, with the same thread count as the engines;
- the work: multiply-adds per neuron-frame per ensemble member, counted from the model's layer shapes
  (conv 1 K1*F1, conv 2 K2*F1*F2, conv 3 K3*F2*F3, per-position dense F3*D, output positions*D): what
  CASCADE's network needs per predicted frame when each layer is computed once per frame;
- each engine: neuron-frames/s (best and median wall), CPU seconds, and the ceiling fraction
  (multiply-adds/s over the conv-2-shaped matmul rate). Engines:
    ``tensorflow`` the script's ConvolutionalCascade (TensorFlow/oneDNN direct convolutions);
    ``numpy``      the script's MatmulCascade: convolution as matrix products through numpy's BLAS (polyphase
                   conv 1 and conv 2, im2col conv 3, fixed blocks per row so that every row's arithmetic is
                   independent of its chunk; threads over block groups, BLAS single-threaded);
    ``onnxruntime`` (only when named in ``--engines``) a candidate runtime made for small CNNs: the
                   same graph in ONNX, run by onnxruntime's CPU provider; measured here, not used by the script;
- exactness: ``numpy`` against ``tensorflow`` (max |diff|), and ``numpy`` bit for bit across chunkings.

``--isa avx2`` runs the same in a child process with ``ONEDNN_MAX_CPU_ISA=AVX2`` and
``OPENBLAS_CORETYPE=Haswell`` (an AVX2 host's kernels on this CPU); ``--isa both`` runs both children.

Usage::

    python benchmarks/benchmark_engine.py [--isa native|avx2|both] [--neurons 400] [--frames 2000]
        [--threads 2] [--repeats 5] [--engines tensorflow numpy] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")
VECTOR_FLAGS += ("amx_tile", "amx_bf16")


def shared_dir() -> Path:
    return Path(os.environ.get("SPIKE_SHARED_DIR") or REPO_ROOT.parent / "shared")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------------
# The host
# ------------------------------------------------------------------------------------------------


def cpu_info() -> tuple:
    """(model name, vector extensions present) from /proc/cpuinfo."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, [flag for flag in VECTOR_FLAGS if flag in flags]


def openblas():
    """numpy's OpenBLAS as a ctypes library (symbol prefix), or (None, '') for another BLAS."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None, ""
    for path in sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}):
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                if hasattr(lib, f"{prefix}set_num_threads{suffix}"):
                    return lib, (prefix, suffix)
    return None, ""


def blas_corename() -> str:
    lib, names = openblas()
    if lib is None:
        return "not OpenBLAS"
    prefix, suffix = names
    get = getattr(lib, f"{prefix}get_corename{suffix}")
    get.restype = ctypes.c_char_p
    return f"OpenBLAS core {get().decode()}"


def set_blas_threads(count: int) -> int:
    """Set OpenBLAS's thread count; returns the previous one (0 where not OpenBLAS)."""
    lib, names = openblas()
    if lib is None:
        return 0
    prefix, suffix = names
    previous = getattr(lib, f"{prefix}get_num_threads{suffix}")()
    getattr(lib, f"{prefix}set_num_threads{suffix}")(int(count))
    return previous


# ------------------------------------------------------------------------------------------------
# The work and the ceiling
# ------------------------------------------------------------------------------------------------


def macs_per_frame(model) -> dict:
    """Multiply-adds per predicted frame per member, per layer, from the weights' shapes."""
    w = model.ensembles[model.noise_levels[0]][0]
    k1, c1, f1 = w.conv1_kernel.shape
    k2, _, f2 = w.conv2_kernel.shape
    k3, _, f3 = w.conv3_kernel.shape
    dense = w.dense_kernel.shape[1]
    positions = w.output_kernel.shape[0] // dense
    return {
        "conv 1": k1 * c1 * f1,
        "conv 2": k2 * f1 * f2,
        "conv 3": k3 * f2 * f3,
        "dense": f3 * dense,
        "output": positions * dense,
    }


def matmul_rate(shape: tuple, repeats: int) -> float:
    """Best multiply-adds/s of a float32 (m, k) @ (k, n) numpy matmul."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    a, b = rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32)
    a @ b
    best = float("inf")
    inner = max(1, int(2e9 // (m * k * n)))  # ~0.05 s per timing on a fast core
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        best = min(best, (time.perf_counter() - start) / inner)
    return m * k * n / best


# ------------------------------------------------------------------------------------------------
# A candidate runtime measured here only: onnxruntime (pip install onnx onnxruntime)
# ------------------------------------------------------------------------------------------------


class OnnxRuntimeCascade:
    """CASCADE's network as one ONNX graph per ensemble (whole traces, poolings as dilations, as the script's
    ConvolutionalCascade) run by onnxruntime's CPU provider (MLAS kernels); same call as the script's engines."""

    def __init__(self, threads: int):
        import onnxruntime

        self.ort, self.threads, self.sessions = onnxruntime, threads, {}

    def _session(self, members: tuple, dense_expansion: int):
        from onnx import TensorProto, helper, numpy_helper

        nodes, weights, outputs = [], [], []

        def conv(name, source, kernel, bias, dilation=1, relu=True):  # Keras (K, C, F) -> ONNX (F, C, 1, K)
            weights.append(
                numpy_helper.from_array(np.ascontiguousarray(kernel.transpose(2, 1, 0)[:, :, None]), name + "w")
            )
            weights.append(numpy_helper.from_array(np.ascontiguousarray(bias, np.float32), name + "b"))
            nodes.append(helper.make_node("Conv", [source, name + "w", name + "b"], [name], dilations=[1, dilation]))
            if relu:
                nodes.append(helper.make_node("Relu", [name], [name + "r"]))
            return name + "r" if relu else name

        for index, w in enumerate(members):
            m = f"m{index}"
            h = conv(m + "c2", conv(m + "c1", "x", w.conv1_kernel, w.conv1_bias), w.conv2_kernel, w.conv2_bias)
            nodes.append(helper.make_node("MaxPool", [h], [m + "p1"], kernel_shape=[1, 2], strides=[1, 1]))
            h = conv(m + "c3", m + "p1", w.conv3_kernel, w.conv3_bias, dilation=2)
            nodes.append(helper.make_node("MaxPool", [h], [m + "p2"], kernel_shape=[1, 2], dilations=[1, 2]))
            h = conv(m + "d", m + "p2", w.dense_kernel[None], w.dense_bias)
            kernel = w.output_kernel.reshape(-1, dense_expansion, 1)
            outputs.append(helper.make_tensor_value_info(conv(m + "o", h, kernel, w.output_bias, 4, False), 1, None))
        graph = helper.make_graph(
            nodes,
            "cascade",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, 1, "T"])],
            outputs,
            weights,
        )
        options = self.ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return self.ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def __call__(self, traces: np.ndarray, members: tuple, dense_expansion: int) -> np.ndarray:
        if id(members) not in self.sessions:
            self.sessions[id(members)] = (members, self._session(members, dense_expansion))
        outputs = self.sessions[id(members)][1].run(None, {"x": np.ascontiguousarray(traces[:, None, None, :])})
        total = outputs[0][:, 0, 0].astype(np.float64)
        for output in outputs[1:]:
            total += output[:, 0, 0]
        return total


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def measure(args, say) -> None:
    import unified_spike_processing_coo as usp

    usp.configure_tensorflow_threads(args.threads)
    name, extensions = cpu_info()
    say(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    say(f"command: {' '.join([sys.executable, *sys.argv])}")
    say(f"CPU: {name}, {os.cpu_count()} cores visible; vector extensions: {' '.join(extensions)}")
    isa = {key: os.environ.get(key, "(unset)") for key in AVX2_ENV}
    say(f"ISA settings: {', '.join(f'{k}={v}' for k, v in isa.items())}; numpy BLAS: {blas_corename()}")
    say(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; threads: {args.threads}")
    set_blas_threads(args.threads)

    models = {
        "builtin 2 Hz": REPO_ROOT / "models" / "builtin_2Hz_smoothing500ms",
        "OGB 7.5 Hz": shared_dir() / "cascade" / "Pretrained_models" / "OGB_zf_pDp_7.5Hz_smoothing200ms",
    }
    models = {label: usp.read_model_folder(path) for label, path in models.items() if path.is_dir()}
    shapes = {
        "conv 2 im2col polyphase (8192, 600) @ (600, 80)": (8192, 600, 80),
        "conv 2 im2col (8192, 570) @ (570, 40)": (8192, 570, 40),
        "square (2048, 2048) @ (2048, 2048)": (2048, 2048, 2048),
    }
    rates = dict.fromkeys(shapes, 0.0)
    single = [0.0]

    def ceiling_round():
        """One more timing of each matmul (threads as the engines, and one thread): keep the best."""
        for label, shape in shapes.items():
            rates[label] = max(rates[label], matmul_rate(shape, 1))
        set_blas_threads(1)
        single[0] = max(single[0], matmul_rate(next(iter(shapes.values())), 1))
        set_blas_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    traces = (
        rng.normal(0, 0.05, (args.neurons, args.frames)) + (rng.random((args.neurons, args.frames)) < 0.01)
    ).astype(np.float32)
    engines = {name: usp.use_engine(name, args.threads) for name in usp.CASCADE_ENGINES}
    if "onnxruntime" in args.engines:
        try:
            engines["onnxruntime"] = OnnxRuntimeCascade(args.threads)
        except ImportError:
            say("onnxruntime: not installed (pip install onnx onnxruntime), skipped")
    engines = {key: engines[key] for key in args.engines if key in engines}
    for label, model in models.items():
        members = model.ensembles[model.noise_levels[len(model.noise_levels) // 2]]
        macs = macs_per_frame(model)
        per_frame = sum(macs.values())
        say(
            f"\n{label}: {model.name}, {len(members)} members; multiply-adds per neuron-frame per member: {per_frame:,}"
        )
        say("  (" + ", ".join(f"{k} {v:,}" for k, v in macs.items()) + ")")
        outputs = {}
        for key, engine in engines.items():  # warm-up: tracing, weight layouts
            outputs[key] = engine(traces[: min(8, len(traces))], members, model.dense_expansion)
        times = {key: [] for key in engines}
        for _ in range(args.repeats):
            ceiling_round()  # interleaved with the engines: the same load for both
            for key, engine in engines.items():
                cpu, wall = cpu_seconds(), time.perf_counter()
                outputs[key] = engine(traces, members, model.dense_expansion)
                times[key].append((time.perf_counter() - wall, cpu_seconds() - cpu))
        num_windows = args.frames - model.window_size + 1
        ceiling, per_cpu = next(iter(rates.values())), single[0]
        say(
            f"  ceiling so far (conv-2-shaped matmul, best of interleaved repeats): {ceiling / 1e9:.1f} G multiply-adds/s "
            f"with {args.threads} threads, {per_cpu / 1e9:.1f} G with 1 thread; at the ceiling "
            f"{ceiling / per_frame / len(members):,.0f} neuron-frames/s"
        )
        for key, runs in times.items():
            walls = sorted(w for w, _ in runs)
            best, median = walls[0], float(np.median(walls))
            cpu = float(np.median([c for _, c in runs]))
            rate = traces.size / best
            fraction = rate * per_frame * len(members) / ceiling
            cpu_fraction = traces.size * per_frame * len(members) / min(c for _, c in runs) / per_cpu
            say(
                f"  {key:10s} best {best:6.3f} s, median {median:6.3f} s, CPU {cpu:6.2f} s (median): "
                f"{rate:>10,.0f} neuron-frames/s (median {traces.size / median:,.0f}); ceiling fraction {fraction:.2f} "
                f"(wall), {cpu_fraction:.2f} per CPU second"
            )
        for other in ("numpy", "onnxruntime"):
            if "tensorflow" in outputs and other in outputs:
                diff = np.abs(outputs["tensorflow"][:, :num_windows] - outputs[other][:, :num_windows]).max()
                say(f"  {other} vs tensorflow: max |difference| of the ensemble mean {diff / len(members):.2e}")
        if "numpy" in outputs:
            engine, whole = engines["numpy"], outputs["numpy"][:, :num_windows]
            order = rng.permutation(min(64, len(traces)))
            checks = {
                "rows one at a time": np.concatenate(
                    [engine(traces[i : i + 1], members, model.dense_expansion) for i in range(5)]
                ),
                "chunks of 3 rows": np.concatenate(
                    [engine(traces[i : i + 3], members, model.dense_expansion) for i in range(0, 9, 3)]
                ),
                "a permutation": engine(traces[order], members, model.dense_expansion)[np.argsort(order)],
            }
            for what, result in checks.items():
                same = np.array_equal(result[:, :num_windows], whole[: len(result)])
                say(f"  numpy bit-identical across chunkings ({what}): {same}")
    say(f"\nfloat32 matmul, numpy, best of {len(models) * args.repeats} timings interleaved with the engines:")
    for label, rate in rates.items():
        say(f"  {label:52s} {rate / 1e9:7.1f} G multiply-adds/s ({2 * rate / 1e9:.0f} GFLOP/s), {args.threads} threads")
    say(f"  {'the first, 1 thread':52s} {single[0] / 1e9:7.1f} G multiply-adds/s")
    say(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=["native", "avx2", "both"], default="both")
    parser.add_argument("--neurons", type=int, default=400)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--engines", nargs="+", default=["tensorflow", "numpy"], choices=["tensorflow", "numpy", "onnxruntime"],
        help="onnxruntime: a candidate measured here only (needs pip install onnx onnxruntime)",
    )  # fmt: skip
    parser.add_argument("--markdown", help="also append the printed report to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    if args.child or (args.isa == "native" and not any(k in os.environ for k in AVX2_ENV)):
        measure(args, say)
    else:
        settings = {"native": {}, "avx2": AVX2_ENV}
        for label in ("native", "avx2") if args.isa == "both" else (args.isa,):
            env = {k: v for k, v in os.environ.items() if k not in AVX2_ENV} | settings[label]
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            say(f"=== {label} ({' '.join(f'{k}={v}' for k, v in settings[label].items()) or 'no ISA cap'}) ===")
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child"]
            child = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
            for line in child.stdout.splitlines():
                say(line)
            if child.returncode:
                say(f"child failed ({child.returncode}): {child.stderr[-2000:]}")
                return child.returncode
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write("```\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
