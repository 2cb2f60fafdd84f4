"""Which CPU each service process is pinned to with services.pin_cpus."""

from __future__ import annotations

from tollway.workers import cpu_for


def test_workers_take_the_last_cpus_first_and_wrap_around() -> None:
    assert [cpu_for(i, {0, 1, 2, 3}) for i in range(5)] == [3, 2, 1, 0, 3]


def test_only_the_cpus_the_process_may_use() -> None:
    """A cpuset (a container's, taskset's) that leaves gaps: the pins stay inside it."""
    assert [cpu_for(i, {2, 5, 7}) for i in range(3)] == [7, 5, 2]
    assert cpu_for(0, {4}) == 4
