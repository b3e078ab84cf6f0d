"""Request ids the gateway makes (gateway/downstream/serving.py RequestIds): one process's are
all different, across the thousands its counter is written in, and each is a valid
X-Request-Id."""

from __future__ import annotations

from gateway.downstream.connection import _valid_request_id
from gateway.downstream.serving import RequestIds


def test_ids_differ_across_thousands_and_count_up() -> None:
    ids = RequestIds()
    made = [ids.new() for _ in range(2_500)]
    assert len(set(made)) == len(made)
    prefix = made[0][: made[0].index(b"-") + 1]
    assert len(prefix) == 13  # 12 random hex digits and the dash
    numbers = [int(i.removeprefix(prefix)) for i in made]
    assert numbers == list(range(2_500))
    assert made[0] == prefix + b"000"
    assert made[999] == prefix + b"999"
    assert made[1000] == prefix + b"1000"
    assert made[2001] == prefix + b"2001"
    assert all(i.startswith(prefix) and _valid_request_id(i) for i in made)


def test_two_processes_worth_of_ids_do_not_meet() -> None:
    """Each RequestIds (each listener of each worker) has its own random prefix."""
    first, second = RequestIds(), RequestIds()
    assert not {first.new() for _ in range(100)} & {second.new() for _ in range(100)}
