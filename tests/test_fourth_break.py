"""A fourth review of the testing helpers: a non-state filter fails clearly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import stagehand
from stagehand import Job, Worker, testing


class Echo(Worker):
    def perform(self, job: Job) -> Any:
        return job.args


@pytest.fixture
def manual() -> Iterator[stagehand.Stagehand]:
    with stagehand.Stagehand(testing="manual", name="fourth-break") as instance:
        yield instance


@pytest.mark.parametrize("call", ["all_enqueued", "assert_enqueued", "wait_for_job"])
def test_state_filter_int_rejected(manual: stagehand.Stagehand, call: str) -> None:
    job = Echo.new({"n": 1}).insert(manual)
    with pytest.raises(stagehand.InvalidOption, match="state must be"):
        if call == "wait_for_job":
            testing.wait_for_job(job, 5, timeout=1)  # type: ignore[arg-type]
        else:
            getattr(testing, call)(manual, state=5)
