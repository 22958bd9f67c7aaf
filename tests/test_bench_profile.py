"""The profile's share count, on made-up py-spy stacks: nothing is sampled."""

from __future__ import annotations

from bench.profile import shares

_STACKS = "\n".join(
    [
        "<module> (bench/profile.py:10);Stagehand.insert (stagehand/_instance.py:382);"
        "Queue._push_unlocked (stagehand/_queue.py:226) 30",
        "<module> (bench/profile.py:10);Stagehand.insert (stagehand/_instance.py:382) 20",
        "Thread.run (threading.py:982);Executor.run (stagehand/_execute.py:126);"
        "Retention.add (stagehand/_retention.py:60) 10",
        "Thread.run (threading.py:982);Executor.run (stagehand/_execute.py:126) 40",
        "not a stack line",
        "",
    ]
)


def test_shares_count_callees_inclusively() -> None:
    total, parts = shares(_STACKS)
    counts = dict(parts)

    assert total == 100
    assert counts["insert(job)"] == 50
    assert counts["  of which the push"] == 30
    assert counts["one attempt (Executor.run)"] == 50
    assert counts["  of which retention"] == 10
    assert counts["Worker.new(args)"] == 0


def test_shares_of_empty_output() -> None:
    total, parts = shares("")

    assert total == 0
    assert all(samples == 0 for _, samples in parts)
