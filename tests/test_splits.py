"""Splits with three parts: --val_ratio leaves today's splits unchanged at 0, --split zapbench is ZAPBench's rule
(with its truncation), --condition_padding puts segment edges in no split, a held-out condition is all test."""

import numpy as np
import pytest
from test_exports import _zapbench_parts

import unified_spike_processing_coo as usp


def _settings(**changes):
    base = dict(grid_shape=(256, 128), z_markers=True, keep_edge_frames=False, split_block=330, split_ratio=0.95,
                seed=42, coordinates="raw", atlas_shape=(1406, 621, 138), z_planes=46, split="blocks",
                holdout_condition=None)  # fmt: skip
    return usp.GridSettings(**{**base, **changes})


def _covariates(pattern) -> usp.Covariates:
    """Conditions per timepoint (-1: none), as repeated blocks of (condition, length)."""
    condition = np.concatenate([np.full(length, index, np.int16) for index, length in pattern])
    return usp.Covariates(
        condition=condition, condition_names=("gain", "dots", "flash"), condition_periods=np.array([50, 40, 1000]),
        clock="timepoints",
    )  # fmt: skip


@pytest.mark.parametrize("num_timepoints", [1, 329, 330, 4000, 7879])
def test_val_ratio_zero_keeps_the_original_split_bit_for_bit(num_timepoints):
    split, test_blocks, val_blocks = usp.block_split(num_timepoints, 330, 0.95, 42, 0.0)
    is_train, original_blocks = usp.train_test_split(num_timepoints, 330, 0.95, 42)
    np.testing.assert_array_equal((split == 0).astype(np.uint8), is_train)
    np.testing.assert_array_equal(test_blocks, original_blocks)
    assert len(val_blocks) == 0 and set(np.unique(split)) <= {0, 2}
    kept = np.arange(num_timepoints)
    codes, _, rule = usp.plan_splits(kept, usp.Covariates(), _settings())
    np.testing.assert_array_equal(codes, split)
    assert "validation" not in rule


def test_validation_blocks_follow_the_test_blocks_in_the_shuffled_order():
    split, test_blocks, val_blocks = usp.block_split(4000, 100, 0.75, 7, 0.1)
    order = np.random.RandomState(7).permutation(40)
    assert sorted(test_blocks) == sorted(order[:10]) and sorted(val_blocks) == sorted(order[10:14])
    for block in val_blocks:
        assert set(split[block * 100 : (block + 1) * 100]) == {1}
    np.testing.assert_array_equal(usp.block_split(4000, 100, 0.75, 7)[0] == 2, split == 2)  # test unchanged


def test_condition_split_validation_is_the_repetitions_before_the_test_ones():
    covariates = _covariates([(0, 500), (-1, 10), (2, 300)])
    kept = np.arange(810)
    split = usp.condition_split(covariates.condition, kept, covariates.condition_periods, 0.8, 0.2)
    # gain: 10 repetitions of 50 -> 2 test, 2 validation before them; flash: one repetition -> contiguous parts
    np.testing.assert_array_equal(split[:500], np.repeat([0, 1, 2], [300, 100, 100]))
    assert set(split[500:510]) == {0}
    np.testing.assert_array_equal(split[510:], np.repeat([0, 1, 2], [180, 60, 60]))
    without = usp.condition_split(covariates.condition, kept, covariates.condition_periods, 0.8)
    np.testing.assert_array_equal(without == 2, split == 2)


@pytest.mark.parametrize("padding", [0, 1, 3])
@pytest.mark.parametrize("fractions", [(0.1, 0.2), (0.15, 0.33), (0.0, 0.25)])
def test_zapbench_split_is_zapbench_rule(padding, fractions):
    """ZAPBench's rule, run on the segments and values the split records, gives its codes; a condition in several
    blocks is several segments; held-out segments are all test; padding is in no split."""
    pattern = [(0, 649), (1, 1773), (-1, 5), (2, 656), (0, 313), (1, 1)]
    covariates, val, test = _covariates(pattern), *fractions
    kept = np.arange(len(covariates.condition))
    settings = _settings(split="zapbench", val_ratio=val, test_ratio=test, condition_padding=padding,
                         holdout_condition="flash")  # fmt: skip
    split, _, rule = usp.plan_splits(kept, covariates, settings)
    segments = usp.ConditionSegments.of(covariates.condition, covariates.condition_names, len(kept))
    assert segments.names == ("gain", "dots", "none", "flash", "gain", "dots") and segments.offsets[-1] == len(kept)
    holdout = [condition for condition, name in enumerate(segments.names) if name == "flash"]
    constants = dict(
        condition_offsets=segments.offsets,
        condition_padding=padding,
        val_fraction=val,
        test_fraction=test,
        conditions_holdout=holdout,
    )
    rebuilt = np.full(len(kept), -1, np.int8)
    for condition in range(len(segments.names)):
        for code, (low, high) in _zapbench_parts(constants, condition).items():
            rebuilt[low:high] = code  # empty where padding leaves nothing
    np.testing.assert_array_equal(split, rebuilt)
    assert rule.startswith("zapbench") and "flash is test" in rule
    assert (split == -1).sum() == sum(min(2 * padding, length) for _, length in pattern)


def test_zapbench_defaults_are_zapbench_constants():
    covariates = _covariates([(0, 649), (1, 1773)])
    kept = np.arange(len(covariates.condition))
    split, _, _ = usp.plan_splits(kept, covariates, _settings(split="zapbench"))
    # condition 0 of ZAPBench: bounds [1, 648): 647 timepoints -> 129 test, 64 validation, 454 train
    np.testing.assert_array_equal(split[:649], np.repeat([-1, 0, 1, 2, -1], [1, 454, 64, 129, 1]))
    without_conditions, _, _ = usp.plan_splits(np.arange(100), usp.Covariates(), _settings(split="zapbench"))
    np.testing.assert_array_equal(without_conditions, np.repeat([-1, 0, 1, 2, -1], [1, 70, 9, 19, 1]))
