"""Other labs' layouts (suite2p plane folders, CaImAn HDF5, NWB): read as the generic layout reads the same
traces. Fixtures write each file the way its tool does (suite2p's np.save of arrays and pickled dicts,
CaImAn's cnm.save groups with A as a CSC data/indices/indptr/shape group, NWB through pynwb)."""

import shutil

import h5py
import numpy as np
import pytest
from conftest import OFFLINE_BUILTIN, SAMPLE_DIR, run_cli

import unified_spike_processing_coo as usp

RATE_HZ = 2.0
PLANES = 3  # suite2p planes; CELLS_PER_PLANE accepted ROIs each, and REJECTED rejected ones between them
CELLS_PER_PLANE = 16
REJECTED = 4
CELLS = PLANES * CELLS_PER_PLANE


def sample_fluorescence(cells: int = CELLS) -> np.ndarray:
    """(cells, 360) raw fluorescence of the sample fish (its first 360 frames), 2 Hz."""
    with h5py.File(SAMPLE_DIR / "subject_2" / "TimeSeries.h5", "r") as h5:
        return h5["CellResp"][:360, :cells].T.astype(np.float32)


def grid_positions(cells: int = CELLS) -> np.ndarray:
    """[x, y, z] of each cell: x, y on a grid of whole pixels, z the plane (CELLS_PER_PLANE cells a plane)."""
    index = np.arange(cells)
    return np.c_[10 + 3 * (index % 7), 5 + 4 * (index // 7 % 9), index // CELLS_PER_PLANE].astype(float)


def write_generic(folder, traces, positions, trace_type=None):
    folder.mkdir(parents=True)
    with h5py.File(folder / "traces.h5", "w") as h5:
        h5["traces"], h5["positions"] = traces, positions
        h5.attrs["frame_rate_hz"] = RATE_HZ
        if trace_type:
            h5.attrs["trace_type"] = trace_type


# --- suite2p ---------------------------------------------------------------------------------------------


def _square(centre_y, centre_x):
    ypix, xpix = np.meshgrid(np.arange(centre_y - 1, centre_y + 2), np.arange(centre_x - 1, centre_x + 2))
    return ypix.ravel().astype(np.int32), xpix.ravel().astype(np.int32)


def write_suite2p(folder, fluorescence, positions, generation="ops", neucoeff=0.7, direct=False):
    """suite2p's output: plane<k>/ with F, Fneu (ROIs x T float32), iscell (ROIs x 2), stat (object array of
    dicts), and ops.npy (<= 0.14) or settings.npy + db.npy (1.x); rejected ROIs are interleaved with the cells.
    Returns the traces the pipeline must read: F - c * Fneu in float32 of the accepted ROIs."""
    rng = np.random.default_rng(5)
    root = folder if direct else folder / "suite2p"
    expected = []
    for plane in range(PLANES):
        cells = slice(plane * CELLS_PER_PLANE, (plane + 1) * CELLS_PER_PLANE)
        accepted = np.r_[np.ones(CELLS_PER_PLANE), np.zeros(REJECTED)].astype(bool)
        order = rng.permutation(len(accepted))  # rejected ROIs between the cells
        accepted = accepted[order]
        rois = len(accepted)
        neuropil = rng.uniform(20, 40, (rois, fluorescence.shape[1])).astype(np.float32)
        f_raw = np.empty_like(neuropil)
        f_raw[accepted] = fluorescence[cells] + np.float32(neucoeff) * neuropil[accepted]
        f_raw[~accepted] = rng.uniform(50, 60, (REJECTED, fluorescence.shape[1]))
        centres = np.zeros((rois, 2))
        centres[accepted] = positions[cells, :2]
        centres[~accepted] = rng.uniform(0, 60, (REJECTED, 2)).round()
        stat = []
        for y, x in centres.astype(int):
            ypix, xpix = _square(y, x)
            stat.append({"ypix": ypix, "xpix": xpix, "lam": np.full(9, 1 / 9, np.float32), "med": [y, x], "npix": 9})
        probability = np.where(accepted, rng.uniform(0.6, 1.0, rois), rng.uniform(0.0, 0.4, rois))
        out = root / f"plane{plane}"
        out.mkdir(parents=True)
        np.save(out / "F.npy", f_raw)
        np.save(out / "Fneu.npy", neuropil)
        np.save(out / "spks.npy", np.zeros_like(f_raw))
        np.save(out / "iscell.npy", np.c_[accepted.astype(float), probability])
        np.save(out / "stat.npy", np.array(stat, dtype=object))
        ops = {"fs": RATE_HZ, "nplanes": PLANES, "Ly": 64, "Lx": 64, "tau": 1.0}
        if generation == "ops":
            np.save(out / "ops.npy", {**ops, "neucoeff": neucoeff})
        else:  # suite2p 1.x: run settings and the recording's db
            settings = {"fs": RATE_HZ, "tau": 1.0, "extraction": {"neuropil_coefficient": neucoeff, "batch_size": 500}}
            np.save(out / "settings.npy", settings)
            np.save(out / "db.npy", {"nplanes": PLANES, "nchannels": 1, "data_path": ["/raw"]})
        expected.append(f_raw[accepted] - np.float32(neucoeff) * neuropil[accepted])
    (root / "combined").mkdir()  # suite2p's tiled view of all planes: never read
    np.save(root / "combined" / "F.npy", np.zeros((3, 3), np.float32))
    return np.concatenate(expected)


def test_suite2p_planes_both_generations(tmp_path):
    fluorescence, positions = sample_fluorescence(), grid_positions()
    for generation, direct in (("ops", False), ("settings", True)):
        folder = tmp_path / generation
        expected = write_suite2p(folder, fluorescence, positions, generation, direct=direct)
        subject = usp.load_subject(folder)
        assert (subject.layout, subject.num_cells, subject.num_frames) == ("suite2p", CELLS, 360)
        assert subject.frame_rate_hz == RATE_HZ and not subject.warnings
        np.testing.assert_array_equal(subject.positions, positions)  # x = med[0], y = med[1], z = plane
        np.testing.assert_array_equal(subject.read_traces(), expected)
        np.testing.assert_array_equal(subject.trace_file.read_rows(np.array([0, 17, 40])), expected[[0, 17, 40]])
        assert usp.subject_trace_type(subject, "auto").kind == "fluorescence"
        assert usp.subject_size(folder) == PLANES * (CELLS_PER_PLANE + REJECTED) * 360


def test_suite2p_options_and_refusals(tmp_path):
    fluorescence, positions = sample_fluorescence(), grid_positions()
    folder = tmp_path / "fish"
    write_suite2p(folder, fluorescence, positions, neucoeff=0.5)
    by_probability = usp.load_subject(folder, usp.LoadOptions(iscell_threshold=0.0))
    assert by_probability.num_cells == PLANES * (CELLS_PER_PLANE + REJECTED)  # every ROI
    corrected = usp.load_subject(folder, usp.LoadOptions(neuropil_coefficient=0.0))
    plane0 = folder / "suite2p" / "plane0"
    accepted = np.load(plane0 / "iscell.npy")[:, 0] > 0
    np.testing.assert_array_equal(corrected.read_traces(0, CELLS_PER_PLANE), np.load(plane0 / "F.npy")[accepted])
    with pytest.raises(usp.PipelineError, match="no ROI of 3 plane"):
        usp.load_subject(folder, usp.LoadOptions(iscell_threshold=1.0))
    iscell = np.load(plane0 / "iscell.npy")
    np.save(plane0 / "iscell.npy", np.ones((5, 2)))
    with pytest.raises(usp.PipelineError, match=r"iscell.npy has shape \(5, 2\), expected \(20, 2\)"):
        usp.load_subject(folder)
    np.save(plane0 / "iscell.npy", iscell)
    (plane0 / "ops.npy").unlink()
    with pytest.raises(usp.PipelineError, match="neither ops.npy .* nor settings.npy"):
        usp.load_subject(folder)


# --- CaImAn ----------------------------------------------------------------------------------------------


def write_caiman(path, dff, positions, dims=(64, 64, PLANES), accepted_listed=True, with_dff=True):
    """cnm.save(path) of a CNMF whose accepted components are ``dff``'s rows (REJECTED rejected ones between
    them): estimates/ and params/ groups, A as the CSC group (data, indices, indptr, shape) over pixels in
    Fortran order, None saved as the text 'NoneType'. Returns the accepted components' indices."""
    rng = np.random.default_rng(3)
    cells, frames = dff.shape
    components = cells + REJECTED
    accepted = np.sort(rng.choice(components, cells, replace=False))
    columns = []
    f_dff = rng.normal(0, 0.02, (components, frames))
    f_dff[accepted] = dff
    centres = rng.uniform(3, 50, (components, 3)).round()
    centres[:, 2] = centres[:, 2] % dims[2] if len(dims) == 3 else 0
    centres[accepted] = positions
    for centre in centres.astype(int):  # a 3 x 3 square of equal weights in its plane: centre of mass = centre
        ys, xs = _square(centre[0], centre[1])
        index = ys + dims[0] * xs + (dims[0] * dims[1] * centre[2] if len(dims) == 3 else 0)  # Fortran order
        columns.append(np.sort(index))
    import scipy.sparse

    data = np.concatenate([np.full(len(c), 0.3) for c in columns])
    indptr = np.r_[0, np.cumsum([len(c) for c in columns])]
    a = scipy.sparse.csc_matrix((data, np.concatenate(columns), indptr), shape=(int(np.prod(dims)), components))
    with h5py.File(path, "w") as h5:
        for key in ("data", "indices", "indptr", "shape"):
            h5[f"estimates/A/{key}"] = np.asarray(getattr(a.tocsc(), key))
        h5["estimates/C"] = rng.normal(0, 1, (components, frames))
        h5["estimates/F_dff"] = f_dff if with_dff else "NoneType"
        h5["estimates/idx_components"] = accepted if accepted_listed else "NoneType"
        h5["estimates/idx_components_bad"] = np.setdiff1d(np.arange(components), accepted)
        h5["params/data/fr"] = RATE_HZ
        h5["params/data/dims"] = np.array(dims)
        h5["params/data/fnames"] = np.array([b"/raw/movie.tif"])
        h5["dview"] = "NoneType"
    return accepted


def test_caiman_accepted_components_and_centres(tmp_path):
    dff = (sample_fluorescence() / 200.0 - 1).astype(np.float64)
    positions = grid_positions()
    folder = tmp_path / "fish"
    folder.mkdir()
    accepted = write_caiman(folder / "results.hdf5", dff, positions)
    subject = usp.load_subject(folder)
    assert (subject.layout, subject.num_cells, subject.num_frames, subject.frame_rate_hz) == ("caiman", CELLS, 360, 2.0)
    np.testing.assert_allclose(subject.positions, positions)
    np.testing.assert_array_equal(subject.read_traces(), dff.astype(np.float32))
    np.testing.assert_array_equal(subject.trace_file.read_rows(np.array([1, 30])), dff[[1, 30]].astype(np.float32))
    assert usp.subject_trace_type(subject, "auto").kind == "dff"
    assert len(accepted) == CELLS
    write_caiman(folder / "results.hdf5", dff, positions, dims=(64, 64), accepted_listed=False)
    every = usp.load_subject(folder)  # no idx_components: every component; 2-D dims: z = 0
    assert every.num_cells == CELLS + REJECTED and not every.positions[:, 2].any()
    write_caiman(folder / "results.hdf5", dff, positions, with_dff=False)
    with pytest.raises(usp.PipelineError, match=r"no estimates/F_dff .* cnm.estimates.detrend_df_f"):
        usp.load_subject(folder)


# --- NWB -------------------------------------------------------------------------------------------------


def write_nwb(path, traces, positions, container="DfOverF", mask="pixel", timestamps=None, transpose=False):
    """An NWB file written with pynwb: one PlaneSegmentation per plane (voxel masks: one for all) and one
    RoiResponseSeries over the ROIs of every plane, data (time, rois)."""
    from datetime import datetime, timezone

    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.ophys import DfOverF, Fluorescence, ImageSegmentation, OpticalChannel, RoiResponseSeries

    nwb = NWBFile(
        session_description="fish", identifier="fish-1", session_start_time=datetime(2024, 1, 1, tzinfo=timezone.utc)
    )
    device = nwb.create_device(name="microscope")
    channel = OpticalChannel(name="green", description="GCaMP", emission_lambda=510.0)
    plane = nwb.create_imaging_plane(
        name="plane", optical_channel=channel, description="whole brain", device=device, excitation_lambda=488.0,
        imaging_rate=RATE_HZ, indicator="GCaMP6f", location="brain",
    )  # fmt: skip
    ophys = nwb.create_processing_module(name="ophys", description="calcium imaging")
    segmentation = ImageSegmentation()
    ophys.add(segmentation)
    z_values = [0] if mask == "voxel" else sorted(set(positions[:, 2].astype(int)))
    table = segmentation.create_plane_segmentation(description="cells", imaging_plane=plane, name="cells_plane_0")
    tables = [table] + [
        segmentation.create_plane_segmentation(description="cells", imaging_plane=plane, name=f"cells_plane_{z}")
        for z in z_values[1:]
    ]
    for x, y, z in positions.astype(int):
        weights = [(x + dx, y + dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
        target = tables[0] if mask == "voxel" else tables[z]
        if mask == "pixel":
            target.add_roi(pixel_mask=[(a, b, 0.5) for a, b in weights])
        elif mask == "voxel":
            target.add_roi(voxel_mask=[(a, b, z, 0.5) for a, b in weights])
        else:
            image = np.zeros((64, 64))
            image[x - 1 : x + 2, y - 1 : y + 2] = 0.5
            target.add_roi(image_mask=image)
    if len(tables) > 1:  # the RoiResponseSeries covers one table: multi-plane files keep one per plane here
        raise AssertionError("write_nwb: use one plane for pixel and image masks")
    rois = table.create_roi_table_region(description="all cells", region=list(range(len(positions))))
    data = traces.T if not transpose else traces
    timing = {"rate": RATE_HZ} if timestamps is None else {"timestamps": timestamps}
    series = RoiResponseSeries(name="plane0_traces", data=data, rois=rois, unit="n.a.", **timing)
    ophys.add((DfOverF if container == "DfOverF" else Fluorescence)(roi_response_series=series, name=container))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


def test_nwb_masks_types_rates_and_refusals(tmp_path):
    traces = (sample_fluorescence() / 200.0 - 1).astype(np.float32)
    positions = grid_positions()
    flat = positions.copy()
    flat[:, 2] = 0
    folder = tmp_path / "fish"
    folder.mkdir()
    for mask, where in (("pixel", flat), ("image", flat), ("voxel", positions)):
        write_nwb(folder / "fish.nwb", traces, where, mask=mask)
        subject = usp.load_subject(folder)
        assert (subject.layout, subject.num_cells, subject.num_frames, subject.frame_rate_hz) == (
            "nwb",
            CELLS,
            360,
            2.0,
        )
        np.testing.assert_allclose(subject.positions, where, err_msg=mask)
        np.testing.assert_array_equal(subject.read_traces(), traces)
        assert usp.subject_trace_type(subject, "auto").kind == "dff"
    write_nwb(folder / "fish.nwb", traces, flat, container="Fluorescence", timestamps=np.arange(360) / RATE_HZ + 5)
    subject = usp.load_subject(folder)
    assert (
        subject.frame_rate_hz == pytest.approx(RATE_HZ)
        and usp.subject_trace_type(subject, "auto").kind == "fluorescence"
    )
    jitter = np.arange(360) / RATE_HZ + np.random.default_rng(0).uniform(0, 0.2, 360)
    write_nwb(folder / "fish.nwb", traces, flat, timestamps=jitter)
    with pytest.raises(usp.PipelineError, match="timestamps are irregular"):
        usp.load_subject(folder)
    write_nwb(folder / "fish.nwb", traces[:, :40], flat, transpose=True)  # 48 cells x 40 frames stored as is
    with pytest.raises(usp.PipelineError, match=r"data is \(48, 40\) but rois lists 48 ROIs.*transposed"):
        usp.load_subject(folder)


def test_nwb_more_cells_than_frames(tmp_path):
    """Whole-brain data has more cells than frames: the second axis is the ROIs whatever the lengths."""
    rng = np.random.default_rng(1)
    cells = 400
    traces = rng.normal(0, 0.1, (cells, 200)).astype(np.float32)
    positions = np.c_[rng.integers(2, 60, (cells, 2)), np.zeros(cells)].astype(float)
    positions[:, 0] = 2 + np.arange(cells) % 58
    positions[:, 1] = 2 + np.arange(cells) // 58
    folder = tmp_path / "fish"
    folder.mkdir()
    write_nwb(folder / "fish.nwb", traces, positions)
    subject = usp.load_subject(folder)
    assert (subject.num_cells, subject.num_frames) == (cells, 200)
    np.testing.assert_array_equal(subject.read_traces(10, 20), traces[10:20])


# --- the same traces in every layout give the same results ----------------------------------------------


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One run over the same traces in every layout (folders named as labs name them, not subject_<n>):
    raw fluorescence as generic, suite2p (both generations) and NWB Fluorescence; dF/F as generic, CaImAn
    and NWB DfOverF."""
    root = tmp_path_factory.mktemp("layouts")
    data = root / "data"
    fluorescence, positions = sample_fluorescence(), grid_positions()
    expected = write_suite2p(data / "fish_suite2p", fluorescence, positions)
    write_suite2p(data / "fish_suite2p_1x", fluorescence, positions, "settings", direct=True)
    write_generic(data / "fish_generic_f", expected, positions, "fluorescence")
    (data / "fish_nwb_f").mkdir()
    write_nwb(data / "fish_nwb_f" / "fish.nwb", expected, positions, "Fluorescence", mask="voxel")
    dff = (fluorescence / np.median(fluorescence, axis=1, keepdims=True) - 1).astype(np.float32)
    write_generic(data / "fish_generic_dff", dff, positions, "dff")
    (data / "fish_caiman").mkdir()
    write_caiman(data / "fish_caiman" / "cnmf_results.hdf5", dff.astype(np.float64), positions)
    (data / "fish_nwb_dff").mkdir()
    write_nwb(data / "fish_nwb_dff" / "fish.nwb", dff, positions, "DfOverF", mask="voxel")
    (data / "notes").mkdir()
    nwb = ("--nwb", "--nwb_species", "Danio rerio", "--nwb_experimenter", "Doe, Jane")
    result = run_cli("--input_dir", data, "--output_dir", root / "out", "--no_plots", *nwb, *OFFLINE_BUILTIN)
    return result, data, root / "out"


def _results(out, name):
    with h5py.File(out / name / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        cascade = {key: h5[f"cascade/{key}"][()] for key in ("cell_offsets", "spike_frames", "noise_level")}
        cascade["spike_rates"] = h5["spike_rates"][()]
    with h5py.File(out / name / usp.METADATA_FILENAME, "r") as h5:
        meta = {"position": h5["cells/position"][()], "z_values": h5["z_values"][()], **dict(h5.attrs)}
    return cascade, meta


@pytest.mark.parametrize(
    "name, reference",
    [
        ("fish_suite2p", "fish_generic_f"),
        ("fish_suite2p_1x", "fish_generic_f"),
        ("fish_nwb_f", "fish_generic_f"),
        ("fish_caiman", "fish_generic_dff"),
        ("fish_nwb_dff", "fish_generic_dff"),
    ],
)
def test_every_layout_gives_the_generic_layouts_spikes(mixed_run, name, reference):
    _, _, out = mixed_run
    (cascade, meta), (expected, expected_meta) = _results(out, name), _results(out, reference)
    for key in expected:
        np.testing.assert_array_equal(cascade[key], expected[key], err_msg=key)
    assert meta["frame_rate_hz"] == RATE_HZ and meta["num_cells"] == CELLS  # accepted cells only
    assert meta["trace_type"] == expected_meta["trace_type"]
    np.testing.assert_allclose(meta["position"], grid_positions())
    np.testing.assert_array_equal(meta["z_values"], np.arange(PLANES))  # one plane per suite2p plane


def test_folders_of_any_name_are_subjects(mixed_run):
    result, data, out = mixed_run
    assert "not subjects (no layout this pipeline reads): notes" in result.stderr
    with h5py.File(out / usp.COMBINED_FILENAME, "r") as combined:
        assert len(combined) == 7
    names = [folder.name for folder in usp.find_subjects(data)]
    assert names == sorted(names) and "notes" not in names
    layouts = {name: usp.load_subject(data / name).layout for name in names}
    assert layouts["fish_caiman"] == "caiman" and layouts["fish_suite2p_1x"] == "suite2p"


def test_inspect_reports_without_running(mixed_run, tmp_path):
    _, data, _ = mixed_run
    shutil.copytree(data, tmp_path / "data")
    broken = tmp_path / "data" / "fish_caiman_no_dff"
    broken.mkdir()
    write_caiman(broken / "cnmf_results.hdf5", np.zeros((CELLS, 360)), grid_positions(), with_dff=False)
    out = tmp_path / "out"
    result = run_cli("--inspect", "--input_dir", tmp_path / "data", "--output_dir", out, *OFFLINE_BUILTIN, check=False)
    assert result.returncode == 1, result.stderr[-3000:]  # as the run: one subject refused
    assert not out.exists(), "--inspect writes nothing"
    lines = result.stderr.splitlines()
    for name, layout in (("fish_suite2p ", "suite2p"), ("fish_caiman ", "caiman"), ("fish_nwb_f ", "nwb")):
        row = next(line for line in lines if f" {name}| {layout} |" in line)
        assert f"{CELLS} / " in row and "| 360 | 2 | 3.0 |" in row and "builtin" in row, row
    assert any(f" {CELLS} / {PLANES * (CELLS_PER_PLANE + REJECTED)} |" in line for line in lines)
    assert any("fish_caiman_no_dff: REFUSED:" in line and "detrend_df_f" in line for line in lines)
    assert any("Suggested: --workers" in line and "SLURM --mem=" in line for line in lines)
    assert any("this host: float32 matrix products at " in line and " engine " in line for line in lines)
    assert any("WARNING: the train/test split" in line for line in lines)  # doubts the run would record
    assert "not subjects (no layout this pipeline reads): notes" in result.stderr


def test_nwb_output_reads_back_with_the_runs_rates(mixed_run):
    from pynwb import NWBHDF5IO

    _, _, out = mixed_run
    for name in ("fish_suite2p", "fish_caiman"):
        path = out / name / f"{name}_cascade.nwb"
        with h5py.File(out / name / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
            rates, frames = h5["spike_rates"][()].astype(np.float32), h5["timepoint_indices"][()]
        with NWBHDF5IO(str(path), "r") as io:
            nwb = io.read()
            ophys = nwb.processing["ophys"]
            deconvolved = ophys["Deconvolved"]
            np.testing.assert_array_equal(deconvolved.data[:][frames], rates)  # the grid's timepoints
            assert deconvolved.rate == RATE_HZ and "CASCADE" in deconvolved.description
            assert deconvolved.unit == "expected spikes per frame"
            dff = ophys["DfOverF"].roi_response_series["dff"].data[:]
            assert dff.shape == (360, CELLS) and np.isfinite(dff).all()
            cells = ophys["ImageSegmentation"]["cells"]
            np.testing.assert_array_equal(usp._nwb_centres(cells, path), grid_positions())  # as the loader reads them
            assert nwb.subject.species == "Danio rerio" and list(nwb.experimenter) == ["Doe, Jane"]
        if name == "fish_caiman":  # dF/F input: stored as read
            with h5py.File(next((out.parent / "data" / name).glob("*.hdf5")), "r") as h5:
                accepted = h5["estimates/idx_components"][()]
                np.testing.assert_array_equal(dff.T, h5["estimates/F_dff"][()][accepted].astype(np.float32))


def test_nwb_output_passes_nwbinspector(mixed_run):
    """nwbinspector reports nothing but what the input lacks (no institution, no keywords, ...) and its
    orientation check (which flags every whole-brain series: more cells than frames)."""
    nwbinspector = pytest.importorskip("nwbinspector")
    _, _, out = mixed_run
    messages = list(nwbinspector.inspect_nwbfile(nwbfile_path=str(out / "fish_nwb_f" / "fish_nwb_f_cascade.nwb")))
    allowed = {
        "check_data_orientation",
        "check_institution",
        "check_keywords",
        "check_experiment_description",
        "check_subject_sex",
        "check_subject_age",
        "check_subject_exists",
        "check_experimenter_exists",
        "check_related_publications",
        "check_session_start_time_future_date",
    }
    unexpected = [
        f"{m.check_function_name} ({m.object_type}): {m.message}"
        for m in messages
        if m.check_function_name not in allowed and m.object_type != "Subject"  # age, sex, description: not known
    ]
    assert not unexpected, unexpected
