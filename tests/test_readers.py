"""Window readers: load_coo_window / load_coo_window_dense against slicing the whole file."""

import h5py
import numpy as np
import pytest

import unified_spike_processing_coo as usp

SHAPE = (60, 3, 20, 12)  # (T, Z, H, W)
EMPTY_TIMEPOINTS = (0, 1, 17, 18, 19, 59)  # no entries there: windows may start, end or lie in them


def random_coords(shape: tuple, density: float, seed: int, empty=EMPTY_TIMEPOINTS) -> np.ndarray:
    """Sorted, unique random [t, z, x, y] int32 coordinates, none at the ``empty`` timepoints."""
    rng = np.random.default_rng(seed)
    linear = np.flatnonzero(rng.random(int(np.prod(shape))) < density)
    coords = np.stack(np.unravel_index(linear, shape), axis=1).astype(np.int32)
    return coords[~np.isin(coords[:, 0], empty)]


def write_like_pipeline(path, coords: np.ndarray, shape: tuple, monkeypatch, chunk_rows: int = 64):
    """The file write_coo_file makes (small row chunks, so windows span and split chunks)."""
    monkeypatch.setattr(usp, "COO_CHUNK_ROWS", chunk_rows)
    num_timepoints, num_z, height, width = shape
    grid = usp.GridSpec(num_timepoints, num_z, height, width, np.arange(num_z, dtype=float), np.zeros((0, 3), np.int32))
    frames = np.arange(num_timepoints)
    is_train, test_blocks = usp.train_test_split(num_timepoints, block_frames=10)
    plan = usp.GridPlan(grid, frames, frames, np.ones(num_timepoints, bool), is_train, test_blocks, True)
    bounds = np.searchsorted(coords[:, 0], [0, num_timepoints // 3, num_timepoints // 2, num_timepoints])
    blocks = [(coords[a:b], usp.CooCounts(spike_pixels=b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
    usp.write_coo_file(path, blocks, plan, {"format": "COO_sparse"})
    return path


def as_1_2_wrote_it(path):
    """The pipeline's file without spike_zxy (1.2 wrote none): windows inflate spike_coords."""
    with h5py.File(path, "r+") as h5:
        del h5["spike_zxy"]
    return path


def write_other_layout(path, coords: np.ndarray, shape: tuple, offsets: bool = True, **dataset_options):
    """A COO file written otherwise: other chunks or filters, or without timepoint_offsets (1.0)."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("spike_coords", data=coords, **dataset_options)
        h5.create_dataset("spike_values", data=np.ones(len(coords), np.uint8))
        h5.create_dataset("grid_shape", data=np.asarray(shape, np.int32))
        if offsets:
            counts = np.bincount(coords[:, 0], minlength=shape[0])
            h5.create_dataset("timepoint_offsets", data=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    return path


LAYOUTS = {
    # name: (writer options, timepoint_offsets present)
    "contiguous": (dict(), True),
    "gzip_no_shuffle": (dict(chunks=(50, 1), compression="gzip"), True),
    "lzf_shuffle": (dict(chunks=(50, 1), compression="lzf", shuffle=True), True),
    "row_chunks_of_4": (dict(chunks=(40, 4), compression="gzip", shuffle=True), True),
    "v1.0_auto_chunks": (dict(compression="gzip", compression_opts=4, shuffle=True), False),
    "v1.0_column_chunks": (dict(chunks=(37, 1), compression="gzip", shuffle=True), False),
    "v1.0_contiguous": (dict(), False),
}


@pytest.fixture(params=["pipeline", "pipeline_1.2", *LAYOUTS])
def coo_file(request, tmp_path, monkeypatch):
    """(path, all coordinates, grid shape) in every layout the readers must handle."""
    coords = random_coords(SHAPE, 0.05, seed=1)
    path = tmp_path / f"{request.param}.h5"
    if request.param == "pipeline":
        return write_like_pipeline(path, coords, SHAPE, monkeypatch), coords, SHAPE
    if request.param == "pipeline_1.2":
        return as_1_2_wrote_it(write_like_pipeline(path, coords, SHAPE, monkeypatch)), coords, SHAPE
    options, offsets = LAYOUTS[request.param]
    return write_other_layout(path, coords, SHAPE, offsets, **options), coords, SHAPE


def expected_window(coords: np.ndarray, start: int, stop: int) -> np.ndarray:
    inside = coords[(coords[:, 0] >= start) & (coords[:, 0] < stop)].copy()
    inside[:, 0] -= start
    return inside


def test_pipeline_file_layout_and_offsets(tmp_path, monkeypatch):
    """What the fast path relies on, as write_coo_file writes it; offsets match the t column."""
    coords = random_coords(SHAPE, 0.05, seed=2)
    path = write_like_pipeline(tmp_path / "coo.h5", coords, SHAPE, monkeypatch)
    with h5py.File(path, "r") as h5:
        dataset = h5["spike_coords"]
        assert dataset.chunks == (64, 1) and dataset.dtype == np.dtype("<i4")
        plist = dataset.id.get_create_plist()  # the fast path's filters: shuffle, then deflate, nothing else
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        assert filters == [h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE]
        offsets = h5["timepoint_offsets"][()]
        zxy = h5["spike_zxy"]  # the same z, x, y, unfiltered: what windows are read from
        assert zxy.dtype == np.uint8 and zxy.chunks == (1, 64) and zxy.compression is None and not zxy.shuffle
        np.testing.assert_array_equal(zxy[()], coords[:, 1:].T)
    assert offsets.dtype == np.int64 and offsets.shape == (SHAPE[0] + 1,)
    np.testing.assert_array_equal(offsets, np.searchsorted(coords[:, 0], np.arange(SHAPE[0] + 1)))
    for t in range(SHAPE[0]):
        assert np.all(coords[offsets[t] : offsets[t + 1], 0] == t)


def windows_to_check(num_timepoints: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, num_timepoints + 1, 25)
    random = [(int(a), int(rng.integers(a, num_timepoints + 1))) for a in starts]
    edges = [(0, 1), (0, 5), (0, num_timepoints), (num_timepoints - 1, num_timepoints), (50, num_timepoints)]
    empty = [(0, 2), (17, 20), (59, 60), (0, 0), (30, 30), (num_timepoints, num_timepoints)]
    return random + edges + empty


def test_window_equals_slicing_the_whole_file(coo_file):
    path, coords, shape = coo_file
    whole = usp.load_coo_grid(path)["spike_coords"]
    np.testing.assert_array_equal(whole, coords)
    for start, stop in windows_to_check(shape[0], seed=3):
        window = usp.load_coo_window(path, start, stop)
        expected = expected_window(coords, start, stop)
        assert window.coords.dtype == np.int32 and window.coords.shape == (len(expected), 4)
        np.testing.assert_array_equal(window.coords, expected, err_msg=f"window [{start}, {stop})")
        assert window.shape == (stop - start, *shape[1:]) and (window.start, window.stop) == (start, stop)
        # offsets: rows of window timepoint i, consistent with the coordinates
        counts = np.bincount(expected[:, 0], minlength=stop - start)
        np.testing.assert_array_equal(window.offsets, np.concatenate([[0], np.cumsum(counts)]))
        assert window.offsets.dtype == np.int64


def test_dense_window_equals_coo_to_dense_grid(coo_file):
    path, coords, shape = coo_file
    for start, stop in windows_to_check(shape[0], seed=4):
        dense = usp.load_coo_window_dense(path, start, stop)
        expected = usp.coo_to_dense_grid(expected_window(coords, start, stop), (stop - start, *shape[1:]))
        assert dense.dtype == np.uint8 and dense.shape == (stop - start, *shape[1:])
        np.testing.assert_array_equal(dense, expected, err_msg=f"window [{start}, {stop})")
        np.testing.assert_array_equal(usp.load_coo_window(path, start, stop).to_dense(), expected)
    full = usp.coo_to_dense_grid(coords, shape)
    np.testing.assert_array_equal(usp.load_coo_window_dense(path, 0, shape[0]), full)


def test_dense_window_into_a_reused_buffer(tmp_path, monkeypatch):
    coords = random_coords(SHAPE, 0.05, seed=12)
    path = write_like_pipeline(tmp_path / "coo.h5", coords, SHAPE, monkeypatch)
    buffer = np.ones((10, *SHAPE[1:]), np.uint8)  # stale contents must not survive
    for start in (0, 15, 30, 50):
        dense = usp.load_coo_window_dense(path, start, start + 10, out=buffer)
        assert dense is buffer
        np.testing.assert_array_equal(buffer, usp.load_coo_window_dense(path, start, start + 10))
    wrong = [
        np.zeros((9, *SHAPE[1:]), np.uint8),
        np.zeros((10, *SHAPE[1:]), np.int32),
        np.zeros((10, *SHAPE[1:])[::-1], np.uint8).T,
        np.zeros((10, *SHAPE[1:]), np.uint8)[:, :, ::-1],
    ]
    readonly = np.zeros((10, *SHAPE[1:]), np.uint8)
    readonly.flags.writeable = False
    for out in [*wrong, readonly]:
        with pytest.raises(
            ValueError, match=r"out must be a writeable C-contiguous uint8 array of shape \(10, 3, 20, 12\)"
        ):
            usp.load_coo_window_dense(path, 0, 10, out=out)


def test_values_wider_than_a_byte(tmp_path, monkeypatch):
    """Grids beyond 256 timepoints, rows or columns: the fast path reads two and three low bytes."""
    shape = (300, 2, 300, 70_000)
    rng = np.random.default_rng(5)
    linear = np.unique(rng.integers(0, np.prod(shape, dtype=np.int64), 5000))
    coords = np.stack(np.unravel_index(linear, shape), axis=1).astype(np.int32)
    paths = [
        write_like_pipeline(tmp_path / "pipeline.h5", coords, shape, monkeypatch, chunk_rows=128),
        as_1_2_wrote_it(write_like_pipeline(tmp_path / "pipeline_1.2.h5", coords, shape, monkeypatch, chunk_rows=128)),
        write_other_layout(
            tmp_path / "old.h5", coords, shape, False, chunks=(100, 1), compression="gzip", shuffle=True
        ),
    ]
    with h5py.File(paths[0], "r") as h5:
        assert h5["spike_zxy"].dtype == np.uint32  # y up to 69,999
    for path in paths:
        for start, stop in [(0, 300), (10, 11), (37, 290), (299, 300)]:
            window = usp.load_coo_window(path, start, stop)
            np.testing.assert_array_equal(window.coords, expected_window(coords, start, stop))
            with usp.CooFile(path) as grid:
                offsets, columns = grid.entries(start, stop)
            assert columns.dtype == np.int32 and columns.shape == (3, len(window.coords))
            np.testing.assert_array_equal(columns, window.coords[:, 1:].T)


def test_empty_grid(tmp_path, monkeypatch):
    path = write_like_pipeline(tmp_path / "empty.h5", np.zeros((0, 4), np.int32), SHAPE, monkeypatch)
    window = usp.load_coo_window(path, 3, 9)
    assert window.coords.shape == (0, 4) and window.shape == (6, *SHAPE[1:])
    np.testing.assert_array_equal(window.offsets, np.zeros(7))
    assert not usp.load_coo_window_dense(path, 3, 9).any()


def test_an_open_file_can_be_read_many_times(tmp_path, monkeypatch):
    coords = random_coords(SHAPE, 0.05, seed=6)
    path = write_like_pipeline(tmp_path / "coo.h5", coords, SHAPE, monkeypatch)
    with h5py.File(path, "r") as h5:
        for start in range(0, 50, 7):
            window = usp.load_coo_window(h5, start, start + 10)
            np.testing.assert_array_equal(window.coords, expected_window(coords, start, start + 10))
            assert usp.load_coo_window_dense(h5, start, start + 10).sum() == len(window.coords)
        assert h5.id.valid  # still open: the reader does not close a file it was given


@pytest.mark.parametrize("start, stop", [(-1, 5), (5, 4), (0, SHAPE[0] + 1), (SHAPE[0] + 1, SHAPE[0] + 1), (-3, -1)])
def test_windows_outside_the_grid_are_refused(tmp_path, monkeypatch, start, stop):
    path = write_like_pipeline(tmp_path / "coo.h5", random_coords(SHAPE, 0.05, seed=7), SHAPE, monkeypatch)
    for reader in (usp.load_coo_window, usp.load_coo_window_dense):
        with pytest.raises(ValueError, match=rf"timepoint window \[{start}, {stop}\) is outside .*60 timepoints"):
            reader(path, start, stop)


@pytest.mark.parametrize("start, stop", [(0.0, 5), (0, 5.5), (True, 3), ("0", 3), (None, 3)])
def test_windows_must_be_integers(tmp_path, monkeypatch, start, stop):
    path = write_like_pipeline(tmp_path / "coo.h5", random_coords(SHAPE, 0.05, seed=8), SHAPE, monkeypatch)
    with pytest.raises(TypeError, match="must be an integer timepoint"):
        usp.load_coo_window(path, start, stop)
    assert usp.load_coo_window(path, np.int64(2), np.int32(7)).shape[0] == 5  # numpy integers are integers


def damage(path, name: str, change) -> None:
    """Replace dataset ``name`` of the file by change(its values)."""
    with h5py.File(path, "r+") as h5:
        values = h5[name][()]
        del h5[name]
        h5[name] = change(values)


def test_damaged_offsets_are_reported(tmp_path, monkeypatch):
    path = write_like_pipeline(tmp_path / "coo.h5", random_coords(SHAPE, 0.05, seed=9), SHAPE, monkeypatch)
    damage(path, "timepoint_offsets", lambda offsets: offsets[::-1])  # decreasing, ending beyond the entries
    with pytest.raises(ValueError, match="timepoint_offsets of .* do not match .*rerun the pipeline"):
        usp.load_coo_window(path, 2, 30)
    damage(path, "timepoint_offsets", lambda reversed_offsets: reversed_offsets[::-1][:-1])  # in order, one short
    with pytest.raises(ValueError, match="timepoint_offsets"):
        usp.load_coo_window(path, 2, 30)


def test_damaged_spike_zxy_is_reported(tmp_path, monkeypatch):
    path = write_like_pipeline(tmp_path / "coo.h5", random_coords(SHAPE, 0.05, seed=9), SHAPE, monkeypatch)
    damage(path, "spike_zxy", lambda zxy: zxy[:, :-1])  # one entry short of spike_coords
    with pytest.raises(ValueError, match=r"spike_zxy of .* is \(3, \d+\), not \(3, \d+\).*rerun the pipeline"):
        usp.load_coo_window(path, 2, 30)


def test_windows_as_torch_sparse_tensors(tmp_path, monkeypatch):
    """The README's PyTorch example: a window as a torch.sparse_coo_tensor."""
    torch = pytest.importorskip("torch", reason="PyTorch is optional (not a dependency of the pipeline)")
    coords = random_coords(SHAPE, 0.05, seed=10)
    path = write_like_pipeline(tmp_path / "coo.h5", coords, SHAPE, monkeypatch)
    window = usp.load_coo_window(path, 20, 45)
    tensor = torch.sparse_coo_tensor(
        torch.from_numpy(window.coords.T.astype(np.int64)),
        torch.ones(len(window.coords), dtype=torch.uint8),
        size=window.shape,
    ).coalesce()
    np.testing.assert_array_equal(tensor.indices().numpy().T, window.coords)  # already coalesced order
    np.testing.assert_array_equal(tensor.to_dense().numpy(), usp.load_coo_window_dense(path, 20, 45))


def test_a_chunk_stored_unfiltered_is_read_by_hdf5(tmp_path, monkeypatch):
    """HDF5 may store a chunk with some filters skipped (its filter mask says so): the fast path
    must then leave that column to h5py rather than inflate raw bytes."""
    coords = random_coords(SHAPE, 0.05, seed=11)
    path = as_1_2_wrote_it(write_like_pipeline(tmp_path / "coo.h5", coords, SHAPE, monkeypatch))
    with h5py.File(path, "r+") as h5:
        column = np.zeros(64, np.int32)
        column[: min(64, len(coords))] = coords[:64, 2]
        h5["spike_coords"].id.write_direct_chunk((0, 2), column.tobytes(), filter_mask=0b11)  # no shuffle, no deflate
        assert h5["spike_coords"].id.read_direct_chunk((0, 2))[0] == 0b11
    np.testing.assert_array_equal(usp.load_coo_window(path, 0, SHAPE[0]).coords, coords)
    np.testing.assert_array_equal(usp.load_coo_window(path, 2, 4).coords, expected_window(coords, 2, 4))


# --- load_cell_window: windows of cell_activity.h5 (issue 18) -------------------------------------------------


@pytest.fixture(scope="module")
def cell_activity_file(tmp_path_factory):
    """A cell_activity.h5 as the pipeline writes it: a Chen fish with covariates (one cell with NaN frames)."""
    from conftest import OFFLINE_BUILTIN, chen_fish_fields, run_cli, write_chen_fish

    data, out = tmp_path_factory.mktemp("in"), tmp_path_factory.mktemp("out")
    rng = np.random.default_rng(3)
    positions = np.column_stack([rng.integers(1, 1400, 40), rng.integers(1, 600, 40), rng.integers(1, 130, 40)])
    folder = write_chen_fish(data / "subject_1", positions.astype(float), 320, chen_fish_fields(320))
    with h5py.File(folder / "TimeSeries.h5", "r+") as h5:
        h5["CellResp"][100:103, 5] = np.nan
    run_cli("--input_dir", data, "--output_dir", out, "--no_plots", *OFFLINE_BUILTIN)
    return out / "subject_1" / usp.CELL_ACTIVITY_FILENAME


def test_cell_window_equals_slicing_the_whole_file(cell_activity_file):
    with h5py.File(cell_activity_file, "r") as h5:
        whole = {name: h5[name][()] for name in ("spike_rates", "timepoint_indices", "timepoint_times_s", "is_train")}
        covariates = {name: h5["covariates"][name][()] for name in h5["covariates"]}
    num_timepoints = len(whole["spike_rates"])
    assert np.isnan(whole["spike_rates"]).any() and set(covariates) == {"stimulus", "condition", "behavior", "eye"}
    with h5py.File(cell_activity_file, "r") as h5:
        for start, stop in [(0, 0), (0, 1), (5, 37), (num_timepoints - 1, num_timepoints), (0, num_timepoints)]:
            for source in (cell_activity_file, h5):  # a path, or an open file read many times
                window = usp.load_cell_window(source, start, stop)
                assert window.rates.dtype == np.float32 and window.rates.shape == (stop - start, 40)
                np.testing.assert_array_equal(window.rates, whole["spike_rates"][start:stop].astype(np.float32))
                np.testing.assert_array_equal(window.timepoint_indices, whole["timepoint_indices"][start:stop])
                np.testing.assert_array_equal(window.timepoint_times_s, whole["timepoint_times_s"][start:stop])
                np.testing.assert_array_equal(window.is_train, whole["is_train"][start:stop])
                for name, values in covariates.items():
                    np.testing.assert_array_equal(window.covariates[name], values[start:stop])
                assert (window.start, window.stop) == (start, stop)
        assert h5.id.valid  # the reader does not close a file it was given


def test_cell_windows_outside_the_file_or_not_integers_are_refused(cell_activity_file):
    with h5py.File(cell_activity_file, "r") as h5:
        num_timepoints = h5["spike_rates"].shape[0]
    for start, stop in [(-1, 5), (5, 4), (0, num_timepoints + 1)]:
        with pytest.raises(ValueError, match=rf"timepoint window \[{start}, {stop}\) is outside"):
            usp.load_cell_window(cell_activity_file, start, stop)
    for start, stop in [(0.0, 5), (True, 3), ("0", 3)]:
        with pytest.raises(TypeError, match="must be an integer timepoint"):
            usp.load_cell_window(cell_activity_file, start, stop)
    assert usp.load_cell_window(cell_activity_file, np.int64(2), np.int32(7)).rates.shape[0] == 5


def test_readme_torch_dataset_of_cell_windows(cell_activity_file):
    """docs/outputs.md's PyTorch Dataset over load_cell_window runs as written (on this fish's file)."""
    pytest.importorskip("torch", reason="PyTorch is optional (not a dependency of the pipeline)")
    from conftest import REPO_DIR

    text = (REPO_DIR / "docs" / "outputs.md").read_text()
    code = text.split("## Per-cell rates with their covariates", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    # this fish's 256 timepoints are one test block: read test windows, in this process
    code = code.replace('"out/subject_1/cell_activity.h5"', f"{str(cell_activity_file)!r}, train=False")
    code = code.replace("num_workers=2", "num_workers=0")
    namespace: dict = {}
    exec(compile(code, "docs/outputs.md", "exec"), namespace)
    rates, covariates = next(iter(namespace["loader"]))
    assert tuple(rates.shape) == (8, 64, 40) and tuple(covariates["behavior"].shape) == (8, 64, 5)
