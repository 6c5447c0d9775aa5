"""Loading subjects (Chen 2018, generic, MATLAB v5/v7.3) and finding them."""

import errno
import re
import shutil

import h5py
import numpy as np
import pytest
from conftest import SAMPLE_DIR

import unified_spike_processing_coo as usp

SAMPLE = SAMPLE_DIR


def write_generic_fish(folder, **datasets):
    """A small generic-layout traces.h5 (5 cells x 80 frames of dF/F at 2.5 Hz) with further datasets."""
    folder.mkdir()
    with h5py.File(folder / "traces.h5", "w") as h5:
        h5["traces"] = np.random.default_rng(0).normal(0, 0.05, (5, 80)).astype(np.float32)
        h5["positions"] = np.arange(15, dtype=float).reshape(5, 3)
        h5.attrs["frame_rate_hz"] = 2.5
        for name, data in datasets.items():
            h5[name] = data


def test_generic_layout_and_v73_mat(tmp_path):
    generic = tmp_path / "subject_1"
    write_generic_fish(generic)
    with h5py.File(generic / "traces.h5", "a") as h5:
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
    with pytest.raises(usp.PipelineError, match="holds no layout this pipeline reads"):
        (tmp_path / "subject_9").mkdir()
        usp.load_subject(tmp_path / "subject_9")


def test_subject_discovery_natural_order(tmp_path):
    for name in ("subject_10", "subject_2", "subject_1", "notes"):
        (tmp_path / "Subjects" / name).mkdir(parents=True)
    (tmp_path / "Subjects" / "subject_3").write_text("a file where a folder is expected: listed, then refused")
    found = usp.find_subjects(tmp_path)
    assert [p.name for p in found] == ["subject_1", "subject_2", "subject_3", "subject_10"]
    with pytest.raises(usp.PipelineError, match="subject_3 is a file, expected a folder"):
        usp.load_subject(found[2])
    assert [p.name for p in usp.find_subjects(tmp_path, skip=("subject_2", "subject_3"))] == ["subject_1", "subject_10"]
    with pytest.raises(usp.PipelineError, match="subject_7"):
        usp.find_subjects(tmp_path, only=("subject_7",))


@pytest.mark.parametrize(
    "value, expected",
    [
        (2.0, 2.0),
        (np.array([[2.5]]), 2.5),
        (np.array([1.97, 1.97, 1.97]), 1.97),
        (np.uint8(3), 3.0),
        ("2", 2.0),  # text that is a number: read, with a warning
        (b" 1.97 ", 1.97),
        (np.array(["2.56"]), 2.56),
        ("fast", "is the text 'fast', expected a frame rate in Hz"),
        (np.zeros(0), "is empty, expected one frame rate"),
        (np.array([2.0, 2.5, 3.0]), "holds 3 values (2, 2.5, 3), expected one frame rate"),
        (-1.0, "is -1 Hz, expected a volume rate between 0.01 and 1000 Hz"),
        (0.0, "is 0 Hz"),
        (np.nan, "is nan Hz"),
        (np.inf, "is inf Hz"),
        (2000.0, "is 2000 Hz"),
        (0.005, "is 0.005 Hz"),
        (2 + 1j, "holds complex numbers"),
        (True, "expected a frame rate in Hz (a number)"),
        (np.array(None, dtype=object), "(a struct, cell or empty value?)"),
    ],
)
def test_frame_rate_rules(value, expected):
    doubts = []
    if isinstance(expected, float):
        assert usp._frame_rate(value, "data_full.mat: data.fpsec", doubts) == pytest.approx(expected)
        assert len(doubts) == isinstance(value, (str, bytes, np.ndarray)) * (np.asarray(value).dtype.kind in "SU")
    else:
        with pytest.raises(usp.PipelineError, match="^data_full.mat: data.fpsec .*" + re.escape(expected)):
            usp._frame_rate(value, "data_full.mat: data.fpsec", doubts)


def _write_v73(path, fields):
    """data_full.mat as MATLAB v7.3 writes it: HDF5 after a 512-byte header, matrices transposed,
    char arrays as uint16 codes, [] as an empty marker."""
    with h5py.File(path, "w", userblock_size=512) as h5:
        group = h5.create_group("data")
        for key, value in fields.items():
            if isinstance(value, str):
                group[key] = np.array([[ord(c)] for c in value], np.uint16)
                group[key].attrs["MATLAB_class"] = np.bytes_(b"char")
            elif np.size(value) == 0:
                group[key] = np.zeros(2, np.uint64)
                group[key].attrs["MATLAB_empty"] = np.uint8(1)
            else:
                group[key] = np.atleast_2d(np.asarray(value, dtype=float)).T
    with open(path, "r+b") as handle:
        handle.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")


def test_v73_char_and_empty_fields(tmp_path):
    import scipy.io

    folder = tmp_path / "subject_1"
    shutil.copytree(SAMPLE / "subject_1", folder)
    data = scipy.io.loadmat(folder / "data_full.mat", squeeze_me=True, struct_as_record=False)["data"]
    fields = {"CellXYZ": data.CellXYZ, "IX_inval_anat": [], "fpsec": "1.97"}
    _write_v73(folder / "data_full.mat", fields)
    subject = usp.load_subject(folder)  # char '1.97' is text, not the codes 49, 46, 57, 55
    assert subject.frame_rate_hz == pytest.approx(1.97)
    assert subject.warnings == ["data_full.mat: data.fpsec is stored as text ('1.97'), read as 1.97 Hz"]
    _write_v73(folder / "data_full.mat", {**fields, "fpsec": []})
    with pytest.raises(usp.PipelineError, match="data.fpsec is empty"):
        usp.load_subject(folder)


def test_generic_trace_type_attribute(tmp_path):
    folder = tmp_path / "subject_1"
    folder.mkdir()
    for value, hint, doubt in (("DFF", "dff", False), (b"fluorescence", "fluorescence", False), ("F", None, True)):
        with h5py.File(folder / "traces.h5", "w") as h5:
            h5["traces"] = np.random.default_rng(0).normal(0, 0.05, (5, 200)).astype(np.float32)
            h5["positions"] = np.arange(15, dtype=float).reshape(5, 3)
            h5.attrs.update(frame_rate_hz=2.0, trace_type=value)
        subject = usp.load_subject(folder)
        assert subject.trace_type_hint == hint and bool(subject.warnings) == doubt


def test_permission_denied_in_plain_words(tmp_path, monkeypatch):
    """chmod 000 cannot be tested as root (root reads anything): the refusal of an unreadable file."""
    folder = tmp_path / "subject_1"
    shutil.copytree(SAMPLE / "subject_1", folder)

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(usp, "open", denied, raising=False)
    with pytest.raises(
        usp.PipelineError, match=r"cannot open .*TimeSeries.h5: Permission denied \(check its permissions\)"
    ):
        usp.load_subject(folder)


def test_an_input_layout_is_one_table_entry(tmp_path, monkeypatch):
    """One InputLayout entry is recognised, loaded, sized for shards and named in --help and messages."""

    def load_toy(folder, options):
        trace_file, found = usp._open_trace_file(folder / "cells.h5", "F", True, extra=("xyz",), attrs=("fs",))
        positions, rate = np.asarray(found["xyz"], float), float(found["fs"])
        ids = np.arange(trace_file.num_cells)
        return usp.SubjectData(folder.name, str(folder), trace_file, positions, rate, ids, "dff")

    toy = usp.InputLayout(
        "toy", "cells.h5 (F (T, N), xyz (N, 3), attribute fs)", lambda names: "cells.h5" in names, load_toy,
        lambda folder: usp._dataset_size(folder / "cells.h5", "F"),
    )  # fmt: skip
    monkeypatch.setattr(usp, "INPUT_LAYOUTS", (*usp.INPUT_LAYOUTS, toy))
    folder = tmp_path / "subject_1"
    folder.mkdir()
    with h5py.File(folder / "cells.h5", "w") as h5:
        h5["F"] = np.random.default_rng(0).normal(0, 0.1, (300, 40)).astype(np.float32)
        h5["xyz"] = np.random.default_rng(1).uniform(0, 50, (40, 3)).round()
        h5.attrs["fs"] = 2.0
    subject = usp.load_subject(folder)
    assert (subject.layout, subject.num_cells, subject.num_frames, subject.frame_rate_hz) == ("toy", 40, 300, 2.0)
    assert usp.subject_size(folder) == 40 * 300
    assert "cells.h5 (F (T, N)" in " ".join(usp.build_parser().epilog.split())
    (tmp_path / "subject_2").mkdir()
    with pytest.raises(usp.PipelineError, match="cells.h5"):
        usp.load_subject(tmp_path / "subject_2")


def _atlas_positions(num_cells: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [rng.integers(1, 1407, num_cells), rng.integers(1, 622, num_cells), rng.integers(1, 139, num_cells)]
    )


@pytest.mark.parametrize("v73", [False, True], ids=["v5", "v7.3"])
def test_chen_covariates_read_as_the_file_holds_them(tmp_path, v73):
    from conftest import CHEN_CONDITIONS, chen_fish_fields, write_chen_fish

    fields = chen_fish_fields(320)
    folder = write_chen_fish(tmp_path / "subject_1", _atlas_positions(), 320, fields, v73=v73)
    subject = usp.load_subject(folder, usp.LoadOptions("registered"))
    covariates = subject.covariates
    assert subject.warnings == []
    np.testing.assert_array_equal(covariates.stimulus, fields["stim_full"])
    assert covariates.stimulus.dtype == np.int16
    np.testing.assert_array_equal(covariates.behavior, fields["Behavior_full"].T.astype(np.float32))
    np.testing.assert_array_equal(covariates.eye, fields["Eye_full"].T.astype(np.float32))
    assert covariates.condition_names == tuple(name for name, _, _ in CHEN_CONDITIONS)
    np.testing.assert_array_equal(covariates.condition_periods, [period for _, period, _ in CHEN_CONDITIONS])
    expected = np.full(320, -1)
    for index, frames in enumerate(fields["timelists"]):
        expected[frames.astype(int) - 1] = index
    np.testing.assert_array_equal(covariates.condition, expected)
    assert covariates.stimulus_sets[1] == ("PT", (5.0, 6.0))
    frames = np.array([3, 0, 200])
    at = covariates.at(frames)
    np.testing.assert_array_equal(at["behavior"], fields["Behavior_full"].T[frames].astype(np.float32))
    assert set(at) == {"stimulus", "condition", "behavior", "eye"}


def test_chen_covariates_one_condition_and_missing_fields(tmp_path, caplog):
    from conftest import chen_fish_fields, write_chen_fish

    # one stimulus set: scipy squeezes the 1 x 1 cells to their element
    fields = {**chen_fish_fields(130, conditions=(("Spontaneous", 130, 1),)), "Eye_full": None, "stimset": None}
    folder = write_chen_fish(tmp_path / "subject_1", _atlas_positions(), 130, fields)
    with caplog.at_level("INFO"):
        subject = usp.load_subject(folder)
    assert subject.covariates.condition_names == ("Spontaneous",) and (subject.covariates.condition == 0).all()
    assert subject.covariates.eye is None and subject.warnings == []
    skipped = [r.message for r in caplog.records if "covariates are skipped" in r.message]
    assert len(skipped) == 1 and "data.Eye_full, data.stimset" in skipped[0]
    # no stimulus fields at all: an empty Covariates
    folder = write_chen_fish(tmp_path / "subject_2", _atlas_positions(), 50, dict.fromkeys(chen_fish_fields(320)))
    assert usp.load_subject(folder).covariates.arrays() == {}


@pytest.mark.parametrize("v73", [False, True], ids=["v5", "v7.3"])
def test_chen_covariates_of_the_wrong_length_are_left_out_with_a_warning(tmp_path, v73):
    from conftest import chen_fish_fields, write_chen_fish

    fields = chen_fish_fields(320)
    bad = {
        **fields,
        "stim_full": fields["stim_full"][:-1],
        "Behavior_full": fields["Behavior_full"][:, :300],
        "timelists": [*fields["timelists"][:2], fields["timelists"][2] + 300],  # beyond the last frame
    }
    folder = write_chen_fish(tmp_path / "subject_1", _atlas_positions(), 320, bad, v73=v73)
    subject = usp.load_subject(folder)
    covariates = subject.covariates
    assert covariates.stimulus is None and covariates.behavior is None and covariates.condition is None
    assert covariates.eye is not None and covariates.condition_names == ()
    assert len(subject.warnings) == 3
    assert any("data.stim_full has shape (319,), expected one value per frame" in w for w in subject.warnings)
    assert any("data.Behavior_full has shape (5, 300), expected 5 channels x 320 frames" in w for w in subject.warnings)
    assert any("timelists{3} (OMR)" in w and "expected 1-based frames 1..320" in w for w in subject.warnings)
    # periods that do not match the lists are left out, the conditions kept
    folder = write_chen_fish(tmp_path / "subject_2", _atlas_positions(), 320, {**fields, "periods": np.array([4.0])})
    subject = usp.load_subject(folder)
    assert subject.covariates.condition is not None and len(subject.covariates.condition_periods) == 0
    assert len(subject.warnings) == 1 and "data.periods" in subject.warnings[0]


def test_generic_covariates_group_is_passed_through(tmp_path):
    folder = tmp_path / "subject_1"
    covariates = {"speed": np.arange(80.0), "tail": np.ones((80, 3)), "short": np.ones(79)}
    write_generic_fish(folder, **{f"covariates/{name}": data for name, data in covariates.items()})
    subject = usp.load_subject(folder)
    assert set(subject.covariates.extra) == {"speed", "tail"}
    np.testing.assert_array_equal(subject.covariates.at([2, 5])["speed"], [2.0, 5.0])
    assert len(subject.warnings) == 1 and "covariates/short has shape (79,)" in subject.warnings[0]
