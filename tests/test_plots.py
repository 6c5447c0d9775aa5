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
        timepoint_rate_hz=2.0,
        summary_lines=["a test"],
        cell_ids=np.arange(4),
        dff=rng.normal(size=(4, num_frames)),
        rates=rng.random((4, num_frames)),
        spikes=spikes,
        spike_mode="sample",
        raster_cells=raster_cells,
        raster_timepoints=raster_frames,
        raster_size=num_cells,
        population_rate_hz=rng.random(num_frames),
        test_spans=[(100, 150)],
        edge_spans=[(0, 10)],
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


def figure_texts(fig) -> str:
    """Every title and free text of a figure (suptitle, fig.text, axes titles), one per line."""
    texts = [t.get_text() for t in fig.texts] + [ax.get_title() for ax in fig.axes]
    if fig._suptitle is not None:
        texts.append(fig._suptitle.get_text())
    return "\n".join(texts)


# What each page shows, in order: the page functions' rule is one summary page, one traces page per
# trace kind (dF/F, CASCADE rate), one page each for the binary spikes, the raster, the planes (one
# page however many planes: beyond PLANE_PANELS_MAX panels they are pooled) and the noise levels.
TRACE_KINDS = ("dF/F of 4 cells", "CASCADE spike rate of 4 cells")
EXPECTED_PAGES = [
    ("subject_9", "a test"),  # summary: the subject and its summary lines
    *((f"subject_9: {kind}",) for kind in TRACE_KINDS),
    ("subject_9: binary spikes (sample) of the same cells",),
    ("subject_9: spikes of 600 random cells",),
    ("subject_9: spike counts per cell in each plane",),
    ("subject_9: noise levels of 600 cells vs model",),
]


@pytest.mark.parametrize("num_planes", [5, 37])
def test_pdf_has_every_page(tmp_path, monkeypatch, num_planes):
    from matplotlib.backends.backend_pdf import PdfPages

    saved = []  # the texts of each figure as it is saved into the PDF
    original_savefig = PdfPages.savefig

    def recording_savefig(self, figure=None, **kwargs):
        saved.append(figure_texts(figure))
        return original_savefig(self, figure, **kwargs)

    monkeypatch.setattr(PdfPages, "savefig", recording_savefig)
    path = tmp_path / "plots.pdf"
    usp.plot_subject_pdf(path, plot_data(num_planes))
    pdf = path.read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")
    # count the page objects themselves (/Type /Page, not the /Pages tree) and the tree's /Count
    page_objects = re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf)
    (count,) = re.findall(rb"/Count (\d+)", pdf)  # the one page tree (no outlines)
    assert len(page_objects) == int(count) == len(EXPECTED_PAGES)
    assert len(saved) == len(EXPECTED_PAGES)
    for page, (texts, expected) in enumerate(zip(saved, EXPECTED_PAGES)):
        for text in expected:
            assert text in texts, (page, text, texts)


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
