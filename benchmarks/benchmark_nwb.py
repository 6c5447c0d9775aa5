#!/usr/bin/env python3
"""--nwb on a whole fish: what writing the NWB file costs now, against how version 1.2 wrote it.

1.2's writer added the cells one `add_roi` call at a time and read every trace again to recompute dF/F (a second
full pass over the input); the writer now builds the regions of interest as whole columns and reads the dF/F the
workers already made from a scratch array. This script times, on a real-size subject (benchmarks/make_whole_fish.py):

* the regions of interest: `add_roi` per cell (1.2) against `_nwb_cells` (now), both into a fresh NWBFile;
* the dF/F: reading the traces and `compute_dff` over every cell (1.2's second pass) against reading the same dF/F
  back from a ScratchArray a block of rows at a time (now), after writing it once;
* the whole NWB file as the pipeline now writes it (`write_nwb_file`, rates and dF/F from scratch arrays).

    python benchmarks/benchmark_nwb.py --subject /work/data/whole_fish/subject_1 [--cells 90000]

It prints the seconds of each and the host's CPU; the machine's load changes wall times (it is printed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import unified_spike_processing_coo as usp  # noqa: E402


def _timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def _nwb_file():
    from pynwb import NWBFile

    return NWBFile(session_description="benchmark", identifier="benchmark",
                   session_start_time=datetime.datetime.now(datetime.timezone.utc))  # fmt: skip


def rois_per_cell(subject) -> None:
    """1.2's way: one add_roi call per cell."""
    from pynwb.ophys import ImageSegmentation, OpticalChannel

    nwb = _nwb_file()
    device = nwb.create_device(name="microscope")
    channel = OpticalChannel(name="channel", description="unknown", emission_lambda=float("nan"))
    plane = nwb.create_imaging_plane(name="imaging_plane", optical_channel=channel, description="", device=device,
                                     excitation_lambda=float("nan"), imaging_rate=subject.frame_rate_hz,
                                     indicator="unknown", location="unknown")  # fmt: skip
    segmentation = ImageSegmentation(name="ImageSegmentation")
    cells = segmentation.create_plane_segmentation(name="cells", description="", imaging_plane=plane)
    for x, y, z in np.clip(np.round(subject.positions), 0, None).astype(np.uint32):
        cells.add_roi(voxel_mask=[(x, y, z, 1.0)])


def dff_second_pass(subject) -> None:
    """1.2's way: every trace read again and made dF/F, a block of cells at a time."""
    for first in range(0, subject.num_cells, usp.CELLS_PER_CHUNK):
        traces = subject.trace_file.read(first, min(first + usp.CELLS_PER_CHUNK, subject.num_cells))
        usp.compute_dff(traces, subject.frame_rate_hz)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subject", required=True, help="a subject folder (e.g. from make_whole_fish.py)")
    parser.add_argument("--cells", type=int, help="only the first CELLS cells (default: all)")
    args = parser.parse_args()
    subject = usp.load_subject(args.subject)
    if args.cells:
        subject.trace_file = usp.dataclasses.replace(subject.trace_file, num_cells=args.cells)
        subject.positions, subject.cell_ids = subject.positions[: args.cells], subject.cell_ids[: args.cells]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())  # fmt: skip
    print(f"host: {cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{subject.num_cells:,} cells x {subject.num_frames:,} frames")  # fmt: skip
    seconds, _ = _timed(lambda: rois_per_cell(subject))
    print(f"regions of interest, add_roi per cell (1.2): {seconds:.1f} s")
    seconds, _ = _timed(lambda: usp._nwb_cells(_nwb_file(), subject))
    print(f"regions of interest as columns (now): {seconds:.2f} s")
    with tempfile.TemporaryDirectory(dir=REPO.parent) as folder:
        seconds, _ = _timed(lambda: dff_second_pass(subject))
        print(f"dF/F, traces read again and recomputed (1.2's second pass): {seconds:.1f} s")
        trace_type = usp.TraceType("fluorescence", "benchmark")
        settings = usp.InferenceSettings(True, subject.frame_rate_hz, 30.0, 8.0, "1", "sample", 0.5, 42, None, "numpy")
        dff = usp.dff_scratch(subject, trace_type, settings, Path(folder) / "dff")
        seconds, _ = _timed(lambda: [dff.read_rows(r, r + 256) for r in range(0, subject.num_frames, 256)])
        print(f"dF/F read back from the workers' scratch array (now): {seconds:.2f} s")
        rates = usp.ScratchArray.create(Path(folder) / "rates", (subject.num_frames, subject.num_cells), "float16")
        rates.write_rows(0, np.zeros((subject.num_frames, subject.num_cells), np.float16))
        record = usp.SubjectRun(subject, Path(folder), "benchmark", {})
        record.time_base = usp.TimeBase(subject.frame_rate_hz, subject.num_frames)
        record.model, record.trace_type = usp.read_model_folder(usp.BUILTIN_MODEL_DIR), trace_type
        record.spikes = usp.SubjectSpikes([], subject.num_frames, subject.num_frames, rates, dff)
        settings = usp.NwbSettings(True, None, None, (), "1")
        seconds, _ = _timed(lambda: usp.write_nwb_file(Path(folder) / "fish.nwb", record, settings))
        size = (Path(folder) / "fish.nwb").stat().st_size
        print(f"the NWB file as the pipeline now writes it: {seconds:.1f} s, {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
