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
