"""Loading subjects (Chen 2018, generic, MATLAB v5/v7.3) and finding them."""

import shutil

import h5py
import numpy as np
import pytest
from conftest import SAMPLE_DIR

import unified_spike_processing_coo as usp

SAMPLE = SAMPLE_DIR


def test_generic_layout_and_v73_mat(tmp_path):
    generic = tmp_path / "subject_1"
    generic.mkdir()
    with h5py.File(generic / "traces.h5", "w") as h5:
        h5["traces"] = np.random.default_rng(0).normal(0, 0.05, (5, 80)).astype(np.float32)
        h5["positions"] = np.arange(15, dtype=float).reshape(5, 3)
        h5.attrs["frame_rate_hz"] = 2.5
        h5.attrs["trace_type"] = "dff"
    subject = usp.load_subject(generic)
    assert subject.layout == "generic" and subject.read_traces().shape == (5, 80) and subject.frame_rate_hz == 2.5
    # MATLAB v7.3: data_full.mat is HDF5 and stores matrices transposed
    chen = tmp_path / "subject_2"
    shutil.copytree(SAMPLE / "subject_1", chen)
    original = usp.load_subject(chen)
    import scipy.io

    fields = scipy.io.loadmat(chen / "data_full.mat", squeeze_me=True, struct_as_record=False)["data"]
    (chen / "data_full.mat").unlink()
    with h5py.File(chen / "data_full.mat", "w", userblock_size=512) as h5:
        group = h5.create_group("data")
        for key in ("CellXYZ", "CellXYZ_norm", "IX_inval_anat"):
            group[key] = np.atleast_2d(np.asarray(getattr(fields, key), dtype=float)).T
        group["fpsec"] = np.array([[float(fields.fpsec)]])
    with open(chen / "data_full.mat", "r+b") as handle:  # MATLAB's text header in the user block
        handle.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")
    converted = usp.load_subject(chen)
    np.testing.assert_array_equal(converted.positions, original.positions)
    assert converted.frame_rate_hz == pytest.approx(original.frame_rate_hz)


def test_load_errors_name_the_problem(tmp_path):
    folder = tmp_path / "subject_1"
    shutil.copytree(SAMPLE / "subject_1", folder)
    with h5py.File(folder / "TimeSeries.h5", "r+") as h5:
        absix = h5["absIX"][()]
        del h5["absIX"]
        h5["absIX"] = absix[:, :-5]
    with pytest.raises(usp.PipelineError, match="absIX lists"):
        usp.load_subject(folder)
    with pytest.raises(usp.PipelineError, match="neither"):
        (tmp_path / "subject_9").mkdir()
        usp.load_subject(tmp_path / "subject_9")


def test_subject_discovery_natural_order(tmp_path):
    for name in ("subject_10", "subject_2", "subject_1", "notes"):
        (tmp_path / "Subjects" / name).mkdir(parents=True)
    found = usp.find_subjects(tmp_path)
    assert [p.name for p in found] == ["subject_1", "subject_2", "subject_10"]
    assert [p.name for p in usp.find_subjects(tmp_path, skip=("subject_2",))] == ["subject_1", "subject_10"]
    with pytest.raises(usp.PipelineError, match="subject_7"):
        usp.find_subjects(tmp_path, only=("subject_7",))
