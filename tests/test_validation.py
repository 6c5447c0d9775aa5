"""Bad and doubtful input: one clear error per subject or a recorded warning; other subjects run."""

import shutil

import h5py
import numpy as np
from conftest import OFFLINE_BUILTIN, SAMPLE_DIR, run_cli

import unified_spike_processing_coo as usp

SAMPLE = SAMPLE_DIR


def test_bad_subjects_fail_alone_and_keep_earlier_outputs(tmp_path):
    data = tmp_path / "data"
    for name in ("subject_1", "subject_2"):
        shutil.copytree(SAMPLE / name, data / name)
    out = tmp_path / "out"
    run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *OFFLINE_BUILTIN)
    before = (out / "subject_2" / usp.COO_FILENAME).read_bytes()
    # break subject_2 (truncated TimeSeries.h5) and add broken subjects of every kind
    series = data / "subject_2" / "TimeSeries.h5"
    series.write_bytes(series.read_bytes()[:5000])
    shutil.copytree(SAMPLE / "subject_3", data / "subject_4")
    (data / "subject_4" / "data_full.mat").unlink()
    shutil.copytree(SAMPLE / "subject_3", data / "subject_5")
    with h5py.File(data / "subject_5" / "TimeSeries.h5", "r+") as h5:
        h5["CellResp"][...] = np.nan
    (data / "subject_6").mkdir()
    (data / "subject_7").mkdir()  # generic layout recorded at 10 Hz: far from the 2 Hz model
    with h5py.File(data / "subject_7" / "traces.h5", "w") as h5:
        h5["traces"] = np.random.default_rng(0).normal(0, 0.05, (20, 300)).astype(np.float32)
        h5["positions"] = np.random.default_rng(1).random((20, 3))
        h5.attrs["frame_rate_hz"] = 10.0
    # a usable subject with some dead cells and some missing frames: processed, with warnings
    shutil.copytree(SAMPLE / "subject_3", data / "subject_8")
    with h5py.File(data / "subject_8" / "TimeSeries.h5", "r+") as h5:
        cell_resp = h5["CellResp"][()]
        cell_resp[:, :5] = np.nan
        cell_resp[100:110, 5:50] = np.nan
        h5["CellResp"][...] = cell_resp
    result = run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *OFFLINE_BUILTIN, check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 5, errors
    assert any("subject_7" in e and "10 Hz" in e and "model" in e for e in errors)
    assert "5 cells have all-NaN traces" in result.stderr and "45 cells have some NaN frames" in result.stderr
    with h5py.File(out / "subject_8" / usp.METADATA_FILENAME, "r") as meta:
        valid = meta["cells/valid"][()]
        assert valid[:5].sum() == 0 and valid[5:].all()
        assert meta["cells/spike_count"][:5].sum() == 0
    assert any("subject_2" in e and "TimeSeries.h5" in e for e in errors)
    assert any("subject_4" in e and "data_full.mat" in e for e in errors)
    assert any("subject_5" in e and "NaN" in e for e in errors)
    assert any("subject_6" in e for e in errors)
    assert (out / "subject_2" / usp.COO_FILENAME).read_bytes() == before, "earlier output must survive"
    assert (out / "subject_1" / usp.COO_FILENAME).is_file()
    assert not list(out.rglob(".*tmp*")), "no temporary files left behind"
    with h5py.File(out / usp.COMBINED_FILENAME, "r") as combined:
        # subject_2's earlier outputs stay, but its input changed since: not mixed into the combined file
        assert set(combined) == {"subject_1", "subject_8"}
        assert "subject_2" in combined.attrs["excluded"]
