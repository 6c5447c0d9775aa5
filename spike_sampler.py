"""Random training windows across many fish, read at training speed (issue 26).

A ``WindowSampler`` draws windows from the outputs of many subjects (``<output_dir>/<subject>/cell_activity.h5``
or ``preaugmented_grids_coo.h5``) and reads them through one file handle per subject and per process:

* ``kind="cells"``: per-cell rates ``(context + length, N)`` float16 as stored (or float32), padded to the largest
  fish's cells with a ``cell_mask``, with the timepoints' covariates, times and split;
* ``kind="grid"``: grid windows ``(context + length, Z, H, W)``, dense (uint8) or sparse (per-timepoint offsets and
  the entries' z, x, y: the compact form, 3 bytes an entry where the axes fit a byte);
* ``kind="planes"``: sequences of ``context + length`` consecutive (t, z) planes of the flattened grid
  (plane p is timepoint p // Z, plane p % Z), dense ``(P, H, W)`` or sparse.

A window's targets (its last ``length`` rows, or planes) all lie in the chosen split (0 train, 1 validation, 2
test, as the files' ``split`` says; files of 1.2 have only ``is_train``: 1 is train, 0 test); its ``context`` rows
before them may lie in any split, as ZAPBench's do, and padding timepoints (split -1) are never targets. Windows are
drawn uniformly over every usable window of every subject, so a subject weighs as many windows as it has.
Window i of epoch e is the same for a seed whatever reads it (any number of DataLoader workers, in any order).
Files are opened lazily, in the process that reads, and reopened after a fork.

numpy and h5py only; torch is imported by the torch adapters alone (``torch_batches``, ``make_loader``,
``to_sparse_tensor``). Example (docs/outputs.md, "Training with it")::

    sampler = WindowSampler("out", kind="cells", length=48, split="train", seed=0)
    loader = make_loader(sampler, batch_size=16, num_workers=2)
    for batch in loader:
        rates = batch["rates"].to(device).float()  # (16, 48, N_max)
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

import unified_spike_processing_coo as usp

SPLIT_CODES = {"train": 0, "validation": 1, "test": 2, "none": -1}  # the files' `split` (groundwork of issue 25)
KINDS = {"cells": usp.CELL_ACTIVITY_FILENAME, "grid": usp.COO_FILENAME, "planes": usp.COO_FILENAME}


def usable_starts(split: np.ndarray, code: int, length: int, context: int = 0) -> np.ndarray:
    """Starts s (int64, ascending) of the windows [s, s + context + length) inside ``split`` whose targets
    [s + context, s + context + length) all have split ``code``; the context may have any split."""
    inside = np.concatenate([[0], np.cumsum(np.asarray(split) == code, dtype=np.int64)])
    if length < 1 or len(split) < length:
        return np.zeros(0, np.int64)
    whole = np.flatnonzero(inside[length:] - inside[:-length] == length)  # targets [j, j + length) all inside
    return whole[whole >= context] - context


def subject_folders(outputs, filename: str) -> list:
    """Subject folders holding ``filename``: the subfolders of an output folder (sorted by name), or the folders
    given as a list (in that order)."""
    if isinstance(outputs, (str, os.PathLike)):
        root = Path(outputs)
        if (root / filename).is_file():
            return [root]
        folders = sorted(folder for folder in root.iterdir() if (folder / filename).is_file())
        if not folders:
            raise FileNotFoundError(f"no subject folder in {root} holds {filename}: run the pipeline first")
        return folders
    folders = [Path(folder) for folder in outputs]
    for folder in folders:
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"{folder / filename} not found: run the pipeline for this subject")
    return folders


@dataclass(frozen=True)
class SubjectInfo:
    """What the sampler knows of a subject without holding its file open (read once, small)."""

    name: str
    path: Path  # the file read
    num_timepoints: int
    num_cells: int  # cells (kind "cells"), else 0
    grid_shape: tuple  # (T, Z, H, W) (grids), else ()
    split: np.ndarray  # (T,) int8 split codes
    starts: np.ndarray  # usable starts: timepoints, or planes for kind "planes"
    covariates: dict = field(default_factory=dict)  # covariates/ name -> (shape of a row, dtype) (kind "cells")
    global_ids: bool = False  # the file has cell_global_ids


def _subject_info(folder: Path, kind: str, code: int, length: int, context: int) -> SubjectInfo:
    path = folder / KINDS[kind]
    with h5py.File(path, "r") as h5:
        split = usp.split_of(h5)
        if kind == "cells":
            num_cells, grid_shape = int(h5["spike_rates"].shape[1]), ()
            group = h5.get(usp.COVARIATES_GROUP)
            datasets = group.items() if isinstance(group, h5py.Group) else ()
            covariates = {name: (d.shape[1:], d.dtype) for name, d in datasets if isinstance(d, h5py.Dataset)}
            global_ids = "cell_global_ids" in h5
        else:
            num_cells, grid_shape = 0, tuple(int(s) for s in h5["grid_shape"][()])
            covariates, global_ids = {}, False
    per_unit = np.repeat(split, grid_shape[1]) if kind == "planes" else split
    starts = usable_starts(per_unit, code, length, context)
    return SubjectInfo(folder.name, path, len(split), num_cells, grid_shape, split, starts, covariates, global_ids)


@dataclass
class _Handles:
    """This process's open readers, one per subject (never shared across a fork)."""

    pid: int = -1
    readers: dict = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)  # reused buffers (float16 rows before a float32 cast)


class WindowSampler:
    """Random windows across subjects (see the module's docstring). ``outputs``: an output folder (its subject
    folders) or a list of subject folders. ``kind``: "cells", "grid" or "planes"; ``length`` targets and
    ``context`` rows before them (timepoints; planes for "planes"); ``split``: "train", "validation" or "test";
    ``num_windows``: windows per epoch (default: as many as fit side by side in the usable targets); ``dense``:
    grids as dense uint8 blocks (else sparse); ``dtype``: rates as float16 (as stored) or float32; ``cache_dir``:
    grids of 1.2 only (files with spike_zxy hold their z, x, y decoded and need none), a folder where each such COO
    file's z, x, y are decoded once (3 bytes an entry: 0.3 GB for a whole fish), so that windows are copied, not
    inflated (~10x faster; see decoded_columns)."""

    def __init__(self, outputs, kind: str = "cells", length: int = 48, context: int = 0, split: str = "train",
                 seed: int = 0, num_windows: int | None = None, dense: bool = True, dtype=np.float16,
                 cache_dir=None):  # fmt: skip
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
        if length < 1 or context < 0:
            raise ValueError(f"length must be at least 1 and context at least 0, got {length} and {context}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float16, np.float32):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype}")
        self.kind, self.length, self.context, self.split = kind, length, context, split
        self.seed, self.dense = seed, dense
        folders = subject_folders(outputs, KINDS[kind])
        self.subjects = [_subject_info(folder, kind, SPLIT_CODES[split], length, context) for folder in folders]
        counts = np.array([len(subject.starts) for subject in self.subjects], np.int64)
        if not counts.sum():
            raise ValueError(
                f"no window of {length} {'planes' if kind == 'planes' else 'timepoints'} (after {context} of "
                f"context) lies in the {split} split of any of the {len(folders)} subjects: shorten the window"
            )
        self._cumulative = np.concatenate([[0], np.cumsum(counts)])
        self._all_starts = np.concatenate([subject.starts for subject in self.subjects])  # usable window u's start
        self.num_windows = int(num_windows or max(1, counts.sum() // length))
        self.window_rows = context + length
        self.max_cells = max(subject.num_cells for subject in self.subjects)
        # covariates every subject has with one row shape, as the widest of their dtypes
        names = set.intersection(*(set(subject.covariates) for subject in self.subjects))
        specs = {name: [subject.covariates[name] for subject in self.subjects] for name in sorted(names)}
        self.covariates = {
            name: (found[0][0], np.result_type(*(dtype for _, dtype in found)))
            for name, found in specs.items()
            if len({shape for shape, _ in found}) == 1
        }
        self.global_ids = all(subject.global_ids for subject in self.subjects)
        shapes = {subject.grid_shape[1:] for subject in self.subjects}
        self.grid_shape = shapes.pop() if len(shapes) == 1 else None  # (Z, H, W) shared by every subject
        if kind != "cells" and dense and self.grid_shape is None:
            raise ValueError("dense grid windows need one grid shape in every subject; use dense=False")
        self.epoch, self._plan, self._handles = 0, None, _Handles()
        self.decoded = [None] * len(self.subjects)  # per subject: its decoded columns' file (cache_dir)
        if cache_dir is not None and kind != "cells":
            self.decoded = [decoded_columns(subject.path, Path(cache_dir)) for subject in self.subjects]

    @property
    def usable_windows(self) -> np.ndarray:
        """Usable windows per subject (the weights of the subjects)."""
        return np.diff(self._cumulative)

    def __len__(self) -> int:
        return self.num_windows

    def set_epoch(self, epoch: int) -> None:
        """Draw another epoch's windows (call before each epoch, before a DataLoader starts its workers)."""
        self.epoch, self._plan = int(epoch), None

    def plan(self) -> tuple:
        """(subject index, start) arrays of this epoch's windows: drawn uniformly over all usable windows."""
        if self._plan is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            drawn = rng.integers(0, self._cumulative[-1], self.num_windows)
            self._plan = np.searchsorted(self._cumulative, drawn, side="right") - 1, self._all_starts[drawn]
        return self._plan

    def __getitem__(self, index: int) -> dict:
        if not -self.num_windows <= index < self.num_windows:
            raise IndexError(f"window {index} of {self.num_windows}")
        subjects, starts = self.plan()
        return self.read(int(subjects[index]), int(starts[index]))

    def __iter__(self):
        for index in range(self.num_windows):
            yield self[index]

    # --- reading -------------------------------------------------------------------------------------------

    def reader(self, subject: int):
        """This process's CellFile or CooFile of a subject, opened on first use (and again after a fork)."""
        handles = self._handles
        if handles.pid != os.getpid():  # a new process: handles inherited through fork are the parent's
            self._handles = handles = _Handles(os.getpid())
        found = handles.readers.get(subject)
        if found is None:
            opener = usp.CellFile if self.kind == "cells" else usp.CooFile
            found = opener(self.subjects[subject].path)
            if self.decoded[subject] is not None:
                found = DecodedGrid(found, self.decoded[subject])
            handles.readers[subject] = found
        return found

    def close(self) -> None:
        """Close this process's files (they reopen on the next read)."""
        if self._handles.pid == os.getpid():
            for reader in self._handles.readers.values():
                reader.close()
        self._handles = _Handles()

    def __getstate__(self) -> dict:  # pickled to spawned workers: without open files
        return {**self.__dict__, "_handles": _Handles()}

    def empty_batch(self, size: int, allocate=np.empty) -> dict:
        """Arrays for ``size`` windows (dense kinds and cells), to fill with read(..., out=batch, slot=b); read
        writes every element of a slot. ``allocate(shape, dtype)``: where they live (e.g. shared memory)."""
        rows, z, h, w = self.window_rows, *(self.grid_shape or (0, 0, 0))
        shapes = {"subject": ((size,), np.int64), "start": ((size,), np.int64), "split": ((size, rows), np.int8),
                  "target_mask": ((size, rows), np.bool_)}  # fmt: skip
        if self.kind == "cells":
            shapes["rates"] = (size, rows, self.max_cells), self.dtype
            shapes["cell_mask"] = (size, self.max_cells), np.bool_
            shapes["timepoint_times_s"] = (size, rows), np.float64
            if self.global_ids:
                shapes["cell_global_ids"] = (size, self.max_cells), np.int64
            for name, (shape, dtype) in self.covariates.items():
                shapes[f"covariates/{name}"] = (size, rows, *shape), dtype
        elif self.dense:
            dense = ("grid", (size, rows, z, h, w)) if self.kind == "grid" else ("planes", (size, rows, h, w))
            shapes[dense[0]] = dense[1], np.uint8
        if self.kind == "planes":
            shapes["timepoint"] = shapes["z"] = (size, rows), np.int64
        return {name: allocate(shape, np.dtype(dtype)) for name, (shape, dtype) in shapes.items()}

    def read(self, subject: int, start: int, out: dict | None = None, slot: int = 0) -> dict:
        """The window of ``subject`` starting at ``start`` (a timepoint, or a plane for "planes"): a dict of
        arrays, or written into slot ``slot`` of ``out`` (an empty_batch: rates and dense grids are read straight
        into it). Sparse windows come as new arrays: "offsets" (P + 1,) (entries of row i are columns
        offsets[i]:offsets[i + 1]) and "entries" ((3, n) z, x, y for "grid"; (2, n) x, y for "planes")."""
        info, rows = self.subjects[subject], self.window_rows
        single = out is None
        if single:
            out, slot = self.empty_batch(1), 0
        elif self.kind != "cells" and not self.dense:
            raise ValueError("sparse windows are read one at a time: read(subject, start)")
        out["subject"][slot], out["start"][slot] = subject, start
        out["target_mask"][slot] = np.arange(rows) >= self.context
        sparse = {}
        if self.kind == "cells":
            out["split"][slot] = info.split[start : start + rows]
            self._read_cells(subject, start, out, slot)
        elif self.kind == "grid":
            out["split"][slot] = info.split[start : start + rows]
            offsets, columns = self.reader(subject).entries(start, start + rows)
            if self.dense:
                block = out["grid"][slot]
                block.fill(0)
                t = np.repeat(np.arange(rows, dtype=np.int64), np.diff(offsets))
                block.reshape(-1)[usp._linear_index([t, *columns], block.shape)] = 1
            else:
                sparse = {"offsets": offsets, "entries": columns}
        else:
            timepoints, z = np.divmod(start + np.arange(rows), info.grid_shape[1])
            out["timepoint"][slot], out["z"][slot], out["split"][slot] = timepoints, z, info.split[timepoints]
            sparse = self._read_planes(subject, start, None if not self.dense else out["planes"][slot])
        if not single:
            return out
        return {key: value[0] for key, value in out.items()} | sparse

    def _read_cells(self, subject: int, start: int, out: dict, slot: int) -> None:
        info, cells, rows = self.subjects[subject], self.reader(subject), self.window_rows
        rates = out["rates"][slot]
        if self.dtype == np.float16:
            cells.rates(start, start + rows, out=rates)
        else:  # read as stored into a reused buffer, cast into the caller's
            scratch = self._handles.scratch.get(info.num_cells)
            if scratch is None:
                scratch = self._handles.scratch[info.num_cells] = np.empty((rows, info.num_cells), np.float16)
            np.copyto(rates[:, : info.num_cells], cells.rates(start, start + rows, out=scratch))
        rates[:, info.num_cells :] = 0
        out["cell_mask"][slot] = np.arange(self.max_cells) < info.num_cells
        window = slice(start, start + rows)
        out["timepoint_times_s"][slot] = cells.per_timepoint["timepoint_times_s"][window]
        if self.global_ids:
            ids = out["cell_global_ids"][slot]
            ids[: info.num_cells], ids[info.num_cells :] = cells.cell_global_ids, -1
        for name in self.covariates:
            out[f"covariates/{name}"][slot] = cells.covariates[name][window]

    def _read_planes(self, subject: int, start: int, block: np.ndarray | None) -> dict:
        """Planes [start, start + P) into ``block`` (dense), or their sparse form: the entries of the timepoints
        they lie in, cut at the first and last plane (rows are sorted by (t, z), so planes are runs of rows)."""
        info, rows = self.subjects[subject], self.window_rows
        num_z, height, width = info.grid_shape[1:]
        first = start // num_z
        offsets, columns = self.reader(subject).entries(first, (start + rows - 1) // num_z + 1)
        t = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
        plane = t * num_z + columns[0] - (start - first * num_z)  # ascending
        lo, hi = np.searchsorted(plane, [0, rows])
        plane, x, y = plane[lo:hi], columns[1, lo:hi], columns[2, lo:hi]
        if block is None:
            return {"offsets": np.searchsorted(plane, np.arange(rows + 1)).astype(np.int64),
                    "entries": np.ascontiguousarray(columns[1:, lo:hi])}  # fmt: skip
        block.fill(0)
        flat = plane * (height * width)
        flat += x.astype(np.int64) * width
        flat += y
        block.reshape(-1)[flat] = 1
        return {}

    def read_batch(self, indices, allocate=np.empty) -> dict:
        """Windows ``indices`` of this epoch stacked (cells and dense grids): each read straight into its slot of
        arrays made by ``allocate`` (empty_batch)."""
        subjects, starts = self.plan()
        batch = self.empty_batch(len(indices), allocate)
        for slot, index in enumerate(indices):
            self.read(int(subjects[index]), int(starts[index]), out=batch, slot=slot)
        return batch


def decoded_columns(coo_path: Path, cache_dir: Path) -> Path | None:
    """A .npy file in ``cache_dir`` holding the (3, E) z, x, y columns of a COO file decoded (uint8 where the
    grid's axes fit a byte, else int32), made once (named after the file's path, size and modification time, so a
    rewritten file gets a new one); None for files that need none (the file holds them decoded:
    spike_zxy) and for files without timepoint_offsets (1.0): both are read as they are."""
    stat = Path(coo_path).stat()
    identity = f"{Path(coo_path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    target = (
        Path(cache_dir) / f"{Path(coo_path).parent.name}-{hashlib.blake2b(identity, digest_size=8).hexdigest()}.npy"
    )
    if target.is_file():
        return target
    with usp.CooFile(coo_path) as grid:
        if grid.offsets is None or grid.zxy is not None:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        dtype = np.uint8 if max(grid.grid_shape[1:], default=0) <= 256 else np.int32
        temporary = usp.temporary_path(target)
        try:
            columns = np.lib.format.open_memmap(temporary, "w+", dtype, (3, grid.num_entries))
            step = 1 << 22  # rows decoded at a time (whole chunks of the file's row chunks)
            for first in range(0, grid.num_entries, step):
                last = min(grid.num_entries, first + step)
                for j in (1, 2, 3):
                    columns[j - 1, first:last] = grid.column(first, last, j)
            columns.flush()
            del columns
            os.replace(temporary, target)
        finally:
            usp.remove_quietly(temporary)
    return target


class DecodedGrid:
    """A CooFile whose z, x, y come from decoded_columns' file (mapped, read from the page cache like memory)."""

    def __init__(self, grid: usp.CooFile, decoded: Path):
        self.grid, self.columns = grid, np.load(decoded, mmap_mode="r")

    def entries(self, start, stop) -> tuple:
        start, stop = usp._check_window(start, stop, self.grid.num_timepoints, self.grid.filename)
        first, last = self.grid.rows(start, stop)
        return self.grid.offsets[start : stop + 1] - first, np.array(self.columns[:, first:last])

    def close(self) -> None:
        self.grid.close()


# --- the sampler's own workers -------------------------------------------------------------------------------
# torch's DataLoader hands every batch over in fresh shared memory: ~34,000 new 4 KiB pages for a batch of 16
# whole-fish windows, which costs the worker ~4x reading the rates (benchmarks/RESULTS_pipeline.md). Here forked
# workers read batches into a ring of shared slots mapped once, so pages are touched once per run.


class WindowLoader:
    """Batches of a sampler (cells, or dense grids) read by ``workers`` forked processes into a ring of ``slots``
    shared buffers: batch b is windows b*B .. b*B + B - 1 of the sampler's epoch, in order, whatever the number of
    workers. A batch is a dict of numpy arrays valid until the next one is asked for (copy what you keep; moving it
    to a GPU copies it). workers=0 reads in this process. Use ``with WindowLoader(...) as loader`` or close()."""

    def __init__(self, sampler: WindowSampler, batch_size: int, workers: int = 2, slots: int | None = None):
        if sampler.kind != "cells" and not sampler.dense:
            raise ValueError("WindowLoader reads cells or dense grids; read sparse windows with sampler[i]")
        self.sampler, self.batch_size, self.workers = sampler, batch_size, workers
        self.slots = max(2, slots or 2 * workers + 1)
        self._processes, self._buffers, self._tasks, self._done, self._active = [], [], None, None, None

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _layout(self) -> list:
        """[(name, shape, dtype, byte offset)] of a batch in a slot, 64-byte aligned."""
        layout, offset = [], 0
        for name, array in self.sampler.empty_batch(0).items():
            shape = (self.batch_size, *array.shape[1:])
            layout.append((name, shape, array.dtype, offset))
            offset += -(-int(np.prod(shape)) * array.dtype.itemsize // 64) * 64
        return layout

    def _views(self, slot: int) -> dict:
        buffer = self._buffers[slot]
        return {name: np.ndarray(shape, dtype, buffer, offset) for name, shape, dtype, offset in self._layout_cache}

    def _start(self) -> None:
        import mmap
        import multiprocessing

        self._layout_cache = self._layout()
        name, shape, dtype, offset = self._layout_cache[-1]
        size = offset + int(np.prod(shape)) * dtype.itemsize
        self._buffers = [mmap.mmap(-1, max(1, size)) for _ in range(self.slots)]  # shared with forked workers
        context = multiprocessing.get_context("fork")
        self._tasks, self._done = context.SimpleQueue(), context.SimpleQueue()
        for _ in range(self.workers):
            process = context.Process(target=self._work, daemon=True)
            process.start()
            self._processes.append(process)

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            slot, epoch, index = task
            try:
                if epoch != self.sampler.epoch:
                    self.sampler.set_epoch(epoch)
                self._fill(self._views(slot), index)
                self._done.put((slot, index, None))
            except Exception as error:  # reported in the main process
                self._done.put((slot, index, f"{type(error).__name__}: {error}"))

    def _fill(self, batch: dict, index: int) -> None:
        subjects, starts = self.sampler.plan()
        for b, window in enumerate(range(index * self.batch_size, (index + 1) * self.batch_size)):
            self.sampler.read(int(subjects[window]), int(starts[window]), out=batch, slot=b)

    def __iter__(self):
        if self._active is not None:  # one iteration at a time: the earlier one's batches in flight are drained
            self._active.close()
        self._active = self._batches()
        return self._active

    def _batches(self):
        count = len(self)
        if not self.workers:
            batch = self.sampler.empty_batch(self.batch_size)
            for index in range(count):
                self._fill(batch, index)
                yield batch
            return
        if not self._processes:
            self._start()
        epoch, free, ready, sent, received = self.sampler.epoch, list(range(self.slots)), {}, 0, 0
        try:
            for index in range(count):
                while sent < count and free:  # keep every free slot busy
                    self._tasks.put((free.pop(), epoch, sent))
                    sent += 1
                while index not in ready:
                    slot, done, error = self._done.get()
                    received += 1
                    if error:
                        raise RuntimeError(f"a WindowLoader worker failed on batch {done}: {error}")
                    ready[done] = slot
                slot = ready.pop(index)
                yield self._views(slot)
                free.append(slot)  # the consumer asked for the next batch: this one is free again
        finally:
            while received < sent:  # no worker may still write into a slot when the next iteration starts
                self._done.get()
                received += 1

    def close(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None
        for _ in self._processes:
            self._tasks.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
        self._processes, self._buffers = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if self._processes:
            self.close()


# --- torch adapters (torch imported here only) -------------------------------------------------------------


def to_sparse_tensor(window: dict, shape: tuple, device=None, dtype=None):
    """A sparse window (read with dense=False) as a coalesced torch.sparse_coo_tensor of ``shape`` ((P, Z, H, W)
    for "grid", (P, H, W) for "planes"), built on ``device``: the compact entries cross to the GPU, not int64
    indices (8x the bytes)."""
    import torch

    offsets = torch.as_tensor(window["offsets"], device=device)
    entries = torch.as_tensor(window["entries"], device=device).long()
    first = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=device), offsets.diff())
    indices = torch.cat([first[None], entries])
    values = torch.ones(indices.shape[1], dtype=dtype or torch.float32, device=device)
    return torch.sparse_coo_tensor(indices, values, size=shape, is_coalesced=True, check_invariants=False)


def torch_batches(sampler: WindowSampler, batch_size: int):
    """A torch Dataset whose item i is batch i of the epoch (windows i*B .. i*B + B - 1, stacked as tensors; the
    last, partial batch dropped): a DataLoader with batch_size=None over it spreads batches over its workers,
    and each batch is the same whatever the number of workers. Sparse samplers give, per batch, a list of
    window dicts of tensors ("offsets", "entries", "subject", "start", "split", ...)."""
    import torch

    class SamplerBatches(torch.utils.data.Dataset):
        def __init__(self):
            self.sampler, self.batch_size = sampler, batch_size

        def __len__(self) -> int:
            return len(self.sampler) // self.batch_size

        def __getitem__(self, index: int):
            if not 0 <= index < len(self):
                raise IndexError(index)
            indices = range(index * self.batch_size, (index + 1) * self.batch_size)
            if self.sampler.kind != "cells" and not self.sampler.dense:
                return [{k: torch.as_tensor(v) for k, v in self.sampler[i].items()} for i in indices]
            tensors = {}

            def allocate(shape: tuple, dtype: np.dtype) -> np.ndarray:
                # in a worker, the batch is made in shared memory: the DataLoader then sends it without a copy
                tensor = torch.from_numpy(np.empty(0, dtype))
                if torch.utils.data.get_worker_info() is not None:
                    storage = torch.UntypedStorage._new_shared(max(1, math.prod(shape) * dtype.itemsize))
                    tensor = tensor.new_empty(0).set_(storage, 0, shape)
                else:
                    tensor = tensor.new_empty(shape)
                array = tensor.numpy()
                tensors[array.ctypes.data] = tensor
                return array

            batch = self.sampler.read_batch(indices, allocate)
            return {key: tensors.get(value.ctypes.data) if value.size else torch.from_numpy(value)
                    for key, value in batch.items()}  # fmt: skip

    if len(sampler) < batch_size:
        raise ValueError(f"{len(sampler)} windows per epoch make no batch of {batch_size}")
    return SamplerBatches()


def make_loader(sampler: WindowSampler, batch_size: int, num_workers: int = 2, **options):
    """torch.utils.data.DataLoader of batches of ``sampler`` (torch_batches) read by ``num_workers`` processes.
    Call sampler.set_epoch(e) before iterating it for epoch e. ``options`` go to the DataLoader (pin_memory...)."""
    import torch

    options = {"prefetch_factor": 4, **options} if num_workers else options
    return torch.utils.data.DataLoader(
        torch_batches(sampler, batch_size), batch_size=None, shuffle=False, num_workers=num_workers, **options
    )
