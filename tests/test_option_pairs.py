"""Every option with every option: the command line's own options, in pairwise combinations (every pair of values
of every two options appears in some run), over a fish of every input layout. Each run finishes, its outputs
agreeing with each other on the time base they state, or is refused in one line: the whole run at the start
(exit 2), or one subject that cannot serve the options (exit 1, one line naming it)."""

import dataclasses
import functools
import itertools
import re

import h5py
import numpy as np
import pytest
from conftest import REPO_DIR, run_cli, write_chen_fish
from test_input_layouts import (
    grid_positions,
    sample_fluorescence,
    write_caiman,
    write_generic,
    write_nwb,
    write_suite2p,
)

import unified_spike_processing_coo as usp

LAYOUT_FISH = ("fish_chen", "fish_suite2p", "fish_caiman", "fish_nwb", "fish_generic")


def option_values(tmp) -> dict:
    """Per option of PipelineConfig, the values tried besides its default (command-line words). Every option of the
    command line must be here: a new option without values fails test_every_option_is_tried."""
    return {
        "input_dir": [],  # fixed: the fish below
        "output_dir": [],  # fixed: a folder per run
        "subjects": [["--subjects", "fish_chen,fish_nwb,fish_suite2p"]],
        "skip": [["--skip", "fish_generic"]],
        "coordinates": [["--coordinates", "registered"]],
        "plots": [["--no_plots"]],
        "cell_activity": [["--no_cell_activity"]],
        "num_neurons": [["--num_neurons", "3"]],
        "nwb": [["--nwb"]],
        "nwb_subject_id": [["--nwb_subject_id", "fish-7"]],
        "nwb_species": [["--nwb_species", "Danio rerio"]],
        "nwb_experimenter": [["--nwb_experimenter", "Doe, Jane; Roe, Rick"]],
        "log_file": [["--log_file", str(tmp / "elsewhere.log")]],
        "verbose": [["--verbose"]],
        "workers": [["--workers", "2"]],
        "engine": [["--engine", "numpy"], ["--engine", "tensorflow"]],
        "batch_size": [["--batch_size", "7"]],
        "overwrite": [["--overwrite"]],
        "shard": [["--shard", "2/2"]],
        "combine_only": [["--combine_only"]],
        "inspect": [["--inspect"]],
        "cascade_model": [["--cascade_model", "builtin"], ["--cascade_model", "auto"]],
        "model_dir": [["--model_dir", str(REPO_DIR / "models" / "builtin_2Hz_smoothing500ms")]],
        "model_cache": [["--model_cache", str(tmp / "cache")]],
        "strict_model": [["--strict_model"]],
        "offline": [],  # always on: tests never reach the network
        "cascade_threshold": [["--cascade_threshold", "0"], ["--cascade_threshold", "none"]],
        "max_rate_mismatch": [["--max_rate_mismatch", "0.01"]],
        "trace_type": [["--trace_type", "fluorescence"], ["--trace_type", "dff"]],
        "neuropil_coefficient": [["--neuropil_coefficient", "0.5"]],
        "iscell_threshold": [["--iscell_threshold", "0.3"]],
        "baseline_percentile": [["--baseline_percentile", "20"]],
        "baseline_window_s": [["--baseline_window_s", "10"]],
        "spike_mode": [["--spike_mode", "discrete"], ["--spike_mode", "threshold"]],
        "spike_threshold": [["--spike_threshold", "0.2"]],
        "seed": [["--seed", "7"]],
        "target_rate_hz": [["--target_rate_hz", "1.5"]],
        "keep_edge_frames": [["--keep_edge_frames"]],
        "grid_shape": [["--grid_shape", "64", "32"]],
        "z_markers": [["--no_z_markers"]],
        "atlas_shape": [["--atlas_shape", "120", "90", "12"]],
        "z_planes": [["--z_planes", "6"]],
        "split": [["--split", "conditions"], ["--split", "zapbench"]],
        "split_block": [["--split_block", "40"]],
        "split_ratio": [["--split_ratio", "0.8"]],
        "holdout_condition": [["--holdout_condition", "PT"]],
        "val_ratio": [["--val_ratio", "0.1"]],
        "test_ratio": [["--test_ratio", "0.3"]],  # with --split zapbench only: refused in one line otherwise
        "condition_padding": [["--condition_padding", "2"]],  # likewise
        "export": [["--export", "dense,gbm,torch_brain"], ["--export", "zapbench"]],  # zapbench: with --split zapbench
    }


def pairwise_runs(domains: dict, candidates: int = 12) -> list:
    """Rows (option -> index of its value; 0 the default) covering every pair of values of every two options. AETG's
    greedy rule, seeded: each row starts from the first pair not yet covered, the other options take, in a random
    order, the value that covers most new pairs; of ``candidates`` such rows the one covering most is kept."""
    rng = np.random.default_rng(0)
    names = [name for name, values in domains.items() if len(values) > 1]
    order = {name: index for index, name in enumerate(names)}

    def pair(x, vx, y, vy):
        return (x, vx, y, vy) if order[x] < order[y] else (y, vy, x, vx)

    uncovered = {pair(a, i, b, j) for a, b in itertools.combinations(names, 2)
                 for i in range(len(domains[a])) for j in range(len(domains[b]))}  # fmt: skip
    rows = []
    while uncovered:
        a, i, b, j = min(uncovered)
        best, best_new = {}, set()
        for _ in range(candidates):
            row = {a: i, b: j}
            for name in rng.permutation([n for n in names if n not in row]).tolist():
                gain = [sum(pair(x, row[x], name, v) in uncovered for x in row) for v in range(len(domains[name]))]
                row[name] = int(np.argmax(np.array(gain) + 0.5 * rng.random(len(gain))))  # ties: at random
            new = uncovered & {pair(x, row[x], y, row[y]) for x, y in itertools.combinations(names, 2)}
            if len(new) > len(best_new):
                best, best_new = row, new
        uncovered -= best_new
        rows.append(best)
    return rows


@pytest.fixture(scope="module")
def fish(tmp_path_factory):
    """A small fish of every input layout (the Chen one with stimulus conditions and registered positions)."""
    data = tmp_path_factory.mktemp("pairs") / "data"
    fluorescence, positions = sample_fluorescence(), grid_positions()
    dff = (fluorescence / np.median(fluorescence, axis=1, keepdims=True) - 1).astype(np.float32)
    rng = np.random.default_rng(3)
    registered = np.column_stack([rng.uniform(1, 120, 40), rng.uniform(1, 90, 40), rng.uniform(1, 12, 40)])
    write_chen_fish(data / "fish_chen", registered, num_frames=320)
    write_suite2p(data / "fish_suite2p", fluorescence, positions)
    (data / "fish_caiman").mkdir()
    write_caiman(data / "fish_caiman" / "cnmf_results.hdf5", dff.astype(np.float64), positions)
    (data / "fish_nwb").mkdir()
    write_nwb(data / "fish_nwb" / "fish.nwb", fluorescence, positions, "Fluorescence", mask="voxel")
    write_generic(data / "fish_generic", dff, positions, "dff")
    return data


def test_every_option_is_tried(tmp_path):
    declared = {field.name for field in dataclasses.fields(usp.PipelineConfig)}
    assert declared == set(option_values(tmp_path)), "give each new option its values here"
    parser_options = {action.dest for action in usp.build_parser()._actions if action.dest != "help"}
    assert parser_options == declared


def test_pairwise_cover_holds_every_pair():
    domains = {"a": [0, 1], "b": [0, 1, 2], "c": [0, 1], "d": [0, 1, 2]}
    rows = pairwise_runs(domains)
    for x, y in itertools.combinations(domains, 2):
        assert {(row[x], row[y]) for row in rows} == set(
            itertools.product(range(len(domains[x])), range(len(domains[y])))
        )


@functools.cache
def _runs(tmp) -> list:
    values = option_values(tmp)
    values["inspect"] = values["combine_only"] = []  # each run below is also inspected and combined
    domains = {name: [[]] + alternatives for name, alternatives in values.items()}
    return [
        [word for name, index in sorted(row.items()) for word in domains[name][index]] for row in pairwise_runs(domains)
    ]


RUNS = _runs(REPO_DIR / ".option-pairs")  # paths in the values are only placeholders for counting runs


def _one_line_each(argv, result, refused_word: str) -> set:
    """The subjects a run refused (exit 1), each named by exactly one ERROR line; nothing else went wrong."""
    text = result.stderr
    assert "Traceback" not in text and "a bug: please report it" not in text, f"{argv}\n{text[-3000:]}"
    errors = [line for line in text.splitlines() if " ERROR " in line or ": error: " in line]
    if result.returncode == 2:  # refused at the start, before any work, in one line
        assert len(errors) == 1 and "--" in errors[0] and "usage:" not in text, f"{argv}\n{text[-3000:]}"
        return set()
    assert result.returncode in (0, 1), f"{argv}: exit {result.returncode}\n{text[-3000:]}"
    messages = "\n".join(line.split(" INFO ")[-1] for line in text.splitlines())
    refused = set(re.findall(rf"^(fish_\w+): {refused_word}", messages, re.M))
    assert bool(refused) == (result.returncode == 1), f"{argv}: exit {result.returncode}\n{text[-3000:]}"
    if refused_word == "FAILED":
        for name in refused:
            assert sum(line.split(" ERROR ")[-1].startswith(f"{name}:") for line in errors) == 1, f"{argv} {name}"
    return refused


@pytest.mark.parametrize("run", range(len(RUNS)))
def test_option_pairs_run_or_refuse_in_one_line(fish, tmp_path, run):
    """Each pairwise row: --inspect says what the run will do, the run does it (or refuses in one line), and
    --combine_only then gathers what it finished; --inspect and --combine_only thus meet every other option."""
    placeholder = str(REPO_DIR / ".option-pairs")
    argv = [str(word).replace(placeholder, str(tmp_path)) for word in RUNS[run]]
    out, common = tmp_path / "out", ("--input_dir", fish, "--offline")
    inspected = run_cli(*common, "--output_dir", out, "--inspect", *argv, check=False, timeout=900)
    would_refuse = _one_line_each(argv, inspected, "REFUSED")
    assert not out.exists() or not any(out.rglob("*.h5")), "--inspect writes nothing"
    result = run_cli(*common, "--output_dir", out, *argv, check=False, timeout=900)
    assert (result.returncode == 2) == (inspected.returncode == 2), f"{argv}: --inspect and the run disagree"
    failed = _one_line_each(argv, result, "FAILED")
    assert would_refuse <= failed, f"{argv}: --inspect refused {would_refuse - failed}, the run did not"
    if result.returncode == 2:
        assert not any(out.glob("*/" + usp.METADATA_FILENAME)), "a refused run wrote outputs"
        return
    finished = sorted(subject.name for subject in out.glob("fish_*") if (subject / usp.METADATA_FILENAME).exists())
    for name in finished:
        outputs_agree(out / name, argv)
    combined = run_cli(*common, "--output_dir", out, "--combine_only", *argv, check=False, timeout=900)
    assert combined.returncode == 0, f"{argv}\n{combined.stderr[-3000:]}"
    with h5py.File(out / usp.COMBINED_FILENAME, "r") as h5:
        assert sorted(h5) == finished


def outputs_agree(subject, argv) -> None:
    """The grid, cell_activity.h5 and the NWB file of a finished subject say the same on the time base they state."""
    with h5py.File(subject / usp.METADATA_FILENAME, "r") as meta:
        attrs, kept = dict(meta.attrs), meta["timepoint_indices"][()]
        run_id = attrs["run_id"]
    grid = usp.load_coo_grid(subject / usp.COO_FILENAME)
    assert grid["attrs"]["run_id"] == run_id
    assert grid["grid_shape"][0] == len(kept) == len(grid["timepoint_indices"]) == len(grid["is_train"])
    np.testing.assert_array_equal(grid["timepoint_indices"], kept)
    if "target_rate_hz" in " ".join(argv):
        assert attrs["timepoint_rate_hz"] == 1.5
    for name, values in grid.get("covariates", {}).items():
        if name != "condition_names":
            assert len(values) == len(kept), name
    activity = subject / usp.CELL_ACTIVITY_FILENAME
    assert activity.exists() == ("--no_cell_activity" not in argv)
    rates = None
    if activity.exists():
        with h5py.File(activity, "r") as h5:
            rates = h5["spike_rates"][()].astype(np.float32)
            np.testing.assert_array_equal(h5["timepoint_indices"][()], kept)
            assert rates.shape == (len(kept), attrs["num_cells"])
            assert h5.attrs["run_id"] == run_id
    for name in next((argv[i + 1] for i, word in enumerate(argv) if word == "--export"), "").split(","):
        if name:  # each export asked for is there, made from this run's files
            assert usp.export_record_of(usp.EXPORTS[name].path(subject.parent, subject.name))["run_id"] == run_id
    nwb = subject / f"{subject.name}{usp.NWB_FILENAME_SUFFIX}"
    assert nwb.exists() == ("--nwb" in argv)
    if nwb.exists():
        from pynwb import NWBHDF5IO

        with NWBHDF5IO(str(nwb), "r") as io:
            ophys = io.read().processing["ophys"]
            deconvolved, dff = ophys["Deconvolved"], ophys["DfOverF"]["dff"]
            assert deconvolved.rate == pytest.approx(attrs["timepoint_rate_hz"])
            assert dff.rate == pytest.approx(attrs["frame_rate_hz"])
            assert dff.data.shape == (attrs["num_original_frames"], attrs["num_cells"])
            on_time_base = deconvolved.data[()]
            assert on_time_base.shape[1] == attrs["num_cells"] and on_time_base.shape[0] > kept.max()
            if rates is not None:  # the same rates, cell_activity.h5's at its rows (float16)
                np.testing.assert_array_equal(on_time_base[kept].astype(np.float16).astype(np.float32), rates)
            per = "frame" if "--target_rate_hz" not in argv else "timepoint"
            assert deconvolved.unit.startswith(f"expected spikes per {per}")
