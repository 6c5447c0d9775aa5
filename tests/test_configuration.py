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
