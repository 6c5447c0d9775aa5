"""The PDF of plots: every page renders, and the planes page stays readable however many planes."""

import re

import matplotlib
import numpy as np
import pytest

import unified_spike_processing_coo as usp

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_data(num_planes: int, num_cells: int = 600, num_frames: int = 200) -> usp.PlotData:
    rng = np.random.default_rng(0)
    positions = np.column_stack(
        [rng.uniform(0, 400, num_cells), rng.uniform(0, 800, num_cells), np.arange(num_cells) % num_planes]
    ).astype(float)
    grid = usp.make_grid_spec(positions, num_frames, 64, 32, z_markers=False)
    spikes = rng.random((4, num_frames)) < 0.05
    raster_cells, raster_frames = np.nonzero(rng.random((num_cells, num_frames)) < 0.01)
    return usp.PlotData(
        subject="subject_9",
        frame_rate_hz=2.0,
        summary_lines=["a test"],
        cell_ids=np.arange(4),
        dff=rng.normal(size=(4, num_frames)),
        rates=rng.random((4, num_frames)),
        spikes=spikes,
        spike_mode="sample",
        raster_cells=raster_cells,
        raster_frames=raster_frames,
        raster_size=num_cells,
        population_rate_hz=rng.random(num_frames),
        test_spans_frames=[(100, 150)],
        edge_spans_frames=[(0, 10)],
        cell_voxels=grid.cell_voxels,
        cell_spike_counts=rng.poisson(3, num_cells),
        grid=grid,
        noise_level=rng.uniform(1, 5, num_cells),
        model=usp.read_model_folder(usp.BUILTIN_MODEL_DIR),
    )


def panel_titles(num_planes: int) -> list:
    (fig,) = list(usp._page_planes(plt, plot_data(num_planes)))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    plt.close(fig)
    return titles


def test_planes_page_one_panel_per_plane_when_they_fit():
    titles = panel_titles(13)
    assert len(titles) == 13 and titles[0] == "plane 0 (z=0)" and titles[-1] == "plane 12 (z=12)"


@pytest.mark.parametrize("num_planes", [37, 600])
def test_planes_page_pools_neighbouring_planes_beyond_36_panels(num_planes):
    titles = panel_titles(num_planes)
    assert len(titles) <= usp.PLANE_PANELS_MAX
    assert titles[0].startswith("planes 0-")
    covered = []  # every plane in exactly one panel, in order
    for title in titles:
        first, _, last = title.split()[1].partition("-")
        covered.extend(range(int(first), int(last or first) + 1))
    assert covered == list(range(num_planes))


def test_pdf_has_every_page(tmp_path):
    path = tmp_path / "plots.pdf"
    usp.plot_subject_pdf(path, plot_data(5))
    pdf = path.read_bytes()
    pages = re.search(rb"/Count (\d+)", pdf)  # the page tree's count
    assert pdf.startswith(b"%PDF") and int(pages.group(1)) >= 6  # summary, traces (2), spikes, raster, planes, noise


def test_raster_page_shows_conditions_and_behaviour_when_present():
    plain = plot_data(5)
    (fig,) = list(usp._page_raster(plt, plain))
    assert len(fig.axes) == 2
    plt.close(fig)
    spans = [("Spontaneous", 0, 80), ("PT", 84, 150), ("PT", 160, 200)]
    behavior = np.random.default_rng(1).normal(size=(200, 5))
    (fig,) = list(usp._page_raster(plt, usp.dataclasses.replace(plain, condition_spans=spans, behavior=behavior)))
    raster_ax, band_ax, rate_ax, behavior_ax = fig.axes
    assert [t.get_text() for t in band_ax.texts] == ["Spontaneous", "PT", "PT"]
    assert len(band_ax.patches) == 3 and len(behavior_ax.lines) == 5
    plt.close(fig)
