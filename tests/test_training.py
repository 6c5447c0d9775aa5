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
    if not hasattr(usp, "load_cascade_model"):
        pytest.skip("unified_spike_processing_coo.load_cascade_model not available yet")
    model = usp.load_cascade_model(trained_folder)
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
    raw, _, _ = usp.predict_raw_rates(dff, usp.load_cascade_model(trained_folder))
    np.testing.assert_allclose(raw[0, FRAMES_BEFORE : FRAMES_BEFORE + keras_out.size], keras_out, rtol=1e-4, atol=1e-5)
