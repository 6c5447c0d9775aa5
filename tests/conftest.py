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

    return usp.load_cascade_model(shared_cascade / "Pretrained_models" / "OGB_zf_pDp_7.5Hz_smoothing200ms")
