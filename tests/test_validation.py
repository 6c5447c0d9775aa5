"""Bad and doubtful input: one clear error per subject or a recorded warning; other subjects run."""

import io
import os
import shutil

import h5py
import numpy as np
import pytest
import scipy.io
from conftest import OFFLINE_BUILTIN, SAMPLE_DIR, run_cli

import unified_spike_processing_coo as usp

SAMPLE = SAMPLE_DIR
BASE = SAMPLE / "subject_2"  # 500 cells x 1000 frames at 2 Hz; cases use its first CELLS cells
CELLS = 150
SPLIT = "the train/test split"  # not a doubt the cases are about
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _apply(fields: dict, changes: dict) -> dict:
    """``changes``: name -> new value, a function of the old value, or None to remove the field."""
    for key, value in changes.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value(fields[key]) if callable(value) else value
    return fields


def _mat_fields(folder) -> dict:
    data = scipy.io.loadmat(folder / "data_full.mat", squeeze_me=True, struct_as_record=False)["data"]
    return {key: getattr(data, key) for key in data._fieldnames}


def series(file="TimeSeries.h5", **changes):
    """Edit the datasets of an HDF5 file of the subject (a dict value makes a group of that name)."""

    def edit(folder):
        path = folder / file
        with h5py.File(path, "r") as h5:
            datasets, attrs = _apply({key: h5[key][()] for key in h5}, changes), dict(h5.attrs)
        with h5py.File(path, "w") as h5:
            h5.attrs.update(attrs)
            for key, value in datasets.items():
                if isinstance(value, dict):
                    h5.create_group(key)
                else:
                    h5.create_dataset(key, data=value, **({"compression": "gzip"} if np.ndim(value) == 2 else {}))

    return edit


def mat(**changes):
    """Rewrite data_full.mat (MATLAB v5) with fields of ``data`` changed."""

    def edit(folder):
        scipy.io.savemat(folder / "data_full.mat", {"data": _apply(_mat_fields(folder), changes)})

    return edit


def mat73(**changes):
    """Rewrite data_full.mat as MATLAB v7.3 (HDF5, matrices transposed, char as uint16 codes)."""

    def edit(folder):
        fields = _apply(_mat_fields(folder), changes)
        with h5py.File(folder / "data_full.mat", "w", userblock_size=512) as h5:
            group = h5.create_group("data")
            for key, value in fields.items():
                if key in usp.CHEN_COVARIATE_FIELDS:
                    continue  # cells and structs (tests/test_loading.py writes those as v7.3)
                text = isinstance(value, str)
                data = np.array([[ord(c)] for c in value], np.uint16) if text else np.atleast_2d(value).T
                group.create_dataset(key, data=data).attrs["MATLAB_class"] = b"char" if text else b"double"
        with open(folder / "data_full.mat", "r+b") as handle:
            handle.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")

    return edit


def write(name: str, content):
    """Replace a file by bytes, by a folder (content None) or remove it (content False)."""

    def edit(folder):
        path = folder / name
        path.unlink(missing_ok=True)
        if content is None:
            path.mkdir()
        elif content is not False:
            path.write_bytes(content)

    return edit


def damage_chunks(folder):
    """Flip bytes in the middle of TimeSeries.h5 (compressed CellResp chunks): opens, cannot be read."""
    path = folder / "TimeSeries.h5"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes(b ^ 0x5A for b in data[middle : middle + 2000])
    path.write_bytes(bytes(data))


def chen(*edits):
    """A quick Chen 2018 subject (BASE's first CELLS cells), then ``edits`` applied."""

    def build(folder):
        folder.mkdir(parents=True)
        shutil.copy(BASE / "data_full.mat", folder)
        with h5py.File(BASE / "TimeSeries.h5", "r") as src, h5py.File(folder / "TimeSeries.h5", "w") as dst:
            dst.create_dataset("CellResp", data=src["CellResp"][:, :CELLS], compression="gzip")
            dst["absIX"] = src["absIX"][:, :CELLS]
        for edit in edits:
            edit(folder)

    return build


def generic(*edits, positions=lambda p: p, traces=lambda t: t, **attrs):
    """A quick generic subject (traces.h5 from BASE's first CELLS cells, raw fluorescence), then
    ``edits``; ``attrs`` change the file's attributes (None removes one)."""

    def build(folder):
        folder.mkdir(parents=True)
        with h5py.File(BASE / "TimeSeries.h5", "r") as src:
            cell_resp, abs_ix = src["CellResp"][:, :CELLS], src["absIX"][0, :CELLS].astype(int)
        with h5py.File(folder / "traces.h5", "w") as h5:
            h5["traces"] = traces(cell_resp.T)
            h5["positions"] = positions(_mat_fields(BASE)["CellXYZ"][abs_ix - 1])
            h5.attrs.update(_apply({"frame_rate_hz": 2.0}, attrs))
        for edit in edits:
            edit(folder)

    return build


def cellxyz_row_of_first_trace(change):
    """A CellXYZ change applied to the row of the first trace only (absIX[0] = 1)."""

    def edit(xyz):
        xyz = xyz.astype(float)
        xyz[0] = change(xyz[0])
        return xyz

    return edit


def nan_cells_and_frames(resp):
    resp = resp.copy()
    resp[:, :5] = np.nan  # 5 dead cells
    resp[100:110, 5:50] = np.nan  # 10 frames missing in 45 cells
    return resp


def tiled(frames):
    return lambda resp: np.tile(resp, (-(-frames // len(resp)), 1))[:frames]


def subject_file(folder):
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_bytes(b"not a folder")


def broken_link(folder):
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(folder.parent / "nowhere")


def time_attribute(name):
    """An HDF5 attribute of the 'time' class, which h5py cannot read."""

    def edit(folder):
        with h5py.File(folder / "traces.h5", "r+") as h5:
            h5.attrs.pop(name, None)
            h5py.h5a.create(h5.id, name.encode(), h5py.h5t.UNIX_D32LE, h5py.h5s.create(h5py.h5s.SCALAR)).close()

    return edit


def v73_data_array(folder):
    (folder / "data_full.mat").unlink()
    with h5py.File(folder / "data_full.mat", "w") as h5:
        h5["data"] = np.ones(3)


def both_layouts(folder):
    chen()(folder)
    generic()(folder / "generic")
    (folder / "generic" / "traces.h5").rename(folder / "traces.h5")
    (folder / "generic").rmdir()


def unreadable(folder):
    chen()(folder)
    (folder / "TimeSeries.h5").chmod(0)


# (case, build, outcome, words): 'refuse' -> exactly one ERROR line naming the subject and holding
# every word; 'warn' -> processed, a warning holding every word recorded in metadata.h5; 'accept'
# -> processed with no warning but the short-recording split one.
CASES = [
    # files and folders
    ("subject is a file", subject_file, "refuse", ("subject_", "is a file", "expected a folder")),
    ("subject is a broken link", broken_link, "refuse", ("broken link",)),
    ("empty folder", lambda f: f.mkdir(parents=True), "refuse", ("holds no layout", "found: nothing")),
    ("TimeSeries.h5 is a folder", chen(write("TimeSeries.h5", None)), "refuse", ("TimeSeries.h5 is a folder",)),
    ("TimeSeries.h5 empty", chen(write("TimeSeries.h5", b"")), "refuse", ("TimeSeries.h5 is empty (0 bytes)",)),
    ("TimeSeries.h5 not HDF5", chen(write("TimeSeries.h5", b"CellResp\n1,2,3\n" * 50)), "refuse", ("not an HDF5",)),
    (
        "TimeSeries.h5 truncated",
        chen(lambda f: write("TimeSeries.h5", (f / "TimeSeries.h5").read_bytes()[:9000])(f)),
        "refuse",
        ("TimeSeries.h5", "corrupt or truncated"),
    ),
    ("TimeSeries.h5 damaged chunks", chen(damage_chunks), "refuse", ("cannot read CellResp", "damaged")),
    ("TimeSeries.h5 unreadable", unreadable, "refuse", ("TimeSeries.h5", "ermission")),
    ("data_full.mat missing", chen(write("data_full.mat", False)), "refuse", ("data_full.mat is missing",)),
    ("data_full.mat empty", chen(write("data_full.mat", b"")), "refuse", ("data_full.mat is empty",)),
    ("data_full.mat is a folder", chen(write("data_full.mat", None)), "refuse", ("data_full.mat is a folder",)),
    ("data_full.mat not MATLAB", chen(write("data_full.mat", b"x" * 300)), "refuse", ("data_full.mat", "MATLAB")),
    # TimeSeries.h5: CellResp
    ("CellResp missing", chen(series(CellResp=None)), "refuse", ("TimeSeries.h5", "no dataset 'CellResp'")),
    ("CellResp is a group", chen(series(CellResp={})), "refuse", ("CellResp is a group",)),
    ("CellResp 1-D", chen(series(CellResp=lambda r: r[:, 0])), "refuse", ("CellResp has shape (1000,)",)),
    ("CellResp complex", chen(series(CellResp=lambda r: r * (1 + 1j))), "refuse", ("CellResp", "complex")),
    ("CellResp text", chen(series(CellResp=lambda r: r.astype("S8"))), "refuse", ("CellResp", "real numbers")),
    ("CellResp transposed", chen(series(CellResp=lambda r: r.T)), "refuse", ("absIX", "transposed")),
    ("CellResp 1 frame", chen(series(CellResp=lambda r: r[:1])), "refuse", ("CellResp has 1 frames", "128")),
    ("CellResp 65 frames", chen(series(CellResp=lambda r: r[:65])), "refuse", ("65 frames", "predicts 1")),
    (
        "CellResp all NaN",
        chen(series(CellResp=lambda r: r * np.nan)),
        "refuse",
        ("CellResp", "every trace value is NaN"),
    ),
    ("CellResp all zero", chen(series(CellResp=lambda r: r * 0)), "refuse", ("CellResp", "every trace is constant")),
    # TimeSeries.h5: absIX
    ("absIX duplicates", chen(series(absIX=lambda a: a * 0 + 5)), "refuse", ("absIX", "cell 5 150 times")),
    ("absIX fractions", chen(series(absIX=lambda a: a + 0.5)), "refuse", ("absIX", "not whole numbers")),
    ("absIX NaN", chen(series(absIX=lambda a: np.where(a == 3, np.nan, a))), "refuse", ("absIX", "whole numbers")),
    ("absIX strings", chen(series(absIX=lambda a: a.astype(int).astype("S6"))), "refuse", ("absIX", "text")),
    ("absIX 0-based", chen(series(absIX=lambda a: np.arange(CELLS)[None] * 1.0)), "refuse", ("absIX", "0-based")),
    ("absIX out of range", chen(series(absIX=lambda a: np.where(a == 3, 10**6, a))), "refuse", ("absIX", "1..610")),
    ("absIX wrong shape", chen(series(absIX=lambda a: a.reshape(2, -1))), "refuse", ("absIX has shape (2, 75)",)),
    ("absIX too short", chen(series(absIX=lambda a: a[:, :-5])), "refuse", ("absIX lists 145 cells",)),
    ("absIX is a group", chen(series(absIX={})), "refuse", ("absIX is a group",)),
    ("no absIX, counts differ", chen(series(absIX=None)), "refuse", ("no absIX", "do not match")),
    # data_full.mat
    (
        "data not a struct",
        chen(lambda f: scipy.io.savemat(f / "data_full.mat", {"data": np.ones(3)})),
        "refuse",
        ("data_full.mat", "'data'", "expected a struct"),
    ),
    (
        "no data variable",
        chen(lambda f: scipy.io.savemat(f / "data_full.mat", {"fish": 1.0})),
        "refuse",
        ("data_full.mat has no struct 'data'", "fish"),
    ),
    ("v7.3 data is an array", chen(v73_data_array), "refuse", ("data_full.mat", "not a struct")),
    ("fpsec missing", chen(mat(fpsec=None)), "refuse", ("data_full.mat", "no fpsec")),
    (
        "fpsec several values",
        chen(mat(fpsec=np.array([2.0, 2.5, 3.0]))),
        "refuse",
        ("data.fpsec holds 3 values (2, 2.5, 3)",),
    ),
    ("fpsec empty", chen(mat(fpsec=np.zeros(0))), "refuse", ("data.fpsec is empty",)),
    ("fpsec text", chen(mat(fpsec="fast")), "refuse", ("data.fpsec is the text 'fast'",)),
    ("fpsec v7.3 text", chen(mat73(fpsec="fast")), "refuse", ("data.fpsec is the text 'fast'",)),
    ("fpsec complex", chen(mat(fpsec=2 + 1j)), "refuse", ("data.fpsec", "complex")),
    ("fpsec a struct", chen(mat(fpsec={"rate": 2.0})), "refuse", ("data.fpsec", "struct")),
    ("fpsec negative", chen(mat(fpsec=-2.0)), "refuse", ("data.fpsec is -2 Hz",)),
    ("fpsec zero", chen(mat(fpsec=0.0)), "refuse", ("data.fpsec is 0 Hz",)),
    ("fpsec NaN", chen(mat(fpsec=np.nan)), "refuse", ("data.fpsec is nan Hz",)),
    ("fpsec 5 kHz", chen(mat(fpsec=5000.0)), "refuse", ("data.fpsec is 5000 Hz", "between 0.01 and 1000")),
    ("fpsec 0.001 Hz", chen(mat(fpsec=0.001)), "refuse", ("data.fpsec is 0.001 Hz",)),
    ("fpsec 10 Hz (far from the model)", chen(mat(fpsec=10.0)), "refuse", ("10 Hz", "model")),
    ("CellXYZ missing", chen(mat(CellXYZ=None)), "refuse", ("data_full.mat", "no CellXYZ")),
    ("CellXYZ text", chen(mat(CellXYZ=lambda x: np.array(["a", "b", "c"]))), "refuse", ("data.CellXYZ", "text")),
    ("CellXYZ 2 columns", chen(mat(CellXYZ=lambda x: x[:, :2])), "refuse", ("data.CellXYZ has shape", "(cells, 3)")),
    (
        "CellXYZ NaN",
        chen(mat(CellXYZ=cellxyz_row_of_first_trace(lambda r: r * np.nan))),
        "refuse",
        ("data.CellXYZ", "1 of 150 cells have NaN or infinite"),
    ),
    (
        "CellXYZ infinite",
        chen(mat(CellXYZ=cellxyz_row_of_first_trace(lambda r: r + np.inf))),
        "refuse",
        ("data.CellXYZ", "NaN or infinite"),
    ),
    (
        "all cells at one x, y",
        chen(mat(CellXYZ=lambda x: np.c_[x[:, :2] * 0 + 500, x[:, 2]])),
        "refuse",
        ("data.CellXYZ", "one x, y position (500, 500)"),
    ),
    (
        "IX_inval_anat text, no absIX",
        chen(series(absIX=None), mat(IX_inval_anat="1,2,3")),
        "refuse",
        ("data.IX_inval_anat", "text"),
    ),
    # generic traces.h5
    ("generic traces missing", generic(series("traces.h5", traces=None)), "refuse", ("no dataset 'traces'",)),
    ("generic no cells", generic(traces=lambda t: t[:0], positions=lambda p: p[:0]), "refuse", ("empty recording",)),
    ("generic frame_rate_hz missing", generic(frame_rate_hz=None), "refuse", ("lacks attribute frame_rate_hz",)),
    (
        "generic frame_rate_hz text",
        generic(frame_rate_hz="fast"),
        "refuse",
        ("traces.h5: attribute frame_rate_hz is the text 'fast'",),
    ),
    (
        "generic frame_rate_hz two values",
        generic(frame_rate_hz=np.array([2.0, 3.0])),
        "refuse",
        ("frame_rate_hz holds 2 values (2, 3)",),
    ),
    ("generic frame_rate_hz negative", generic(frame_rate_hz=-2.0), "refuse", ("frame_rate_hz is -2 Hz",)),
    ("generic positions 2 columns", generic(positions=lambda p: p[:, :2]), "refuse", ("positions (150, 2)",)),
    ("generic positions text", generic(positions=lambda p: p.astype("S6")), "refuse", ("traces.h5: positions", "text")),
    (
        "generic positions NaN",
        generic(positions=lambda p: np.where(p == p[7], np.nan, p)),
        "refuse",
        ("traces.h5: positions", "NaN or infinite"),
    ),
    (
        "generic frame_rate_hz unreadable",
        generic(time_attribute("frame_rate_hz")),
        "refuse",
        ("traces.h5: cannot read attribute frame_rate_hz", "No NumPy equivalent"),
    ),
    (
        "generic frame_rate_hz empty",
        generic(frame_rate_hz=h5py.Empty("f8")),
        "refuse",
        ("frame_rate_hz holds object data of shape ()",),
    ),
    # doubtful but usable: processed, with a warning
    ("fpsec as text '2'", chen(mat(fpsec="2")), "warn", ("data.fpsec is stored as text ('2')", "2 Hz")),
    ("fpsec v7.3 char '2'", chen(mat73(fpsec="2")), "warn", ("data.fpsec is stored as text ('2')", "2 Hz")),
    ("fpsec repeated", chen(mat(fpsec=np.array([2.0, 2.0, 2.0]))), "accept", ()),
    ("v7.3 MAT file", chen(mat73()), "accept", ()),
    ("integer camera counts", chen(series(CellResp=lambda r: np.round(r).astype(np.uint16))), "accept", ()),
    (
        "some constant traces",
        chen(series(CellResp=lambda r: np.c_[r[:, :10] * 0, r[:, 10:]])),
        "warn",
        ("10 cells have constant traces (e.g. all 0)",),
    ),
    ("dead cells and NaN frames", chen(series(CellResp=nan_cells_and_frames)), "warn", ("5 cells have all-NaN",)),
    (
        "infinite values",
        chen(series(CellResp=lambda r: np.where(r > np.percentile(r, 99.9), np.inf, r))),
        "warn",
        ("infinite trace values",),
    ),
    ("negative fluorescence", chen(series(CellResp=lambda r: r - 2000)), "warn", ("treated as dF/F go below -1",)),
    (
        "absIX lists invalid cells",
        chen(series(absIX=lambda a: np.r_[a[0, :-3], [62, 64, 197]][None])),
        "warn",
        ("3 traces are cells that data.IX_inval_anat marks",),
    ),
    (
        "every cell at one x",
        chen(mat(CellXYZ=lambda x: np.c_[x[:, :1] * 0 + 7, x[:, 1:]])),
        "warn",
        ("every cell has the same x (7)",),
    ),
    (
        "shared positions",
        chen(mat(CellXYZ=lambda x: np.r_[x[:1].repeat(20, 0), x[20:]])),
        "warn",
        ("cells share their x, y, z position",),
    ),
    ("both layouts", both_layouts, "warn", ("several layouts",)),
    ("sample length: no split warning", chen(), "accept", ()),
    (
        "recording longer than its stimulus fields",
        chen(series(CellResp=tiled(1200))),
        "warn",
        ("data.stim_full has shape (1000,), expected one value per frame ((1200,)): left out",),
    ),
    ("generic frame_rate_hz text '2'", generic(frame_rate_hz="2"), "warn", ("frame_rate_hz is stored as text",)),
    ("generic other attribute unreadable", generic(time_attribute("acquired")), "accept", ()),
    (
        "generic trace_type unknown",
        generic(trace_type="raw"),
        "warn",
        ("attribute trace_type is the text 'raw', expected 'dff' or 'fluorescence'",),
    ),
    (
        "generic negative fluorescence",
        generic(traces=lambda t: t - 300, trace_type="fluorescence"),
        "warn",
        ("treated as raw fluorescence go below 0",),
    ),
]
SKIPPED = {"TimeSeries.h5 unreadable": "running as root, which can read any file"} if IS_ROOT else {}
PARAMS = [
    pytest.param(*case, id=case[0], marks=pytest.mark.skipif(case[0] in SKIPPED, reason="root reads any file"))
    for case in CASES
]
CASES = [case for case in CASES if case[0] not in SKIPPED]
GOOD, EARLIER = "subject_1", "subject_2"


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
    """A clean run of two good subjects; then, into the same output folder, a run of the first beside
    every case (subject_10, ...) and the second broken (its input truncated since its outputs)."""
    root = tmp_path_factory.mktemp("validation")
    for name in (GOOD, EARLIER):
        shutil.copytree(SAMPLE / name, root / "clean" / name)
    shutil.copytree(SAMPLE / GOOD, root / "data" / GOOD)
    chen(lambda f: write("TimeSeries.h5", (SAMPLE / EARLIER / "TimeSeries.h5").read_bytes()[:5000])(f))(
        root / "data" / EARLIER
    )
    names = {}
    for number, (case, build, _, _) in enumerate(CASES, start=10):
        names[case] = f"subject_{number}"
        build(root / "data" / names[case])
    options = ("--output_dir", root / "out", "--no_plots", *OFFLINE_BUILTIN)
    run_cli("--input_dir", root / "clean", *options)
    clean = {name: (root / "out" / name / usp.COO_FILENAME).read_bytes() for name in (GOOD, EARLIER)}
    result = run_cli("--input_dir", root / "data", *options, "--overwrite", check=False)
    for path in root.rglob("*"):  # let pytest clean up
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return result, root / "out", names, clean


def _spike_coords(data: bytes) -> np.ndarray:
    with h5py.File(io.BytesIO(data), "r") as h5:
        return h5["spike_coords"][()]


def test_bad_subjects_do_not_disturb_good_ones(grouped_run):
    result, out, names, clean = grouped_run
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 + sum(outcome == "refuse" for _, _, outcome, _ in CASES), "\n".join(errors)
    np.testing.assert_array_equal(
        _spike_coords(clean[GOOD]), _spike_coords((out / GOOD / usp.COO_FILENAME).read_bytes())
    )
    assert (out / EARLIER / usp.COO_FILENAME).read_bytes() == clean[EARLIER], "earlier outputs must survive"
    assert not list(out.rglob("*.tmp-*")), "nothing half-written"
    with h5py.File(out / usp.COMBINED_FILENAME, "r") as combined:  # EARLIER: its earlier outputs
        processed = {names[case] for case, _, outcome, _ in CASES if outcome != "refuse"}
        assert set(combined) == {GOOD, EARLIER} | processed
    with h5py.File(out / GOOD / usp.METADATA_FILENAME, "r") as meta:  # 1100 frames -> 1036 kept, 1 of 3 blocks test
        assert meta.attrs["warnings"] == "" and meta["is_train"][()].sum() == 1036 - 330
    with h5py.File(out / names["some constant traces"] / usp.METADATA_FILENAME, "r") as meta:
        assert meta.attrs["trace_type"] == "fluorescence"  # flat cells do not sway the decision
    with h5py.File(out / names["dead cells and NaN frames"] / usp.METADATA_FILENAME, "r") as meta:
        valid = meta["cells/valid"][()]
        assert valid[:5].sum() == 0 and valid[5:].all() and meta["cells/spike_count"][:5].sum() == 0


@pytest.mark.parametrize("case, build, outcome, words", PARAMS)
def test_each_doubtful_input(grouped_run, case, build, outcome, words):
    result, out, names, _ = grouped_run
    name = names[case]
    errors = [line for line in result.stderr.splitlines() if f" ERROR {name}: " in line]
    metadata = out / name / usp.METADATA_FILENAME
    if outcome == "refuse":
        assert len(errors) == 1, result.stderr[-3000:]
        assert all(word in errors[0] for word in words), errors[0]
        assert not metadata.exists()
        return
    assert not errors, errors
    with h5py.File(metadata, "r") as meta:
        doubts = [w for w in meta.attrs["warnings"].split("; ") if w and not w.startswith(SPLIT)]
        assert meta.attrs["frame_rate_hz"] == 2.0
    if outcome == "warn":
        assert any(all(word in doubt for word in words) for doubt in doubts), doubts
    else:
        assert not doubts
