"""Gridding: voxels, unique sorted COO coordinates, collisions, dropped frames."""

import numpy as np
import pytest
from conftest import SAMPLE_DIR

import unified_spike_processing_coo as usp

SAMPLE = SAMPLE_DIR


def test_build_coo_unique_collisions_and_dropped_frames():
    positions = np.array([[0.0, 0, 1], [0.0, 0, 1], [10, 10, 2], [5, 5, 2]])
    grid = usp.make_grid_spec(positions, num_timepoints=3, height=4, width=8)
    np.testing.assert_array_equal(grid.cell_voxels, [[0, 0, 0], [0, 0, 0], [1, 3, 7], [1, 1, 3]])
    frame_to_t = np.array([-1, 0, 1, 2])  # frame 0 dropped
    cells, frames = np.array([0, 1, 2, 3, 2]), np.array([1, 1, 2, 0, 3])
    coords, counts = usp.build_coo(cells, frames, grid, frame_to_t, z_markers=False)
    np.testing.assert_array_equal(coords, [[0, 0, 0, 0], [1, 1, 3, 7], [2, 1, 3, 7]])
    assert counts.collisions == 1 and counts.spikes_in_grid == 4 and counts.spike_pixels == 3


def _random_spikes(num_cells=50, num_frames=120, seed=0):
    """SubjectSpikes made of three batches, as the workers return them (frame-sorted events)."""
    rng = np.random.default_rng(seed)
    spikes = rng.random((num_cells, num_frames)) < 0.2
    batches = []
    for start, stop in ((0, 17), (17, 40), (40, num_cells)):
        frames, cells = np.nonzero(spikes[start:stop].T)
        zeros = np.zeros(stop - start, np.int32)
        batches.append(
            usp.BatchResult(
                start=start,
                spike_timepoints=frames.astype(np.int32),
                spike_cells=(cells + start).astype(np.int32),
                cells=usp.CellResults.from_arrays(
                    dict.fromkeys(usp.CellResults.names(), zeros)
                    | {"spike_count": spikes[start:stop].sum(1).astype(np.int32)}
                ),
                rate_sum_fixed=np.zeros(num_frames, np.int64),
                plot=usp.PlotTraces(zeros[:0], *(np.zeros((0, num_frames), dtype) for dtype in ("f4", "f4", bool))),
            )
        )
    return spikes, usp.SubjectSpikes(batches, num_frames, num_frames)


def test_grid_blocks_equal_one_pass(monkeypatch):
    spikes, subject_spikes = _random_spikes()
    positions = np.random.default_rng(1).random((50, 3)) * [10, 10, 1]
    positions[:, 2] = np.arange(50) % 4
    frame_to_t = np.full(120, -1)
    frame_to_t[10:110] = np.arange(100)
    grid = usp.make_grid_spec(positions, 100, 8, 16)
    cells, frames = np.nonzero(spikes)
    whole, whole_counts = usp.build_coo(cells, frames, grid, frame_to_t)
    plan = usp.GridPlan(
        grid, np.arange(10, 110), frame_to_t, np.ones(120, bool), np.ones(100, np.uint8), np.zeros(0), True
    )
    monkeypatch.setattr(usp, "SPIKES_PER_GRID_BLOCK", 37)  # many small blocks
    blocks = list(usp.coo_blocks(subject_spikes, plan))
    assert len(blocks) > 10
    np.testing.assert_array_equal(np.concatenate([c for c, _ in blocks]), whole)
    total = usp.CooCounts()
    for _, counts in blocks:
        total += counts
    assert total == whole_counts


def test_events_of_subject_spikes_match_dense():
    spikes, subject_spikes = _random_spikes()
    cells, frames = subject_spikes.events_in_timepoints(30, 60)
    assert len(cells) == spikes[:, 30:60].sum()
    assert np.all(spikes[cells, frames]), "every returned event is a spike"
    # exactly the window's spikes, each once (len above + a set equal to the dense one: no duplicates)
    window_cells, window_frames = np.nonzero(spikes[:, 30:60])
    events = set(zip(cells.tolist(), frames.tolist()))
    assert len(events) == len(cells)
    assert events == set(zip(window_cells.tolist(), (window_frames + 30).tolist()))
    # batch after batch, frame-sorted within each (not globally: build_coo sorts the coordinates itself)
    batch = np.searchsorted([17, 40], cells, side="right")
    assert np.all(np.diff(batch) >= 0), "batches in order"
    assert np.all(np.diff(frames)[np.diff(batch) == 0] >= 0), "frame-sorted within a batch"
    np.testing.assert_array_equal(subject_spikes.timepoint_counts, spikes.sum(axis=0))
    chosen = np.array([3, 20, 45])
    cells, frames = subject_spikes.events_of_cells(chosen)
    assert len(cells) == spikes[chosen].sum() and set(cells) <= set(chosen)
    rows, columns = np.nonzero(spikes[chosen])
    assert set(zip(cells.tolist(), frames.tolist())) == set(zip(chosen[rows].tolist(), columns.tolist()))


def _settings(**changes):
    config = usp.PipelineConfig(input_dir="in", output_dir="out", coordinates="registered", **changes)
    return usp.settings_for(usp.GridSettings, config)


def test_atlas_frame_one_atlas_voxel_one_grid_voxel_in_every_fish():
    settings = _settings()
    rng = np.random.default_rng(3)
    shared = np.array([[1, 1, 1], [1406, 621, 138], [700, 300, 70], [6, 5, 3], [7, 6, 4]])
    # two fish: different cells and extents around the same atlas voxels
    fish_a = np.vstack([shared, rng.integers(1, [1407, 622, 139], (50, 3))])
    fish_b = np.vstack([rng.integers([300, 100, 20], [900, 500, 100], (30, 3)), shared])
    grid_a, grid_b = (usp.make_atlas_grid_spec(p, 10, settings) for p in (fish_a, fish_b))
    np.testing.assert_array_equal(grid_a.cell_voxels[:5], grid_b.cell_voxels[-5:])
    assert grid_a.shape == grid_b.shape == (10, 46, 256, 128)
    np.testing.assert_array_equal(grid_a.cell_voxels[:4], [[0, 0, 0], [45, 255, 127], [23, 127, 61], [0, 0, 0]])
    assert grid_a.cell_voxels[4].tolist() == [1, 1, 1]  # atlas voxel 7 starts grid row 1 (5.49 voxels per row)
    np.testing.assert_array_equal(grid_a.z_values[:2], [2.0, 5.0])  # slabs of voxels 1-3, 4-6
    # every voxel of the atlas lands inside the grid, in equal shares per plane
    z = usp.make_atlas_grid_spec(np.column_stack([np.ones(138), np.ones(138), np.arange(1, 139)]), 1, settings)
    np.testing.assert_array_equal(np.bincount(z.cell_voxels[:, 0]), np.full(46, 3))
    assert not z.cells_outside.any()


def test_atlas_frame_cells_outside_are_marked_and_get_no_spikes():
    settings = _settings(atlas_shape=(100, 50, 10), z_planes=5, grid_shape=(10, 10))
    positions = np.array([[1, 1, 1], [0, 5, 5], [101, 5, 5], [50, 25, 11], [100, 50, 10]])
    grid = usp.make_atlas_grid_spec(positions, 4, settings)
    np.testing.assert_array_equal(grid.cells_outside, [False, True, True, True, False])
    cells, frames = np.array([0, 1, 2, 3, 4]), np.array([1, 1, 1, 1, 1])
    coords, counts = usp.build_coo(cells, frames, grid, np.arange(4), z_markers=False)
    np.testing.assert_array_equal(coords, [[1, 0, 0, 0], [1, 4, 9, 9]])
    with pytest.raises(usp.PipelineError, match="z_planes 5 with z markers needs a grid width of at least 6"):
        _settings(atlas_shape=(100, 50, 10), z_planes=5, grid_shape=(10, 5))


def _covariates(num_frames=320):
    from conftest import CHEN_CONDITIONS, chen_fish_fields

    fields = chen_fish_fields(num_frames)
    condition = np.full(num_frames, -1, np.int16)
    for index, frames in enumerate(fields["timelists"]):
        condition[frames.astype(int) - 1] = index
    names = tuple(name for name, _, _ in CHEN_CONDITIONS)
    periods = np.array([period for _, period, _ in CHEN_CONDITIONS])
    return usp.Covariates(condition=condition, condition_names=names, condition_periods=periods), fields


@pytest.mark.parametrize("ratio", [0.95, 0.7, 0.5])
def test_condition_split_keeps_repetitions_whole(ratio):
    covariates, fields = _covariates()
    kept = np.arange(8, 312)  # edge frames dropped
    is_train, _, rule = usp.plan_split(kept, covariates, _settings(split="conditions", split_ratio=ratio))
    assert rule.startswith("conditions")
    condition = covariates.condition[kept]
    for index, period in enumerate(covariates.condition_periods):
        frames = fields["timelists"][index].astype(int) - 1
        repetitions = len(frames) // period
        train_of_frame = dict(zip(kept, is_train))
        per_repetition = [
            {train_of_frame[f] for f in frames[r * period : (r + 1) * period] if f in train_of_frame}
            for r in range(repetitions)
        ]
        if repetitions > 1:  # whole repetitions, the last ones test
            assert all(len(sides) == 1 for sides in per_repetition)
            sides = [sides.pop() for sides in per_repetition]
            num_test = max(1, round(repetitions * (1 - ratio)))
            assert sides == [1] * (repetitions - num_test) + [0] * num_test
        else:  # one long repetition: two contiguous parts, the test part at its end
            mine = is_train[condition == index]
            assert (np.diff(mine.astype(int)) <= 0).all() and (mine == 0).sum() == round(len(mine) * (1 - ratio))
    assert is_train[condition == -1].all()


def test_holdout_condition_all_test_and_unknown_names_refused():
    covariates, _ = _covariates()
    kept = np.arange(320)
    for split in ("conditions", "blocks"):
        is_train, _, rule = usp.plan_split(kept, covariates, _settings(split=split, holdout_condition="omr"))
        assert not is_train[covariates.condition == 2].any() and "condition OMR is test" in rule
        assert is_train[covariates.condition == 0].any() or split == "blocks"  # 320 frames: one test block
    with pytest.raises(usp.PipelineError, match=r"'DF' is not a stimulus condition .*Spontaneous, PT, OMR"):
        usp.plan_split(kept, covariates, _settings(holdout_condition="DF"))
    with pytest.raises(usp.PipelineError, match="has no stimulus conditions"):
        usp.plan_split(kept, usp.Covariates(), _settings(holdout_condition="DF"))


def test_split_blocks_is_the_original_rule_and_conditions_fall_back_without_conditions():
    kept = np.arange(32, 1000)
    original, blocks = usp.train_test_split(len(kept), 330, 0.95, 42)
    for split in ("blocks", "conditions"):
        is_train, test_blocks, rule = usp.plan_split(kept, usp.Covariates(), _settings(split=split))
        np.testing.assert_array_equal(is_train, original)
        np.testing.assert_array_equal(test_blocks, blocks)
        assert rule.startswith("blocks") and ("no stimulus conditions" in rule) == (split == "conditions")


def test_cells_outside_the_atlas_warned_when_few_refused_when_many():
    settings = _settings()
    positions = np.tile([700.0, 300.0, 70.0], (100, 1))
    positions[:3, 0] = 0  # 0-based or failed registrations
    subject = usp.SubjectData("subject_1", ".", None, positions, 2.0, np.arange(100), layout="chen2018")
    subject.trace_file = type("Traces", (), {"num_cells": 100, "num_frames": 10})()
    usp.check_atlas_extent(subject, usp.make_atlas_grid_spec(positions, 10, settings), settings)
    assert subject.warnings == [
        "3 of 100 cells lie outside the atlas extent 1406x621x138 (registration failed?): "
        "they are left out of the grid (voxel_zxy -1)"
    ]
    positions[:20, 2] = 200
    with pytest.raises(
        usp.PipelineError, match="20 of 100 registered positions .* outside the atlas extent 1406x621x138"
    ):
        usp.check_atlas_extent(subject, usp.make_atlas_grid_spec(positions, 10, settings), settings)
