"""The command line: help, bad arguments, model options."""

from conftest import SAMPLE_DIR, run_cli

SAMPLE = SAMPLE_DIR


def test_help_and_bad_arguments(tmp_path):
    result = run_cli("--help")
    for flag in (
        "--input_dir",
        "--workers",
        "--batch_size",
        "--cascade_model",
        "--strict_model",
        "--spike_mode",
        "--grid_shape",
        "--trace_type",
        "--keep_edge_frames",
    ):
        assert flag in result.stdout
    assert run_cli("--input_dir", "nowhere", "--output_dir", tmp_path / "out", check=False).returncode == 2


def test_strict_model_without_network_is_a_clear_error(tmp_path):
    result = run_cli(
        "--input_dir",
        SAMPLE,
        "--output_dir",
        tmp_path,
        "--cascade_model",
        "Global_EXC_2Hz_smoothing500ms",
        "--model_cache",
        tmp_path / "cache",
        "--offline",
        "--strict_model",
        check=False,
    )
    assert result.returncode == 2
    assert "Global_EXC_2Hz_smoothing500ms" in result.stderr and "--model_dir" in result.stderr


def test_numeric_options_parse_as_their_defaults_type():
    import unified_spike_processing_coo as usp

    argv = [
        "--input_dir",
        "a",
        "--output_dir",
        "b",
        "--workers",
        "3",
        "--split_ratio",
        "0.5",
        "--cascade_threshold",
        "none",
    ]
    config = usp.PipelineConfig(**vars(usp.build_parser().parse_args(argv)))
    assert (config.workers, config.split_ratio, config.cascade_threshold) == (3, 0.5, "none")
    assert type(config.workers) is int and type(config.baseline_window_s) is float


def test_target_rate_and_cell_activity_options(tmp_path):
    import pytest

    import unified_spike_processing_coo as usp

    args = ["--input_dir", "a", "--output_dir", "b"]
    config = usp.PipelineConfig(**vars(usp.build_parser().parse_args([*args, "--target_rate_hz", "1.5"])))
    assert config.target_rate_hz == 1.5 and config.cell_activity and config.output_params("cascade")["target_rate_hz"]
    config = usp.PipelineConfig(**vars(usp.build_parser().parse_args([*args, "--no_cell_activity"])))
    assert config.target_rate_hz is None and not config.cell_activity
    assert "cell_activity" in config.output_params("grid") and "target_rate_hz" not in config.output_params("grid")
    for bad in (0.0, -2.0, 5000.0):
        with pytest.raises(usp.PipelineError, match="--target_rate_hz"):
            usp.PipelineConfig(input_dir="a", output_dir="b", target_rate_hz=bad)
    result = run_cli("--input_dir", SAMPLE, "--output_dir", tmp_path / "x", "--target_rate_hz", "0", check=False)
    assert result.returncode == 2 and "--target_rate_hz" in result.stderr and not (tmp_path / "x").exists()


def test_typos_are_one_line_with_a_suggestion_and_abbreviations_are_refused(tmp_path):
    """--wokers: one line naming the option and the closest one, no 40-line usage; --worker is no --workers."""
    common = ("--input_dir", SAMPLE, "--output_dir", tmp_path / "out")
    for typo in ("--wokers", "--worker", "--wokers=2"):
        result = run_cli(*common, *typo.split("="), *(["2"] * ("=" not in typo)), check=False)
        assert result.returncode == 2 and "usage:" not in result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert f"unknown option {typo.split('=')[0]}: did you mean --workers?" in line
    result = run_cli(*common, "--zzzzzz", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "did you mean" not in result.stderr
    result = run_cli(*common, "--workers", "two", check=False)
    assert result.returncode == 2 and "--workers" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing created before the arguments are good


def test_output_dir_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    for output_dir in (tmp_path / "out", tmp_path / "out" / "sub"):
        result = run_cli("--input_dir", SAMPLE, "--output_dir", output_dir, check=False)
        assert result.returncode == 2 and "is a file, not a folder" in result.stderr
        assert f"--output_dir {output_dir}" in result.stderr and "File exists" not in result.stderr


def test_split_help_points_to_the_doc_that_describes_it():
    from conftest import REPO_DIR

    help_text = " ".join(run_cli("--help").stdout.split())
    assert "see 'Train/test splits' in docs/outputs.md" in help_text and "see the README" not in help_text
    assert "## Train/test splits" in (REPO_DIR / "docs" / "outputs.md").read_text()


def test_sample_run_with_the_official_model_unavailable_warns_once_and_briefly(tmp_path):
    """The README's sample run where the default model cannot be had: one short WARNING line (which model instead,
    why, how to avoid it), although two builtin models (2 and 2.6 Hz) stand in; the details only with --verbose."""
    args = ("--input_dir", SAMPLE, "--output_dir", tmp_path / "out", "--no_plots", "--no_cell_activity")
    args += ("--offline", "--model_cache", tmp_path / "cache")  # as without internet, deterministically
    result = run_cli(*args, "--subjects", "subject_1,subject_3")
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and len(warnings[0]) < 250, warnings
    assert "Global_EXC_2Hz_smoothing500ms unavailable (not cached, --offline)" in warnings[0]
    assert "builtin_2Hz_smoothing500ms" in warnings[0] and "--cascade_model builtin" in warnings[0]
    summary = [line for line in result.stderr.splitlines() if "! WARNING" in line]
    assert len(summary) == 1 and "builtin_2Hz_smoothing500ms, builtin_2.6Hz_smoothing500ms" in summary[0]
    assert str(tmp_path / "cache") not in result.stderr  # the full reason only at DEBUG
    assert "2 of 2 subjects" in result.stderr and "(1 worker, batches of up to 30,000 cells)" in result.stderr
    assert "combined_metadata.h5: 2 subjects" in result.stderr and " 1 workers" not in result.stderr
    verbose = run_cli(*args, "--subjects", "subject_1", "--overwrite", "--verbose")
    assert any(" DEBUG " in line and str(tmp_path / "cache") in line for line in verbose.stderr.splitlines())


# Peak RSS of all processes together (GB) measured on the 2-core AVX-512 EPYC, as the comment above the --inspect
# constants says: (cells, frames, --workers, engine) -> GB. The sample's subjects (the largest, 550 x 1,100) with
# psutil polling (issue 27); the whole fish from benchmarks/RESULTS_pipeline.md (issue 20, 6f80809; --workers 1
# before it), and the 6.8 GB seen since with tensorflow.
MEASURED_PEAK_GB = [
    ((550, 1100, 1, "tensorflow"), 1.28),
    ((550, 1100, 2, "tensorflow"), 2.21),
    ((550, 1100, 1, "numpy"), 0.38),
    ((550, 1100, 2, "numpy"), 0.58),
    ((90_000, 4_000, 2, "tensorflow"), 6.10),
    ((90_000, 4_000, 2, "tensorflow"), 6.8),
    ((90_000, 4_000, 2, "numpy"), 3.81),
    ((90_000, 4_000, 1, "tensorflow"), 4.56),
    ((90_000, 4_000, 2, "tensorflow"), 4.12),  # with spike_zxy (issue 26), 2-core Xeon
]


def test_inspect_memory_estimates_are_within_2x_of_measured_peaks():
    from types import SimpleNamespace

    import unified_spike_processing_coo as usp

    for (cells, frames, workers, engine), measured in MEASURED_PEAK_GB:
        found = usp.Inspection("fish", subject=SimpleNamespace(num_cells=cells, num_frames=frames))
        estimate = found.peak_gb(workers, 30_000, engine)
        assert measured / 2 <= estimate <= 2 * measured, (cells, frames, workers, engine, estimate, measured)
    # the engine's workers: numpy has no TensorFlow
    fish = usp.Inspection("fish", subject=SimpleNamespace(num_cells=90_000, num_frames=4_000))
    assert fish.peak_gb(2, 30_000, "numpy") < fish.peak_gb(2, 30_000, "tensorflow")


def test_inspect_of_the_sample_says_seconds_and_sizes_nothing_when_all_are_refused(tmp_path):
    result = run_cli("--inspect", "--input_dir", SAMPLE, "--output_dir", tmp_path / "out", "--cascade_model", "builtin")
    totals = next(line for line in result.stderr.splitlines() if "Totals: 3 subjects (0 refused)" in line)
    assert " s with --workers " in totals and "0 min" not in totals, totals
    rows = [line for line in result.stderr.splitlines() if line.split(" INFO ")[-1].startswith("subject_")]
    assert len(rows) == 3 and all(row.endswith(" s") for row in rows), rows
    # every subject refused (a frame rate far from the one model given): no --mem to suggest
    args = ("--inspect", "--input_dir", SAMPLE, "--output_dir", tmp_path / "out", "--max_rate_mismatch", "0.01")
    result = run_cli(*args, "--cascade_model", "builtin", "--subjects", "subject_1,subject_3", check=False)
    assert result.returncode == 1 and "--mem=" not in result.stderr
    assert "Totals: 2 subjects (2 refused): nothing would run" in result.stderr


def test_plural_agrees_with_its_count():
    import unified_spike_processing_coo as usp

    assert [usp.plural(n, "worker") for n in (0, 1, 2)] == ["0 workers", "1 worker", "2 workers"]
    assert usp.plural(1, "batch", "batches") == "1 batch" and usp.plural(30000, "batch", "batches") == "30,000 batches"
