"""Shared fixtures: the repository root, ../shared (real CASCADE material) and quiet TensorFlow."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))


def shared_dir() -> Path:
    return Path(os.environ.get("SPIKE_SHARED_DIR", REPO_DIR.parent / "shared"))


@pytest.fixture(scope="session")
def shared_cascade() -> Path:
    """../shared/cascade, or skip: it exists in CI and on developer machines, not for users."""
    folder = shared_dir() / "cascade"
    if not folder.is_dir():
        pytest.skip(f"real CASCADE material not found at {folder} (set SPIKE_SHARED_DIR)")
    return folder


@pytest.fixture(scope="session")
def official_model(shared_cascade):
    import unified_spike_processing_coo as usp

    return usp.read_model_folder(shared_cascade / "Pretrained_models" / "OGB_zf_pDp_7.5Hz_smoothing200ms")


SAMPLE_DIR = REPO_DIR / "sample_data"
SCRIPT = REPO_DIR / "unified_spike_processing_coo.py"
OFFLINE_BUILTIN = ("--cascade_model", "builtin", "--offline")


def run_cli(*args, check: bool = True, timeout: float = 600, env: dict | None = None):
    """Run the pipeline's command line in a subprocess (as a user or a scheduler does)."""
    import subprocess

    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_DIR,
        env=None if env is None else {**os.environ, **env},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-4000:]}")
    return result
