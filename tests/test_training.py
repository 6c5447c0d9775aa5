"""End-to-end check of tools/train_cascade_model.py on a tiny synthetic problem.

Trains one model (1 noise level, 1 ensemble member, 1 epoch, a few cells) into a
temporary folder and checks the CASCADE folder layout, config.yaml keys, the
HDF5 file structure and that the pipeline's loader and predictor accept it.
"""

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))

CASCADE_KEYS = [
    "model_name",
    "sampling_rate",
    "training_datasets",
    "noise_levels",
    "smoothing",
    "causal_kernel",
    "windowsize",
    "before_frac",
    "filter_sizes",
    "filter_numbers",
    "dense_expansion",
    "loss_function",
    "optimizer",
    "nr_of_epochs",
    "ensemble_size",
    "batch_size",
    "training_finished",
    "verbose",
]

# (kernel shape, bias shape) of CASCADE's five weighted layers, in order.
EXPECTED_SHAPES = [
    ((31, 1, 30), (30,)),
    ((19, 30, 40), (40,)),
    ((5, 40, 50), (50,)),
    ((50, 30), (30,)),
    ((60, 1), (1,)),
]


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    from tools import train_cascade_model

    out = tmp_path_factory.mktemp("model") / "tiny_2Hz_smoothing500ms"
    argv = [
        "--out",
        str(out),
        "--sampling_rate",
        "2",
        "--smoothing",
        "0.5",
        "--noise_levels",
        "3",
        "--ensemble_size",
        "1",
        "--epochs",
        "1",
        "--n_cells",
        "12",
        "--n_val_cells",
        "4",
        "--duration_s",
        "300",
        "--seed",
        "1",
    ]
    assert train_cascade_model.main(argv) == 0
    return out


def test_folder_layout_and_config(trained_folder):
    assert sorted(os.listdir(trained_folder)) == ["Model_NoiseLevel_3_Ensemble_0.h5", "config.yaml"]
    config = yaml.safe_load((trained_folder / "config.yaml").read_text())
    for key in CASCADE_KEYS:
        assert key in config, key
    assert config["sampling_rate"] == 2.0
    assert config["smoothing"] == 0.5
    assert config["noise_levels"] == [3]
    assert config["windowsize"] == 64 and config["before_frac"] == 0.5 and config["causal_kernel"] == 0
    assert config["filter_sizes"] == [31, 19, 5] and config["filter_numbers"] == [30, 40, 50]
    assert config["dense_expansion"] == 30 and config["loss_function"] == "mean_squared_error"
    assert config["ensemble_size"] == 1 and config["nr_of_epochs"] == 1
    assert config["training_finished"] == "Yes"
    # Provenance: the exact command and the seed.
    assert "--noise_levels 3" in config["training_command"]
    assert config["training_seed"] == 1
    assert "tensorflow" in config["training_software"]


def test_h5_structure(trained_folder):
    with h5py.File(trained_folder / "Model_NoiseLevel_3_Ensemble_0.h5", "r") as h5:
        model_config = json.loads(h5.attrs["model_config"])
        classes = [layer["class_name"] for layer in model_config["config"]["layers"]]
        assert classes == [
            "InputLayer",
            "Conv1D",
            "Conv1D",
            "MaxPooling1D",
            "Conv1D",
            "MaxPooling1D",
            "Dense",
            "Flatten",
            "Dense",
        ]
        group = h5["model_weights"]
        shapes = []
        for layer_name in group.attrs["layer_names"]:
            layer_name = layer_name.decode() if isinstance(layer_name, bytes) else layer_name
            names = group[layer_name].attrs["weight_names"]
            if len(names) == 0:
                continue
            ws = {
                (n.decode() if isinstance(n, bytes) else n).split("/")[-1].split(":")[0]: group[layer_name][n].shape
                for n in names
            }
            shapes.append((ws["kernel"], ws["bias"]))
        assert shapes == EXPECTED_SHAPES


def test_pipeline_loads_and_predicts(trained_folder):
    usp = pytest.importorskip("unified_spike_processing_coo")
    model = usp.read_model_folder(trained_folder)
    assert model.sampling_rate_hz == 2.0 and tuple(model.noise_levels) == (3,)

    from tools import synthetic_calcium as sc

    rng = np.random.default_rng(0)
    spikes = sc.simulate_spike_trains(3, 200, 2.0, rng)
    dff = sc.simulate_dff(spikes, 2.0, 3.0, rng)
    rates = usp.predict_spike_rates(dff, model, threshold=0)
    assert rates.shape == dff.shape
    inner = rates[:, 40:-40]
    assert np.all(np.isfinite(inner)) and np.all(inner >= 0)


def test_pipeline_matches_keras(trained_folder):
    """The saved Keras model and the pipeline agree on which frame a window predicts."""
    usp = pytest.importorskip("unified_spike_processing_coo")
    from tools.train_cascade_model import FRAMES_BEFORE, import_keras, sliding_windows

    _, keras = import_keras(2)
    net = keras.models.load_model(trained_folder / "Model_NoiseLevel_3_Ensemble_0.h5", compile=False)
    rng = np.random.default_rng(1)
    dff = rng.normal(0, 0.05, size=(1, 150)).astype(np.float32)
    keras_out = net.predict(sliding_windows(dff[0]), verbose=0)[:, 0]
    raw, _, _ = usp.predict_raw_rates(dff, usp.read_model_folder(trained_folder))
    np.testing.assert_allclose(raw[0, FRAMES_BEFORE : FRAMES_BEFORE + keras_out.size], keras_out, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# Real ground truth (../shared/cascade/Ground_truth): reading, folds, training
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ground_truth_dir(shared_cascade):
    return shared_cascade / "Ground_truth"


def test_reads_all_29_datasets(ground_truth_dir):
    """Every dataset folder yields recordings, including DS24-DS27 (CAttached<Name>_mini.mat)
    and DS03 (elements without fluo_time), and every left-out element has a reason."""
    from tools.cascade_ground_truth import load_ground_truth

    skipped = []
    recordings = load_ground_truth(str(ground_truth_dir), skipped=skipped)
    folders = sorted(p.name for p in ground_truth_dir.iterdir() if p.is_dir())
    assert len(folders) == 29
    assert sorted({r.dataset for r in recordings}) == folders
    for name in ("DS24-", "DS25-", "DS26-", "DS27-"):
        assert any(r.dataset.startswith(name) and not r.file.startswith("CAttached_") for r in recordings)
    reasons = {(s.dataset[:4], s.reason.split(" ")[0]) for s in skipped}
    assert ("DS03", "fluo_time,") in reasons  # elements without fluo_time
    assert all(s.reason for s in skipped) and len(skipped) < 10
    for r in recordings:
        assert r.fluo_time_s.size == r.dff.size >= 2 and np.all(np.isfinite(r.fluo_time_s))


def test_usable_at_rate_and_resampling(ground_truth_dir):
    from tools.cascade_ground_truth import load_ground_truth, resample_recording, usable_at_rate

    recs = load_ground_truth(str(ground_truth_dir), ["DS40-GCaMP6s-spinal-cord-excitatory"])
    slow = [r for r in recs if r.frame_rate_hz < 3]
    assert slow, "DS40 has 2.5 Hz recordings"
    assert "below" in usable_at_rate(slow[0], 2.6, 64)  # no upsampling
    long_enough = [r for r in slow if usable_at_rate(r, 2.0, 64) is None]
    dff, counts = resample_recording(long_enough[0], 2.0)
    assert dff.size == counts.size >= 64
    inside = (long_enough[0].spike_times_s >= long_enough[0].fluo_time_s[0]) & (
        long_enough[0].spike_times_s < long_enough[0].fluo_time_s[0] + dff.size / 2.0
    )
    assert counts.sum() == inside.sum()


def test_folds_cover_every_dataset_once(ground_truth_dir):
    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    import benchmark_accuracy as ba

    from tools.cascade_ground_truth import dataset_group

    folders = [p.name for p in ground_truth_dir.iterdir() if p.is_dir()]
    folds = {d: ba.fold_of(d) for d in folders}
    assert sorted(set(folds.values())) == list(range(len(ba.FOLDS)))
    # Every prefix matches exactly one folder; same-neuron folders share a fold.
    for prefixes in ba.FOLDS:
        for prefix in prefixes:
            assert sum(d.startswith(prefix) for d in folders) == 1, prefix
    by_group = {}
    for d, k in folds.items():
        assert by_group.setdefault(dataset_group(d), k) == k, d


def test_ground_truth_training_held_out(ground_truth_dir, tmp_path):
    """Train on one small dataset with another excluded; config records what was used, the
    benchmark treats the excluded dataset as held out and the used one as seen; init_from
    starts from a saved model."""
    from tools import train_cascade_model

    out = tmp_path / "gt_2Hz_smoothing500ms"
    common = ["--sampling_rate", "2", "--noise_levels", "5", "--level_grid", *map(str, range(1, 10))]
    common += ["--ensemble_size", "1", "--epochs", "1", "--gt_replicates", "1", "--threads", "1"]
    common += ["--ground_truth_dir", str(ground_truth_dir), "--seed", "3"]
    used, excluded = "DS14-GCaMP6s-m-V1", "DS09-GCaMP6f-m-V1"
    argv = ["--out", str(out), "--ground_truth_datasets", used, excluded, "--exclude_datasets", excluded]
    assert train_cascade_model.main(argv + common) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["training_datasets"] == [used]
    assert config["training_data"]["excluded_datasets"] == [excluded]
    assert config["training_noise_level_ranges"] == {5: [4.5, 5.5]}  # ranges of the 1..9 grid
    assert config["noise_levels"] == [5] and config["training_finished"] == "Yes"

    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    import benchmark_accuracy as ba

    usp = pytest.importorskip("unified_spike_processing_coo")
    model_set = ba.ModelSet("m", str(out), usp)
    assert model_set.holds_out(excluded) and not model_set.holds_out(used)

    tuned = tmp_path / "tuned"
    argv = ["--out", str(tuned), "--ground_truth_datasets", used, "--init_from", str(out)]
    assert train_cascade_model.main(argv + common) == 0
    assert yaml.safe_load((tuned / "config.yaml").read_text())["training_initialised_from"] == str(out)


def test_sequence_windowed_round_trip():
    """copy_windowed_to_sequence inverts copy_sequence_to_windowed (used by --init_from)."""
    from tools.train_cascade_model import (
        build_sequence_model,
        build_windowed_model,
        copy_sequence_to_windowed,
        copy_windowed_to_sequence,
        import_keras,
    )

    tf, keras = import_keras(1)
    seq, win, seq2 = (build_sequence_model(tf, keras), build_windowed_model(keras), build_sequence_model(tf, keras))
    copy_sequence_to_windowed(seq, win)
    copy_windowed_to_sequence(win, seq2)
    x = np.random.default_rng(0).normal(size=(1, 100, 1)).astype(np.float32)
    np.testing.assert_allclose(seq(x).numpy(), seq2(x).numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# The shipped builtin family (models/builtin_<rate>Hz_smoothing500ms)
# --------------------------------------------------------------------------

BUILTIN_DIRS = sorted((REPO_DIR / "models").glob("builtin_*Hz_smoothing500ms"))


def test_builtin_family_covers_1p8_to_2p6_hz():
    """Every frame rate from 1.8 to 2.6 Hz has a builtin model within 5 % (|model - rate| / rate)."""
    rates = [yaml.safe_load((d / "config.yaml").read_text())["sampling_rate"] for d in BUILTIN_DIRS]
    assert 2.0 in rates
    for frame_rate in np.linspace(1.8, 2.6, 161):
        assert min(abs(r - frame_rate) / frame_rate for r in rates) <= 0.05 + 1e-9, frame_rate


@pytest.mark.parametrize("folder", BUILTIN_DIRS, ids=lambda p: p.name)
def test_builtin_folder(folder):
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert folder.name == f"builtin_{config['sampling_rate']:g}Hz_smoothing500ms"
    assert config["smoothing"] == 0.5 and config["noise_levels"] == list(range(1, 10))
    assert config["training_finished"] == "Yes" and config["training_command"].startswith("python tools/")
    expected = {f"Model_NoiseLevel_{n}_Ensemble_{e}.h5" for n in range(1, 10) for e in range(config["ensemble_size"])}
    assert expected <= {p.name for p in folder.iterdir()}
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5e6  # a few MB at most
