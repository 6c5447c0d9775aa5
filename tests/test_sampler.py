"""spike_sampler: random windows across fish equal slicing the whole files, respect the split, are deterministic,
pad cells with a mask, run in DataLoader workers, read 1.2 files, and train a tiny model (issue 26)."""

import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

import spike_sampler as ss
import unified_spike_processing_coo as usp

GRID = (6, 10, 8)  # (Z, H, W) of every fish's grid


def split_codes(num_timepoints: int, seed: int) -> np.ndarray:
    """Runs of train, validation, test and padding (-1) timepoints of random lengths (as issue 25's files)."""
    rng = np.random.default_rng(seed)
    codes = []
    while len(codes) < num_timepoints:
        codes += [int(rng.choice([0, 0, 0, 1, 2, -1]))] * int(rng.integers(3, 40))
    return np.array(codes[:num_timepoints], np.int8)


def fish_spikes(num_cells: int, num_timepoints: int, rng, scratch) -> usp.SubjectSpikes:
    """CASCADE-like float16 rates (some NaN) of two batches of cells, as the workers leave them: the rates in a
    scratch array at ``scratch``, the rest in the batches' results."""
    rates = rng.gamma(0.3, 0.2, (num_cells, num_timepoints)).astype(np.float16)
    rates[rng.random(rates.shape) < 0.3] = 0
    rates[: num_cells // 5, :3] = np.nan  # no prediction
    store = usp.ScratchArray.create(scratch, (num_timepoints, num_cells), "float16")
    batches, bounds = [], [0, num_cells // 2, num_cells]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        cells = usp.CellResults.from_arrays(dict.fromkeys(usp.CellResults.names(), np.zeros(stop - start)))
        plot = usp.PlotTraces(np.zeros(0, np.int64), *(np.zeros((0, num_timepoints), d) for d in ("f4", "f4", bool)))
        empty = np.zeros(0, np.int32)
        rate_sum = np.zeros(num_timepoints, np.int64)
        batches.append(usp.BatchResult(start, empty, empty, cells, rate_sum, plot))
        store.write_columns(start, rates[start:stop])
    return usp.SubjectSpikes(batches, num_timepoints, num_timepoints, store)


def write_fish(folder, num_cells: int, num_timepoints: int, seed: int, split=True, legacy=False, codes=None):
    """A subject folder with cell_activity.h5 and preaugmented_grids_coo.h5 written by the pipeline's writers
    (write_cell_activity, write_coo_file), covariates included; ``split``: add issue 25's `split` dataset;
    ``legacy``: as 1.2 wrote them: spike_rates in 16 timepoints x all cells, gzip + shuffle; no `split`; no
    spike_zxy (the grid's windows inflate spike_coords)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    codes = split_codes(num_timepoints, seed) if codes is None else codes
    frames = np.arange(num_timepoints)
    grid = usp.GridSpec(num_timepoints, *GRID, np.arange(GRID[0], dtype=float), np.zeros((num_cells, 3), np.int32))
    plan = usp.GridPlan(grid, frames, frames, np.ones(num_timepoints, bool), (codes == 0).astype(np.uint8),
                        np.zeros(0, np.int64), True, "test split", frames / 3.0)  # fmt: skip
    condition = (frames // 25 % 3 - 1).astype(np.int16)
    covariates = usp.Covariates(
        stimulus=rng.integers(0, 5, num_timepoints).astype(np.float64), condition=condition,
        condition_names=("a", "b"), behavior=rng.normal(size=(num_timepoints, 5)).astype(np.float32),
        clock="timepoints",
    )  # fmt: skip
    subject = SimpleNamespace(
        name=folder.name, raw_positions=rng.uniform(0, 100, (num_cells, 3)), registered_positions=None,
        cell_ids=np.arange(1, num_cells + 1, dtype=np.int64),
    )  # fmt: skip
    fingerprint = {"inputs": {}, "cascade_params": {}, "model": "test", "software_version": usp.__version__}
    attrs = {"subject": folder.name, "fingerprint": fingerprint, "trace_type": "dff", "trace_type_reason": "test",
             "num_original_frames": num_timepoints}  # fmt: skip
    scratch = folder / ".rates.scratch"
    spikes = fish_spikes(num_cells, num_timepoints, rng, scratch)
    usp.write_cell_activity(folder / usp.CELL_ACTIVITY_FILENAME, spikes, plan, subject, attrs, covariates)
    scratch.unlink()
    shape = (num_timepoints, *GRID)
    linear = np.flatnonzero(rng.random(int(np.prod(shape))) < 0.03)
    coords = np.stack(np.unravel_index(linear, shape), axis=1).astype(np.int32)
    usp.write_coo_file(folder / usp.COO_FILENAME, [(coords, usp.CooCounts(spike_pixels=len(coords)))], plan,
                       {"format": "COO_sparse"}, covariates)  # fmt: skip
    for name in (usp.CELL_ACTIVITY_FILENAME, usp.COO_FILENAME):
        with h5py.File(folder / name, "r+") as h5:
            for written in ("split", "cell_global_ids"):  # the writers' own: replaced by the test's, or gone (1.2)
                if written in h5:
                    del h5[written]
            if split and not legacy:  # as issue 25 writes it
                h5["split"] = codes
            if legacy and name == usp.COO_FILENAME:
                del h5["spike_zxy"]
            if legacy and name == usp.CELL_ACTIVITY_FILENAME:
                rates = h5["spike_rates"][()]
                del h5["spike_rates"]
                h5.create_dataset("spike_rates", data=rates, chunks=(16, num_cells), compression="gzip",
                                  compression_opts=1, shuffle=True)  # fmt: skip
            if name == usp.CELL_ACTIVITY_FILENAME and split and not legacy:
                h5["cell_global_ids"] = np.arange(num_cells, dtype=np.int64) + 1000 * seed
    return folder


FISH = ((37, 300), (52, 260), (20, 340))  # (cells, timepoints): differing cell counts and lengths


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    for index, (cells, timepoints) in enumerate(FISH):
        write_fish(out / f"fish_{index}", cells, timepoints, seed=index)
    return out


def whole(folder) -> dict:
    with h5py.File(folder / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        found = {name: h5[name][()] for name in ("spike_rates", "timepoint_times_s", "is_train")}
        found["split"] = usp.split_of(h5)
        found["covariates"] = {name: h5["covariates"][name][()] for name in h5["covariates"]}
        found["ids"] = h5["cell_global_ids"][()] if "cell_global_ids" in h5 else None
    with h5py.File(folder / usp.COO_FILENAME, "r") as h5:
        found["dense"] = usp.coo_to_dense_grid(h5["spike_coords"][()], tuple(h5["grid_shape"][()]))
    return found


def test_usable_starts_against_brute_force():
    codes = split_codes(200, 7)
    for code in (0, 1, 2):
        for length, context in [(1, 0), (5, 0), (12, 7), (30, 3)]:
            expected = [s for s in range(200 - context - length + 1)
                        if np.all(codes[s + context : s + context + length] == code)]  # fmt: skip
            np.testing.assert_array_equal(ss.usable_starts(codes, code, length, context), expected)
    assert len(ss.usable_starts(codes, 0, 201)) == 0


@pytest.mark.parametrize("split", ["train", "validation", "test"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_cell_windows_equal_slicing_the_files(outputs, split, dtype):
    sampler = ss.WindowSampler(outputs, "cells", length=9, context=4, split=split, seed=1, num_windows=60, dtype=dtype)
    fish = [whole(subject.path.parent) for subject in sampler.subjects]
    assert sampler.max_cells == 52 and set(sampler.covariates) == {"stimulus", "condition", "behavior"}
    code = ss.SPLIT_CODES[split]
    for index in range(len(sampler)):
        window = sampler[index]
        f, start = fish[window["subject"]], window["start"]
        rows, cells = slice(start, start + 13), f["spike_rates"].shape[1]
        assert window["rates"].dtype == dtype and window["rates"].shape == (13, 52)
        np.testing.assert_array_equal(window["rates"][:, :cells], f["spike_rates"][rows].astype(dtype))
        assert not window["rates"][:, cells:].any() and window["cell_mask"].sum() == cells
        assert window["cell_mask"][:cells].all()
        np.testing.assert_array_equal(window["split"], f["split"][rows])
        assert np.all(window["split"][4:] == code) and window["target_mask"].tolist() == [False] * 4 + [True] * 9
        np.testing.assert_array_equal(window["timepoint_times_s"], f["timepoint_times_s"][rows])
        for name in sampler.covariates:
            np.testing.assert_array_equal(window[f"covariates/{name}"], f["covariates"][name][rows])
        np.testing.assert_array_equal(window["cell_global_ids"][:cells], f["ids"])
        assert np.all(window["cell_global_ids"][cells:] == -1)


def test_windows_at_the_edges_and_all_usable_ones(outputs):
    """Every usable window of every split, the first and last of each file among them, reads as slicing does."""
    for split in ("train", "validation", "test"):
        sampler = ss.WindowSampler(outputs, "cells", length=3, context=2, split=split)
        for subject, info in enumerate(sampler.subjects):
            f = whole(info.path.parent)
            expected = ss.usable_starts(f["split"], ss.SPLIT_CODES[split], 3, 2)
            np.testing.assert_array_equal(info.starts, expected)
            for start in info.starts:
                window = sampler.read(subject, int(start))
                np.testing.assert_array_equal(window["rates"][:, : info.num_cells], f["spike_rates"][start : start + 5])
    reader = usp.CellFile(sampler.subjects[0].path)
    rates = whole(sampler.subjects[0].path.parent)["spike_rates"]
    for start, stop in [(0, 0), (0, 1), (0, 16), (15, 17), (16, 32), (0, len(rates)), (len(rates) - 1, len(rates))]:
        np.testing.assert_array_equal(reader.rates(start, stop), rates[start:stop])
    reader.close()


@pytest.mark.parametrize("kind", ["grid", "planes"])
@pytest.mark.parametrize("dense", [True, False])
def test_grid_and_plane_windows_equal_slicing_the_grid(outputs, kind, dense):
    length, context = (6, 2) if kind == "grid" else (20, 5)
    sampler = ss.WindowSampler(outputs, kind, length=length, context=context, split="train", seed=3,
                               num_windows=40, dense=dense)  # fmt: skip
    fish = [whole(subject.path.parent)["dense"] for subject in sampler.subjects]
    rows = length + context
    for index in range(len(sampler)):
        window = sampler[index]
        grid, start = fish[window["subject"]], window["start"]
        split = whole(sampler.subjects[window["subject"]].path.parent)["split"]
        if kind == "grid":
            expected = grid[start : start + rows]
            np.testing.assert_array_equal(window["split"], split[start : start + rows])
        else:
            expected = grid.reshape(-1, *GRID[1:])[start : start + rows]  # the flattened (t, z) planes
            timepoints = (start + np.arange(rows)) // GRID[0]
            np.testing.assert_array_equal(window["timepoint"], timepoints)
            np.testing.assert_array_equal(window["z"], (start + np.arange(rows)) % GRID[0])
            np.testing.assert_array_equal(window["split"], split[timepoints])
        assert np.all(window["split"][context:] == 0)
        if dense:
            np.testing.assert_array_equal(window["grid" if kind == "grid" else "planes"], expected)
        else:
            first = np.repeat(np.arange(rows), np.diff(window["offsets"]))
            coords = np.column_stack([first, window["entries"].T])
            assert window["entries"].dtype == np.uint8
            np.testing.assert_array_equal(coords, np.argwhere(expected))


@pytest.mark.parametrize("kind", ["grid", "planes"])
def test_grids_of_1_2_give_the_same_windows_inflated_or_decoded_in_the_cache(outputs, tmp_path, kind):
    """Files of 1.2 (no spike_zxy): windows inflated from spike_coords, or from cache_dir (z, x, y decoded once
    into a .npy per file), equal those of the files since 1.3 (read from spike_zxy, which need no cache)."""
    old = tmp_path / "old"
    for folder in sorted(outputs.iterdir()):
        (old / folder.name).mkdir(parents=True)
        shutil.copy(folder / usp.COO_FILENAME, old / folder.name)
        with h5py.File(old / folder.name / usp.COO_FILENAME, "r+") as h5:
            del h5["spike_zxy"]
    for dense in (True, False):
        options = dict(length=7, context=2, seed=8, num_windows=30, dense=dense)
        new = ss.WindowSampler(outputs, kind, cache_dir=tmp_path / "unused", **options)
        assert new.decoded == [None] * 3 and not (tmp_path / "unused").exists()
        inflated = ss.WindowSampler(old, kind, **options)
        assert inflated.reader(0).zxy is None
        cached = ss.WindowSampler(old, kind, cache_dir=tmp_path / "cache", **options)
        assert all(path is not None and path.parent == tmp_path / "cache" for path in cached.decoded)
        assert isinstance(cached.reader(0), ss.DecodedGrid)
        for index in range(len(new)):
            a, b, c = new[index], inflated[index], cached[index]
            assert a.keys() == b.keys() == c.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{kind} dense={dense} {key} inflated")
                np.testing.assert_array_equal(a[key], c[key], err_msg=f"{kind} dense={dense} {key} cached")
    decoded = np.load(cached.decoded[0])
    with h5py.File(cached.subjects[0].path, "r") as h5:
        np.testing.assert_array_equal(decoded, h5["spike_coords"][:, 1:].T)
    assert ss.decoded_columns(cached.subjects[0].path, tmp_path / "cache") == cached.decoded[0]  # made once


def test_same_seed_same_windows_and_subjects_weighted_by_usable_windows(outputs):
    make = lambda seed: ss.WindowSampler(outputs, "cells", length=8, seed=seed, num_windows=3000)  # noqa: E731
    a, b, c = make(5), make(5), make(6)
    for x, y in zip(a.plan(), b.plan()):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.plan()[1], c.plan()[1])
    first = [arr.copy() for arr in a.plan()]
    a.set_epoch(1)
    assert not np.array_equal(a.plan()[1], first[1])
    a.set_epoch(0)
    np.testing.assert_array_equal(a.plan()[1], first[1])
    share = np.bincount(a.plan()[0], minlength=3) / 3000
    weights = a.usable_windows / a.usable_windows.sum()
    np.testing.assert_allclose(share, weights, atol=0.04)  # uniform over usable windows: ~0.009 standard error
    for subject, start in zip(*a.plan()):
        assert start in a.subjects[subject].starts


def test_a_1_2_file_is_read(tmp_path):
    """Files of 1.2: no `split` (derived from is_train), spike_rates gzip-compressed (read through HDF5)."""
    folders = [write_fish(tmp_path / "old", 30, 200, seed=4, legacy=True), write_fish(tmp_path / "new", 25, 210, 5)]
    with h5py.File(folders[0] / usp.CELL_ACTIVITY_FILENAME, "r") as h5:
        assert "split" not in h5 and h5["spike_rates"].compression == "gzip"
    old = usp.CellFile(folders[0] / usp.CELL_ACTIVITY_FILENAME)
    assert old._pieces is None
    f = whole(folders[0])
    np.testing.assert_array_equal(old.split, np.where(f["is_train"] == 1, 0, 2))
    np.testing.assert_array_equal(old.rates(17, 60), f["spike_rates"][17:60])
    old.close()
    sampler = ss.WindowSampler(folders, "cells", length=5, split="test", num_windows=30)
    assert not sampler.global_ids and "cell_global_ids" not in sampler[0]
    for index in range(len(sampler)):
        window = sampler[index]
        g = whole(folders[window["subject"]])
        cells = g["spike_rates"].shape[1]
        np.testing.assert_array_equal(window["rates"][:, :cells], g["spike_rates"][window["start"] :][:5])
        assert np.all(window["split"] == 2)


def test_resume_reads_the_1_2_layout_as_the_new_one(tmp_path):
    """read_cell_activity (re-gridding without CASCADE) takes a 1.2 file (gzip rates) as up to date: the layout is
    not in the fingerprint, and it gives the same SubjectSpikes as the new layout."""
    fingerprint = {"inputs": {}, "cascade_params": {}, "model": "test", "software_version": usp.__version__}
    found = []
    for name, legacy in (("old", True), ("new", False)):
        folder = write_fish(tmp_path / name, 30, 120, seed=6, legacy=legacy)
        found.append(
            usp.read_cell_activity(folder / usp.CELL_ACTIVITY_FILENAME, fingerprint, tmp_path / name / "rates")
        )
    (old, old_type), (new, new_type) = found
    assert old_type == new_type
    np.testing.assert_array_equal(old.rates.read_rows(0, 120), new.rates.read_rows(0, 120))


def test_new_files_are_read_straight_from_the_file(outputs):
    """The pipeline's own layout: unfiltered chunks of timepoints x all cells, read without HDF5."""
    path = outputs / "fish_0" / usp.CELL_ACTIVITY_FILENAME
    with h5py.File(path, "r") as h5:
        rates = h5["spike_rates"]
        assert rates.chunks == (usp.CELL_RATE_CHUNK_TIMEPOINTS, 37) and rates.compression is None
        expected = rates[()]
    with usp.CellFile(path) as reader:
        assert reader._pieces is not None
        slot = np.full((40, 50), 7, np.float16)  # a slot wider than the fish: columns 37.. untouched
        reader.rates(3, 43, out=slot)
        np.testing.assert_array_equal(slot[:, :37], expected[3:43])
        assert np.all(slot[:, 37:] == 7)
        with pytest.raises(ValueError, match="out must be a writeable float16 array"):
            reader.rates(0, 5, out=np.zeros((5, 37), np.float32))
        window = usp.load_cell_window(reader, 10, 20)  # a CellFile stands for a path
        np.testing.assert_array_equal(window.rates, expected[10:20].astype(np.float32))


def test_errors_name_the_problem(outputs, tmp_path):
    with pytest.raises(ValueError, match="no window of 400 timepoints"):
        ss.WindowSampler(outputs, "cells", length=400)
    with pytest.raises(ValueError, match="split must be"):
        ss.WindowSampler(outputs, "cells", split="none")
    with pytest.raises(FileNotFoundError, match="no subject folder"):
        ss.WindowSampler(tmp_path, "cells")


def batches_of(loader) -> list:
    return [{key: value.clone() for key, value in batch.items()} for batch in loader]


def test_dataloader_with_two_workers_gives_the_same_batches(outputs):
    torch = pytest.importorskip("torch", reason="PyTorch is optional (not a dependency of the pipeline)")
    sampler = ss.WindowSampler(outputs, "cells", length=16, context=4, seed=2, num_windows=24)
    in_process = batches_of(ss.make_loader(sampler, batch_size=4, num_workers=0))
    workers = batches_of(ss.make_loader(sampler, batch_size=4, num_workers=2))
    assert len(in_process) == len(workers) == 6
    for a, b in zip(in_process, workers):
        assert a.keys() == b.keys() and a["rates"].dtype == torch.float16 and a["rates"].shape == (4, 20, 52)
        for key in a:
            torch.testing.assert_close(a[key], b[key], equal_nan=True, rtol=0, atol=0)
    for index, batch in enumerate(in_process):  # batch b holds windows 4b .. 4b + 3 of the plan
        for slot in range(4):
            window = sampler[4 * index + slot]
            np.testing.assert_array_equal(batch["rates"][slot].numpy(), window["rates"])
    assert sampler._handles.pid in (-1, __import__("os").getpid())  # the parent kept no worker's handles


@pytest.mark.parametrize("kind", ["cells", "planes"])
def test_window_loader_workers_give_the_batches_read_in_process(outputs, kind):
    """The sampler's own workers: batch b is windows b*B .. b*B + B - 1 of the epoch, whatever the workers; an
    iteration left early is drained before the next starts (its slots hold the next iteration's batches)."""
    sampler = ss.WindowSampler(outputs, kind, length=10, context=3, seed=4, num_windows=40)
    in_process = [{k: v.copy() for k, v in batch.items()} for batch in ss.WindowLoader(sampler, 5, workers=0)]
    assert len(in_process) == 8
    with ss.WindowLoader(sampler, 5, workers=2, slots=3) as loader:
        for _ in range(2):
            for index, batch in enumerate(loader):
                expected = in_process[index]
                assert batch.keys() == expected.keys()
                for key in batch:
                    np.testing.assert_array_equal(batch[key], expected[key], err_msg=f"batch {index} {key}")
        iterator = iter(loader)
        next(iterator)  # left early
        sampler.set_epoch(1)
        again = [{k: v.copy() for k, v in batch.items()} for batch in loader]
    sampler_copy = ss.WindowSampler(outputs, kind, length=10, context=3, seed=4, num_windows=40)
    sampler_copy.set_epoch(1)
    for index, batch in enumerate(again):
        for key, value in sampler_copy.read_batch(range(5 * index, 5 * index + 5)).items():
            np.testing.assert_array_equal(batch[key], value)
    assert not np.array_equal(again[0]["start"], in_process[0]["start"])


def test_sparse_windows_as_torch_tensors(outputs):
    torch = pytest.importorskip("torch", reason="PyTorch is optional (not a dependency of the pipeline)")
    sampler = ss.WindowSampler(outputs, "grid", length=5, dense=False, num_windows=8)
    windows = next(iter(ss.make_loader(sampler, batch_size=4, num_workers=0)))
    for window in windows:
        tensor = ss.to_sparse_tensor(window, (5, *GRID))
        expected = whole(sampler.subjects[int(window["subject"])].path.parent)["dense"]
        start = int(window["start"])
        np.testing.assert_array_equal(tensor.to_dense().numpy(), expected[start : start + 5])
        assert tensor.is_coalesced() and torch.equal(tensor.coalesce().indices(), tensor.indices())


def test_a_tiny_model_trains_over_three_fish_on_cpu(outputs):
    """A few optimiser steps through the sampler's DataLoader (2 workers): the loss falls."""
    torch = pytest.importorskip("torch", reason="PyTorch is optional (not a dependency of the pipeline)")
    torch.manual_seed(0)
    sampler = ss.WindowSampler(outputs, "cells", length=8, context=8, seed=0, num_windows=64)
    model = torch.nn.Linear(sampler.max_cells, sampler.max_cells)  # next-timepoint rates from the context's mean
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    losses, seen = [], set()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in ss.make_loader(sampler, batch_size=8, num_workers=2):
            rates = torch.nan_to_num(batch["rates"].float())
            mask = batch["cell_mask"][:, None, :].float()
            prediction = model(rates[:, :8].mean(dim=1))[:, None, :]
            loss = (((prediction - rates[:, 8:]) ** 2) * mask).sum() / mask.sum() / 8
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            seen.update(batch["subject"].tolist())
    assert seen == {0, 1, 2} and len(losses) == 24
    assert np.mean(losses[-6:]) < np.mean(losses[:3])


@pytest.fixture(scope="module")
def docs_outputs(tmp_path_factory):
    """Three fish long enough for the docs' windows: 900 train timepoints, then 50 validation and 50 test."""
    out = tmp_path_factory.mktemp("docs_outputs")
    codes = np.repeat(np.array([0, 1, 2], np.int8), [900, 50, 50])
    for index, cells in enumerate((30, 45, 60)):
        write_fish(out / f"fish_{index}", cells, 1000, seed=10 + index, codes=codes)
    return out


def test_docs_training_examples_run(docs_outputs):
    """docs/outputs.md's "Training with it" examples run as written (on CPU here; "out" is these three fish)."""
    torch = pytest.importorskip("torch", reason="PyTorch is optional (not a dependency of the pipeline)")
    from conftest import REPO_DIR

    text = (REPO_DIR / "docs" / "outputs.md").read_text().split("## Training with it", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in text.split("```python")[1:]]
    assert len(blocks) == 3
    namespaces = []
    for block in blocks:
        namespace: dict = {}
        exec(compile(block.replace('"out"', repr(str(docs_outputs))), "docs/outputs.md", "exec"), namespace)
        namespaces.append(namespace)
    first, second, third = namespaces
    assert third["rates"].shape == (16, 48, 60) and third["rates"].dtype == torch.float32
    assert first["device"] in ("cpu", "cuda") and torch.isfinite(first["loss"])
    assert first["rates"].shape == (8, 64, 60) and first["sampler"].max_cells == 60
    assert tuple(second["images"].shape) == (8, 64, *GRID[1:])
    assert len(second["grids"]) == 4 and second["grids"][0].shape == (100, *GRID)


def test_the_window_benchmark_runs_on_a_tiny_fish(tmp_path):
    """benchmarks/benchmark_windows.py --training_only, as RESULTS_pipeline.md ran it, on fish small enough for a
    test: every case of issue 26's targets gets a row of figures (the numbers themselves are not tested)."""
    pytest.importorskip("torch", reason="the benchmark's loader rows use torch's DataLoader")
    import subprocess
    import sys

    from conftest import REPO_DIR

    tiny = ["--shape", "700", "3", "16", "8", "--entries", "20000", "--cells", "60", "--timepoints", "700",
            "--windows", "3", "--workers", "1", "--cell_lengths", "1", "48", "--length", "20"]  # fmt: skip
    result = subprocess.run([sys.executable, REPO_DIR / "benchmarks" / "benchmark_windows.py", "--training_only",
                             "--folder", tmp_path, *tiny], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 8 and cells[1][:1].isdigit():
            rows[cells[0]] = [float(cell) for cell in cells[1:] if cell != "-"]
    for case in ("cells 48 tp, float16 into a reused buffer", "64-plane sequence, sparse (offsets + x, y)",
                 "grid 20 tp, sparse, compact (offsets + z, x, y uint8)",
                 "grid 20 tp, sparse, compact (offsets + z, x, y uint8), 1.2 layout (inflating spike_coords)",
                 "sampler, 3 subjects, cells 48 tp, own workers (WindowLoader), 1 workers, batches of 16",
                 "sampler, 3 subjects, cells 48 tp, DataLoader, 1 workers, batches of 16"):  # fmt: skip
        assert case in rows, f"{case!r} missing from:\n{result.stdout}"
        median_ms, *_, windows_per_s, _, _, ratio = rows[case]
        assert median_ms >= 0 and windows_per_s > 0 and ratio >= 0, (case, rows[case])  # printed to 0.01 ms
