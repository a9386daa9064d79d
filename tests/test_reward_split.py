"""An independent judge from the same project: `train-rm --project P --split test` trains on the
pairs a model trained with the default split holds out, so proxy and judge share no pair."""

from __future__ import annotations

import pytest

from annotation.io import import_file
from conftest import hh_dev_path
from reward.data import training_data
from reward.errors import RewardError
from reward.usecases import TrainRMSpec


def test_the_test_split_trains_a_judge_on_exactly_the_pairs_the_proxy_held_out(engine):
    import_file(engine, hh_dev_path(), "hh", format="auto")
    proxy_train, proxy_held = training_data(project="hh", engine=engine)
    judge_train, judge_held = training_data(project="hh", engine=engine, split="test")
    key = lambda pairs: {(str(p.prompt), p.chosen, p.rejected) for p in pairs}  # noqa: E731
    assert key(judge_train) == key(proxy_held) and key(judge_held) == key(proxy_train)
    assert not key(judge_train) & key(proxy_train) and len(judge_train) > 50


def test_split_is_checked_by_the_spec():
    with pytest.raises(RewardError, match="--split 'dev' is invalid"):
        TrainRMSpec(project="hh", split="dev").validate()
    with pytest.raises(RewardError, match="--split applies to --project"):
        TrainRMSpec(data="x.jsonl", split="test").validate()
