"""LR schedules (nanochat/schedules.py): the shapes nanochat's base, mid and SFT stages use."""

import pytest

from nanochat.schedules import epoch_steps, is_due, lr_multiplier, lr_multiplier_at_progress


def test_base_schedule_is_constant_then_warms_down_to_final_frac():
    n = 100
    assert [lr_multiplier(s, n) for s in (0, 50, 80)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(90, n) == pytest.approx(0.5)
    assert lr_multiplier(90, n, final_lr_frac=0.1) == pytest.approx(0.55)
    assert lr_multiplier(n, n) == 0.0


def test_warmup_reaches_one_after_warmup_steps():
    assert [lr_multiplier(s, 100, warmup_ratio=0.04) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_sft_schedule_is_a_linear_decay_from_one_to_zero():
    n = 40
    for step in range(n + 1):
        assert lr_multiplier(step, n, warmdown_ratio=1.0) == pytest.approx(1 - step / n)


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.8, 0.81, 0.9, 0.95, 0.999, 1.0])
def test_mid_schedule_follows_epoch_progress(progress):
    # nanochat's midtraining: 1 for the first 80% of the epoch, then linearly down to 0
    expected = 1.0 if progress < 0.8 else 1 - (progress - 0.8) / 0.2
    assert lr_multiplier_at_progress(progress) == pytest.approx(expected, abs=1e-4)


def test_progress_outside_the_horizon_is_refused():
    with pytest.raises(ValueError, match="progress"):
        lr_multiplier_at_progress(1.2)


def test_steps_past_the_horizon_are_refused_not_extrapolated_to_negative_rates():
    with pytest.raises(ValueError, match="outside the schedule"):
        lr_multiplier(600, 500)


def test_is_due_runs_at_the_last_step_and_every_n_with_minus_one_meaning_only_the_last():
    due = lambda every, at_start=False: [s for s in range(8) if is_due(s, every, s == 7, at_start)]
    assert due(3) == [3, 6, 7]
    assert due(3, at_start=True) == [0, 3, 6, 7]  # evaluations also measure the starting model
    assert due(-1) == due(-1, at_start=True) == [7]


def test_epoch_steps_derives_the_horizon_or_says_what_to_change():
    assert epoch_steps(5, 1000, 10, 3, what="pairs", per_step_flag="pairs_per_step") == 5  # set: taken as is
    assert epoch_steps(-1, 1005, 10, 3, what="pairs", per_step_flag="pairs_per_step") == 300  # whole steps only
    with pytest.raises(ValueError, match="there are 9 pairs, fewer than one step of 10; lower --pairs_per_step or set "
                                         "--num_iterations"):
        epoch_steps(-1, 9, 10, 1, what="pairs", per_step_flag="pairs_per_step")
