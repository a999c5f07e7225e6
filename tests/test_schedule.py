"""LR schedules: nanoGPT's warmup+cosine, WSD, continuation policies, saved state."""

from __future__ import annotations

import json
import math

import pytest

from configs.schema import TrainConfig
from gpt.schedule import Schedule


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """karpathy/nanoGPT train.py's get_lr, verbatim."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


SEED_RUN = TrainConfig(max_iters=6000, learning_rate=5e-4, min_lr=5e-5, warmup_iters=700)


def test_cosine_matches_nanogpt_everywhere():
    schedule = Schedule.from_config(SEED_RUN)
    for it in range(0, 6200):
        assert schedule.lr_at(it) == nanogpt_get_lr(it, 5e-4, 700, 6000, 5e-5), it


def test_cosine_known_points():
    schedule = Schedule.from_config(SEED_RUN)
    assert schedule.lr_at(0) == pytest.approx(5e-4 / 701)
    assert schedule.lr_at(700) == pytest.approx(5e-4)  # peak right after warmup
    assert schedule.lr_at(3350) == pytest.approx((5e-4 + 5e-5) / 2)  # half way down the cosine
    assert schedule.lr_at(6000) == 5e-5
    assert schedule.lr_at(9000) == 5e-5


def test_lr_decay_iters_shorter_than_max_iters():
    schedule = Schedule.from_config(SEED_RUN.model_copy(update={"lr_decay_iters": 4000}))
    assert schedule.lr_at(4000) == 5e-5 and schedule.lr_at(5000) == 5e-5
    assert schedule.lr_at(2000) == nanogpt_get_lr(2000, 5e-4, 700, 4000, 5e-5)


def test_wsd_shape():
    train = TrainConfig(schedule="wsd", max_iters=1000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, wsd_decay_fraction=0.2)
    schedule = Schedule.from_config(train)
    assert schedule.lr_at(99) == pytest.approx(1e-3 * 100 / 101)
    assert all(schedule.lr_at(it) == 1e-3 for it in range(100, 800))  # stable
    assert schedule.lr_at(900) == pytest.approx((1e-3 + 1e-4) / 2)  # linear decay over the last 200
    assert schedule.lr_at(999) == pytest.approx(1e-4 + 9e-4 / 200)
    assert schedule.lr_at(1000) == 1e-4
    decay = [schedule.lr_at(it) for it in range(800, 1001)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def continue_to(schedule: Schedule, base: TrainConfig, **changes) -> tuple[Schedule, object]:
    train = base.model_copy(update=changes)
    return schedule.continued(train, at_iter=schedule.max_iters)


def test_rewarm_6k_to_20k_has_no_jump_and_reaches_min_lr():
    old = Schedule.from_config(SEED_RUN)
    new, continuation = continue_to(old, SEED_RUN, max_iters=20000, continue_policy="rewarm", rewarm_iters=200)
    for it in range(6000):
        assert new.lr_at(it) == old.lr_at(it)  # the history is unchanged
    ended = old.lr_at(5999)
    steps = [abs(new.lr_at(it + 1) - new.lr_at(it)) for it in range(5990, 20100)]
    assert abs(new.lr_at(6000) - ended) < 5e-4 / 200  # one small warmup step, no jump
    assert max(steps) < 5e-4 / 150
    assert new.lr_at(6199) == pytest.approx(ended + (5e-4 - ended) * 200 / 201)
    assert new.lr_at(6200) == pytest.approx(5e-4)
    assert new.lr_at(20000) == 5e-5 and new.lr_at(19999) == pytest.approx(5e-5, rel=1e-3)
    assert continuation.lr_before == ended and not continuation.is_jump
    assert "iteration 6000" in continuation.describe()


def test_extend_cosine_reports_the_jump():
    old = Schedule.from_config(SEED_RUN)
    new, continuation = continue_to(old, SEED_RUN, max_iters=20000, continue_policy="extend")
    expected = nanogpt_get_lr(6000, 5e-4, 700, 20000, 5e-5)  # as if 20k had been the target
    assert new.lr_at(6000) == expected
    assert new.lr_at(20000) == 5e-5
    assert continuation.is_jump
    assert continuation.jump == pytest.approx(expected - old.lr_at(5999))
    assert f"jump of {continuation.jump:+.3e}" in continuation.describe()


def test_rewarm_without_warmup_iterations_is_reported_as_a_jump():
    old = Schedule.from_config(SEED_RUN)
    _, continuation = continue_to(old, SEED_RUN, max_iters=20000, rewarm_iters=0)
    assert continuation.is_jump and continuation.lr_after == 5e-4
    assert "raise train.rewarm_iters" in continuation.describe()


def test_extend_wsd_before_its_decay_continues_the_stable_phase():
    train = TrainConfig(schedule="wsd", max_iters=1000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, wsd_decay_fraction=0.2)
    old = Schedule.from_config(train)
    new, continuation = old.continued(train.model_copy(update={"max_iters": 2000, "continue_policy": "extend"}), at_iter=700)
    assert [new.lr_at(it) for it in range(700, 1600)] == [1e-3] * 900
    assert new.lr_at(1800) == pytest.approx((1e-3 + 1e-4) / 2)  # the last 20% of 2000: 1600→2000
    assert new.lr_at(2000) == 1e-4
    assert continuation.jump == 0 and not continuation.is_jump  # resumed at 700, before the decay


def test_rewarm_of_wsd_decays_over_its_share_of_the_new_segment():
    train = TrainConfig(schedule="wsd", max_iters=1000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, wsd_decay_fraction=0.2)
    old = Schedule.from_config(train)
    new, _ = continue_to(old, train, max_iters=2000, rewarm_iters=50)
    ended = old.lr_at(999)
    assert new.lr_at(1000) == pytest.approx(ended + (1e-3 - ended) / 51)
    assert new.lr_at(1050) == 1e-3 and new.lr_at(1799) == 1e-3
    assert new.lr_at(2000) == 1e-4


def test_two_continuations_keep_the_history():
    old = Schedule.from_config(SEED_RUN)
    middle, _ = continue_to(old, SEED_RUN, max_iters=10000)
    final, _ = continue_to(middle, SEED_RUN, max_iters=20000)
    assert [final.lr_at(it) for it in range(0, 10000, 7)] == [middle.lr_at(it) for it in range(0, 10000, 7)]
    assert len(final.segments) == 3


def test_state_round_trip_through_json():
    old = Schedule.from_config(SEED_RUN)
    schedule, _ = continue_to(old, SEED_RUN, max_iters=20000)
    restored = Schedule.from_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert restored == schedule
    assert [restored.lr_at(it) for it in range(0, 20001, 13)] == [schedule.lr_at(it) for it in range(0, 20001, 13)]


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
@pytest.mark.parametrize("at_iter", [300, 700, 4000, 6000])
def test_a_lowered_lr_rescales_the_rest_of_the_curve_and_keeps_the_past(kind, at_iter):
    before = SEED_RUN.model_copy(update={"schedule": kind})
    lowered = before.model_copy(update={"learning_rate": 2e-4, "min_lr": 2e-5})
    rescaled = Schedule.from_config(before).rescaled(2e-4, 2e-5, at_iter)
    fresh_lowered, original = Schedule.from_config(lowered), Schedule.from_config(before)
    for it in range(0, 6200, 7):
        expected = original if it < at_iter else fresh_lowered  # the past as trained, the rest on the lower curve
        assert rescaled.lr_at(it) == pytest.approx(expected.lr_at(it), rel=1e-12), it
    assert Schedule.from_state_dict(json.loads(json.dumps(rescaled.state_dict()))) == rescaled
