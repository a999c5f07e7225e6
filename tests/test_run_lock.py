"""Two flow runs never train into the same run folder at once."""

from __future__ import annotations

import pytest

from tasks.train import RunLockedError, exclusive_run


def test_a_second_trainer_of_the_same_run_is_refused_with_the_holder_named(tmp_path):
    run = tmp_path / "runs" / "demo"
    with exclusive_run(run):
        with pytest.raises(RunLockedError, match=r"run demo is being trained by pid \d+.*train.run_name"):
            with exclusive_run(run):
                pass
    with exclusive_run(run):  # released when the first trainer finishes
        pass


def test_different_runs_train_side_by_side(tmp_path):
    with exclusive_run(tmp_path / "runs" / "a"), exclusive_run(tmp_path / "runs" / "b"):
        pass
