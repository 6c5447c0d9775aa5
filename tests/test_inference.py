"""CASCADE inference: the fast engine against CASCADE's own outputs and against Keras itself."""

import json
import os

import h5py
import numpy as np
import pytest
import scipy.io
from scipy.ndimage import gaussian_filter1d

import unified_spike_processing_coo as usp

REFERENCE = "Reference_outputs/cascade2p_reference_OGB_zf_pDp_7.5Hz_smoothing200ms_Calcium_traces_04.h5"
TRACES = "Example_datasets/Multiplane-OGB1-zf-pDp-Rupprecht-7.5Hz/Calcium_traces_04.mat"


@pytest.fixture(scope="module")
def reference(shared_cascade):
    with h5py.File(shared_cascade / REFERENCE, "r") as h5:
        ref = {key: h5[key][()] for key in h5}
    ref["dff"] = scipy.io.loadmat(shared_cascade / TRACES)["dF_traces"]
    return ref


@pytest.fixture(params=sorted(usp.CASCADE_ENGINES))
def engine(request):
    """Each test that takes it runs once per engine (--engine), restoring the process's engine after."""
    previous = usp.PROCESS_CACHE.pop("engine", None)
    usp.use_engine(request.param, 2)
    yield request.param
    usp.PROCESS_CACHE.pop("engine", None)
    if previous is not None:
        usp.PROCESS_CACHE["engine"] = previous


# --- model loading -----------------------------------------------------------------------------


def test_official_model_config_and_weights(official_model):
    m = official_model
    assert m.sampling_rate_hz == 7.5 and m.smoothing_s == 0.2
    assert m.noise_levels == (2, 3, 4, 5, 6, 7)
    assert m.window_size == 64 and m.before_frac == 0.5
    assert m.filter_sizes == (31, 19, 5) and m.filter_numbers == (30, 40, 50)
    assert m.dense_expansion == 30 and m.ensemble_size == 5
    w = m.ensembles[3][0]
    assert w.conv1_kernel.shape == (31, 1, 30) and w.conv2_kernel.shape == (19, 30, 40)
    assert w.conv3_kernel.shape == (5, 40, 50) and w.dense_kernel.shape == (50, 30)
    assert w.output_kernel.shape == (60, 1)
    # 31x30 + 19x30x40 + 5x40x50 + 50x30 + 60 per member (--inspect's time estimate counts them)
    assert m.multiply_adds_per_frame == 35_290 * 5


def test_missing_model_file_names_the_file(tmp_path, shared_cascade):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(shared_cascade / "Pretrained_models" / "OGB_zf_pDp_7.5Hz_smoothing200ms", folder)
    for path in folder.glob("Model_NoiseLevel_4_*.h5"):
        path.unlink()
    with pytest.raises(usp.PipelineError, match="Model_NoiseLevel_4"):
        usp.read_model_folder(folder)


def test_corrupt_model_file_names_the_file(tmp_path, shared_cascade):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(shared_cascade / "Pretrained_models" / "OGB_zf_pDp_7.5Hz_smoothing200ms", folder)
    victim = folder / "Model_NoiseLevel_5_Ensemble_1.h5"
    victim.write_bytes(victim.read_bytes()[:3000])
    with pytest.raises(usp.PipelineError, match="Model_NoiseLevel_5_Ensemble_1.h5"):
        usp.read_model_folder(folder)


def test_missing_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(usp.PipelineError, match="config.yaml"):
        usp.read_model_folder(tmp_path / "empty_model")


# --- spike rates against CASCADE's own outputs ------------------------------------------------------


@pytest.mark.parametrize(
    "threshold, key", [(0, "spike_rates_threshold0"), (1, "spike_rates_threshold1"), (False, "spike_rates_nothreshold")]
)
def test_rates_match_cascade_reference(reference, official_model, threshold, key, engine):
    rates = usp.predict_spike_rates(reference["dff"], official_model, threshold=threshold)
    expected = reference[key]
    assert rates.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(rates), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert np.max(np.abs(rates[finite] - expected[finite])) <= 1e-4


def test_noise_levels_match_cascade(reference, official_model):
    _, report = usp.predict_spike_rates(reference["dff"], official_model, return_noise=True)
    expected = reference["noise_levels"]
    np.testing.assert_array_equal(np.isnan(report["noise_level"]), np.isnan(expected))
    np.testing.assert_allclose(report["noise_level"], expected, atol=1e-9, equal_nan=True)
    assert set(np.unique(report["model_noise_level"])) <= set(official_model.noise_levels)


def test_discrete_spikes_match_cascade(reference, official_model):
    rates = reference["spike_rates_threshold0"]
    counts = usp.infer_discrete_spikes(rates, official_model)
    assert counts.dtype.kind == "i" and counts.shape == rates.shape and counts.min() >= 0
    ours, theirs = counts.sum(axis=1), reference["discrete_spike_counts"].sum(axis=1)
    within = np.abs(ours - theirs) <= np.maximum(1, 0.1 * theirs)
    assert within.mean() >= 0.95
    # the smoothed spike train must follow the rate it explains
    valid = ~np.isnan(rates[0])
    smoothed = gaussian_filter1d(counts.astype(float), official_model.smoothing_frames, axis=1)
    active = [i for i in range(len(rates)) if np.nansum(rates[i]) > 0.5 and counts[i].sum() > 0]
    correlations = [np.corrcoef(smoothed[i, valid], rates[i, valid])[0, 1] for i in active]
    assert len(active) > 500 and np.median(correlations) >= 0.9
    # deterministic
    np.testing.assert_array_equal(counts, usp.infer_discrete_spikes(rates, official_model))


# --- semantics on small inputs ----------------------------------------------------------------------


def test_noise_level_definition_and_assignment():
    rng = np.random.default_rng(0)
    dff = rng.normal(0, 0.05, (3, 2000))
    dff[2] = np.nan
    noise = usp.calculate_noise_levels(dff, 7.5)
    expected = np.median(np.abs(np.diff(dff[0]))) / np.sqrt(7.5) * 100
    assert noise[0] == pytest.approx(expected) and np.isnan(noise[2])
    levels = usp.assign_model_noise_levels(np.array([0.1, 2.49, 2.5, 3.2, 99, np.nan]), [2, 3, 4])
    np.testing.assert_array_equal(levels, [2, 2, 3, 3, 4, 2])


def test_nan_windows_edges_and_chunking(official_model, engine):
    rng = np.random.default_rng(1)
    dff = rng.normal(0, 0.03, (7, 300))
    dff[3, 150] = np.nan
    rates = usp.predict_spike_rates(dff, official_model, threshold=False, padding=-1.0)
    assert np.all(rates[:, :32] == -1.0) and np.all(rates[:, -32:] == -1.0)
    # frame 150 is inside the windows of frames 150-32 .. 150+31 (window = t-31 .. t+32)
    nan_frames = np.flatnonzero(np.isnan(rates[3]))
    np.testing.assert_array_equal(nan_frames, np.arange(150 - 32, 150 + 32))
    assert not np.isnan(np.delete(rates, 3, axis=0)).any()
    # chunking over neurons never changes a number
    small = usp.predict_spike_rates(dff, official_model, threshold=False, padding=-1.0, max_chunk_frames=300)
    np.testing.assert_array_equal(np.nan_to_num(small), np.nan_to_num(rates))
    # too-short traces give only padding
    assert np.isnan(usp.predict_spike_rates(dff[:, :50], official_model)).all()


@pytest.mark.parametrize("num_frames", [301, 300])  # odd and even: the engine pads odd lengths by a frame
def test_rates_do_not_depend_on_chunking_bit_for_bit(official_model, num_frames, engine):
    """A row's rates are the same bits whichever rows share its chunk and however many there are."""
    rng = np.random.default_rng(7)
    dff = rng.normal(0, 1, (40, num_frames)) * rng.uniform(0.05, 0.21, (40, 1))  # levels 2..7
    dff += (rng.random(dff.shape) < 0.02) * rng.uniform(0.2, 1.5, dff.shape)
    dff[5, 100:110] = np.nan
    dff[11] = np.nan
    levels = usp.predict_spike_rates(dff, official_model, return_noise=True)[1]["model_noise_level"]
    assert len(np.unique(levels)) >= 4
    whole = usp.predict_spike_rates(dff, official_model, threshold=False)
    for rows in (1, 2, 3, 7, 16):
        chunked = usp.predict_spike_rates(dff, official_model, threshold=False, max_chunk_frames=rows * num_frames)
        np.testing.assert_array_equal(chunked, whole)  # NaNs in the same places, every other bit equal
    # a row alone, and the same rows in another order, give the same bits too
    np.testing.assert_array_equal(usp.predict_spike_rates(dff[17:18], official_model, threshold=False), whole[17:18])
    order = rng.permutation(len(dff))
    np.testing.assert_array_equal(usp.predict_spike_rates(dff[order], official_model, threshold=False), whole[order])


def test_tensorflow_start_names_its_device(caplog):
    """_tensorflow() enables GPU memory growth (none here) and logs the device it runs on."""
    saved = usp.PROCESS_CACHE.pop("tensorflow", None)
    try:
        with caplog.at_level("INFO", logger=usp.log.name):
            tf = usp._tensorflow()
        assert f"process {os.getpid()} runs on" in caplog.text
        if not tf.config.list_physical_devices("GPU"):
            assert "the CPU" in caplog.text
    finally:
        if saved is not None:
            usp.PROCESS_CACHE["tensorflow"] = saved


@pytest.mark.parametrize("num_frames", [64, 65, 130, 577, 1100])  # one window, short rows, several blocks
def test_engines_agree_and_chunk_alike(official_model, num_frames):
    """numpy's matrix products and TensorFlow's convolutions give the same sums (float32 rounding apart), and the
    numpy engine's bits do not depend on its thread count or on which rows share a call."""
    rng = np.random.default_rng(num_frames)
    traces = (rng.normal(0, 0.05, (9, num_frames)) + (rng.random((9, num_frames)) < 0.03)).astype(np.float32)
    members, width = official_model.ensembles[official_model.noise_levels[2]], num_frames - 63
    tensorflow = usp.CASCADE_ENGINES["tensorflow"].make(2)(traces, members, official_model.dense_expansion)
    matmul = usp.MatmulCascade(2)(traces, members, official_model.dense_expansion)
    assert matmul.shape[1] >= width and matmul.dtype == np.float64
    np.testing.assert_allclose(matmul[:, :width], tensorflow[:, :width], rtol=0, atol=5e-6 * len(members))
    one_thread = usp.MatmulCascade(1)
    rows = [one_thread(traces[i : i + 1], members, official_model.dense_expansion) for i in range(len(traces))]
    np.testing.assert_array_equal(np.concatenate(rows), matmul)
    order = rng.permutation(len(traces))
    np.testing.assert_array_equal(one_thread(traces[order], members, official_model.dense_expansion), matmul[order])


NUMPY_ENGINE_CHUNKING_CHECK = """
import sys
import numpy as np
import unified_spike_processing_coo as usp
model = usp.read_model_folder(usp.BUILTIN_MODEL_DIR)
members, ok = model.ensembles[model.noise_levels[1]], True
for frames in (64, 65, 130, 2100, 4000):
    rng = np.random.default_rng(frames)
    traces = (rng.normal(0, 0.05, (7, frames)) + (rng.random((7, frames)) < 0.03)).astype(np.float32)
    whole = usp.MatmulCascade(2)(traces, members, model.dense_expansion)
    alone = np.concatenate([usp.MatmulCascade(1)(traces[i : i + 1], members, model.dense_expansion) for i in range(7)])
    ok &= np.array_equal(alone, whole)
print("identical" if ok else "DIFFERENT")
"""


@pytest.mark.parametrize("core", ["Haswell", "SkylakeX"])  # the BLAS kernels of AVX2-only and AVX-512 CPUs
def test_numpy_engine_bits_never_depend_on_the_chunk_whatever_the_blas_kernel(core):
    """Where auto picks the numpy engine (AVX2-only CPUs) OpenBLAS runs its Haswell kernels: a row's bits must not
    depend on the other rows of a call with those kernels either (each block is its own product)."""
    import subprocess
    import sys

    with open("/proc/cpuinfo") as cpuinfo:
        if core == "SkylakeX" and "avx512f" not in cpuinfo.read():
            pytest.skip("SkylakeX kernels need AVX-512 on this CPU")
    environment = {**os.environ, "OPENBLAS_CORETYPE": core, "PYTHONPATH": str(usp.REPO_DIR)}
    result = subprocess.run([sys.executable, "-c", NUMPY_ENGINE_CHUNKING_CHECK], env=environment,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "identical"


def test_auto_engine_by_the_cpu(monkeypatch):
    """--engine auto: TensorFlow with AVX-512 (or unknown flags), numpy on AVX2-only CPUs; a name is taken as is."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever this machine has
    for flags, expected in [
        ({"avx2", "fma", "avx512f"}, "tensorflow"),
        ({"avx2", "fma"}, "numpy"),
        (set(), "tensorflow"),
    ]:
        monkeypatch.setattr(usp, "cpu_flags", lambda flags=flags: flags)
        choice = usp.choose_engine("auto")
        assert choice.name == expected and choice.why.startswith("auto: ")
    assert usp.choose_engine("tensorflow") == usp.EngineChoice("tensorflow", "--engine tensorflow")
    monkeypatch.undo()
    assert usp.choose_engine(usp.AUTO_ENGINE).name in usp.CASCADE_ENGINES  # this machine's own flags


# --- the fast engine equals Keras's own windowed predict on a model Keras saved -------------------


def _save_keras_cascade_model(folder, noise_levels=(1, 2), ensemble_size=2, seed=0, filter_sizes=(31, 19, 5)):
    """A model folder in CASCADE's layout written by Keras itself (random weights, optimizer)."""
    import yaml

    keras = pytest.importorskip("tensorflow").keras
    keras.utils.set_random_seed(seed)
    folder.mkdir(parents=True)
    models = {}
    for level in noise_levels:
        for member in range(ensemble_size):
            inputs = keras.Input(shape=(64, 1))
            h = keras.layers.Conv1D(30, filter_sizes[0], activation="relu")(inputs)
            h = keras.layers.Conv1D(40, filter_sizes[1], activation="relu")(h)
            h = keras.layers.MaxPooling1D(2)(h)
            h = keras.layers.Conv1D(50, filter_sizes[2], activation="relu")(h)
            h = keras.layers.MaxPooling1D(2)(h)
            h = keras.layers.Dense(30, activation="relu")(h)
            h = keras.layers.Flatten()(h)
            outputs = keras.layers.Dense(1, activation="linear")(h)
            model = keras.Model(inputs, outputs)
            # random, non-trivial biases so that every relu path matters
            for layer in model.layers:
                if layer.weights:
                    kernel, bias = layer.get_weights()
                    layer.set_weights([kernel, np.random.default_rng(seed + member).normal(0, 0.05, bias.shape)])
            model.compile(loss="mean_squared_error", optimizer="adagrad")
            path = folder / f"Model_NoiseLevel_{level}_Ensemble_{member}.h5"
            model.save(path)
            models[(level, member)] = model
    config = dict(
        model_name="keras_test_model",
        sampling_rate=2.0,
        noise_levels=list(noise_levels),
        smoothing=0.5,
        causal_kernel=0,
        windowsize=64,
        before_frac=0.5,
        filter_sizes=list(filter_sizes),
        filter_numbers=[30, 40, 50],
        dense_expansion=30,
        ensemble_size=ensemble_size,
    )
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return models


# (30, 18, 5): even widths, where the engine's polyphase conv 2 needs extra padding frames
@pytest.mark.parametrize("filter_sizes", [(31, 19, 5), (30, 18, 5)])
def test_engine_equals_keras_windowed_predict(tmp_path, filter_sizes, engine):
    folder = tmp_path / "keras_model"
    keras_models = _save_keras_cascade_model(folder, filter_sizes=filter_sizes)
    with h5py.File(folder / "Model_NoiseLevel_1_Ensemble_0.h5", "r") as h5:
        assert "model_config" in h5.attrs and json.loads(h5.attrs["model_config"])
    model = usp.read_model_folder(folder)
    assert model.noise_levels == (1, 2) and model.ensemble_size == 2
    rng = np.random.default_rng(3)
    num_frames = 200
    dff = rng.normal(0, 0.02, (6, num_frames)) + (rng.random((6, num_frames)) < 0.05) * 0.8
    rates, report = usp.predict_spike_rates(dff, model, threshold=False, return_noise=True)
    offset = model.window_offset
    windows = np.lib.stride_tricks.sliding_window_view(dff, 64, axis=1)  # (N, T-63, 64)
    for neuron in range(len(dff)):
        level = int(report["model_noise_level"][neuron])
        members = [keras_models[(level, e)] for e in range(2)]
        expected = np.mean(
            [m.predict(windows[neuron][..., None].astype(np.float32), verbose=0)[:, 0] for m in members], axis=0
        )
        valid = np.arange(32, num_frames - 32)
        got = rates[neuron, valid]
        np.testing.assert_allclose(got, expected[valid - offset], atol=1e-5, rtol=0)


def test_wrong_architecture_is_rejected(tmp_path):
    folder = tmp_path / "keras_model"
    _save_keras_cascade_model(folder, noise_levels=(1,), ensemble_size=1)
    config = (folder / "config.yaml").read_text().replace("- 31", "- 29")
    (folder / "config.yaml").write_text(config)
    with pytest.raises(usp.PipelineError, match="convolution 1"):
        usp.read_model_folder(folder)
