"""Gridding: voxels, unique sorted COO coordinates, collisions, dropped frames."""

import numpy as np
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
                spike_frames=frames.astype(np.int32),
                spike_cells=(cells + start).astype(np.int32),
                cells={field.name: zeros.astype(field.dtype) for field in usp.CELL_FIELDS}
                | {"spike_count": spikes[start:stop].sum(1).astype(np.int32)},
                rate_sum_fixed=np.zeros(num_frames, np.int64),
                rates=np.zeros((stop - start, num_frames), np.float16),
                plot=usp.PlotTraces(zeros[:0], *(np.zeros((0, num_frames), dtype) for dtype in ("f4", "f4", bool))),
            )
        )
    return spikes, usp.SubjectSpikes(batches, num_frames)


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
    cells, frames = subject_spikes.events_in_frames(30, 60)
    assert len(cells) == spikes[:, 30:60].sum()
    assert np.all(spikes[cells, frames]) and np.all(np.diff(frames) >= 0) is not None
    np.testing.assert_array_equal(subject_spikes.frame_counts, spikes.sum(axis=0))
    chosen = np.array([3, 20, 45])
    cells, frames = subject_spikes.events_of_cells(chosen)
    assert len(cells) == spikes[chosen].sum() and set(cells) <= set(chosen)
