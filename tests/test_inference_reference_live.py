"""The fast engine against CASCADE run live through neuralib (PyPI 'neura-library').

neuralib's ``cascade_predict`` runs in a subprocess: it needs TF_USE_LEGACY_KERAS=1 before
TensorFlow's first import, and this pytest process has usually imported TensorFlow already.
It is pointed at a private cache folder (a link to the shared model plus a copy of
``available_models.yaml``) so it never downloads anything. Skips when the shared CASCADE
material, neuralib, tf-keras or neuralib's other imports (ruamel.yaml, numba) are missing.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.io

import unified_spike_processing_coo as usp

MODEL_NAME = "OGB_zf_pDp_7.5Hz_smoothing200ms"
TRACES = "Example_datasets/Multiplane-OGB1-zf-pDp-Rupprecht-7.5Hz/Calcium_traces_04.mat"
NEURONS = 100  # the file holds 1005 neurons x 260 frames; the first 100 include an all-NaN row
THRESHOLDS = {"0": 0, "1": 1}  # each costs a full model load in neuralib (~10 s)
SKIP_EXIT = 77

# Runs in a fresh interpreter: argv = dff.npy, cache dir, model name, output prefix.
NEURALIB_SCRIPT = textwrap.dedent(f"""
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tf_keras  # noqa: F401
        from neuralib.imaging.spikes.cascade import cascade_predict
    except ImportError as exc:
        sys.stderr.write(f"neuralib's CASCADE is not importable: {{exc!r}}")
        sys.exit({SKIP_EXIT})
    import numpy as np
    dff_path, cache_dir, name, prefix = sys.argv[1:5]
    dff = np.load(dff_path)
    for label, threshold in {THRESHOLDS!r}.items():
        rates = cascade_predict(dff, name, threshold=threshold, padding=np.nan, verbose=False,
                                cache_dir=cache_dir)
        np.save(f"{{prefix}}{{label}}.npy", rates)
""")


@pytest.fixture(scope="module")
def live_reference(shared_cascade, tmp_path_factory):
    """neuralib's rates for the first NEURONS traces, per threshold label, and the traces."""
    if importlib.util.find_spec("neuralib") is None:
        pytest.skip("neuralib is not installed (pip install neura-library==0.6.1, NOT 'neuralib')")
    if importlib.util.find_spec("tf_keras") is None:
        pytest.skip("tf-keras is not installed (neuralib's CASCADE needs legacy Keras)")
    model_dir = shared_cascade / "Pretrained_models" / MODEL_NAME
    traces = shared_cascade / TRACES
    for path in (model_dir / "config.yaml", traces):
        if not path.exists():
            pytest.skip(f"shared CASCADE material missing: {path}")
    tmp = tmp_path_factory.mktemp("neuralib_live")
    cache = tmp / "cache"
    cache.mkdir()
    (cache / MODEL_NAME).symlink_to(model_dir.resolve(), target_is_directory=True)
    index = model_dir.parent / "available_models.yaml"
    if index.is_file():
        shutil.copyfile(index, cache / "available_models.yaml")
    else:  # all neuralib needs is the name listed; the link is never followed (model present)
        (cache / "available_models.yaml").write_text(f"{MODEL_NAME}:\n  Link: none\n")

    dff = scipy.io.loadmat(traces)["dF_traces"][:NEURONS].astype(np.float64)
    np.save(tmp / "dff.npy", dff)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.run(
        [sys.executable, "-c", NEURALIB_SCRIPT, str(tmp / "dff.npy"), str(cache), MODEL_NAME, str(tmp / "rates_")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode == SKIP_EXIT:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"neuralib subprocess failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return dff, {label: np.load(tmp / f"rates_{label}.npy") for label in THRESHOLDS}


@pytest.mark.parametrize("label", list(THRESHOLDS))
def test_rates_match_neuralib_live(live_reference, official_model, label):
    dff, reference = live_reference
    expected = reference[label]
    rates = usp.predict_spike_rates(dff, official_model, threshold=THRESHOLDS[label], padding=np.nan)
    assert rates.shape == expected.shape == dff.shape
    assert np.isnan(dff).all(axis=1).any(), "the slice should hold an all-NaN trace"
    np.testing.assert_array_equal(np.isnan(rates), np.isnan(expected))
    finite = np.isfinite(rates) & np.isfinite(expected)
    assert finite.sum() > 0.5 * rates.size
    assert np.max(np.abs(rates[finite] - expected[finite])) <= 1e-4
    assert np.nanmin(rates) >= 0
