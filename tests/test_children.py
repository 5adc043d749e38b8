"""netd.children: admission tickets, the child table and the pool of places shared by
every spawner (a real semaphore, shared across a real fork)."""

from __future__ import annotations

import os

from netd.children import Child, ChildPool, ChildTable, Ticket
from netd.policy import Counters


def test_a_ticket_counts_its_connection_until_released_once() -> None:
    counters = Counters()
    pool = ChildPool(2)
    assert pool.take()
    ticket = Ticket(counters, "10.0.0.1", pool)
    assert (counters.children, counters.from_source("10.0.0.1"), pool.in_use()) == (1, 1, 1)
    ticket.release()
    ticket.release()  # a second release gives nothing back twice
    assert (counters.children, counters.from_source("10.0.0.1"), pool.in_use()) == (0, 0, 0)


def test_the_table_releases_a_childs_ticket_when_it_ends() -> None:
    counters = Counters()
    table = ChildTable()
    table.add(Child(101, "cat", Ticket(counters, None, None)))
    table.add(Child(102, "cat", Ticket(counters, "uid:0", None), own=False))
    assert (len(table), table.own(), counters.children) == (2, 1, 2)
    ended = table.pop(101)
    assert ended is not None and ended.service == "cat"
    assert (len(table), table.own(), counters.children) == (1, 0, 1)
    assert table.pop(101) is None  # not ours (any more): nothing released
    assert counters.children == 1
    table.pop(102)
    assert counters.children == 0 and counters.by_source == {}


def test_the_pool_is_bounded_and_unbounded_without_a_limit() -> None:
    bounded = ChildPool(3)
    assert [bounded.take() for _ in range(4)] == [True, True, True, False]
    assert bounded.in_use() == 3
    bounded.give_back()
    assert bounded.take()
    unbounded = ChildPool(None)
    assert all(unbounded.take() for _ in range(10_000))
    assert unbounded.in_use() == 0


def test_the_pool_is_shared_with_a_forked_process() -> None:
    """A place taken in a spawner (a forked process) is taken for every other one."""
    pool = ChildPool(2)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if pool.take() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.in_use() == 1
    assert pool.take()
    assert not pool.take()
