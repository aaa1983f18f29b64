"""Dask keys of different types and values never share a scheduler key:
sharing one would hand one task's result to another."""

from __future__ import annotations

import pytest

from rdask.keys import key_str


def inc(x):
    return x + 1


def neg(x):
    return -x


DISTINCT = [
    "x", "('y', 1)", ("y", 1), ("y", "1"), ("y", 1.0), ("y", b"1"), ("y", (1,)), ("y", 1, 2),
    1, "1", 1.5, "1.5", b"x", "b'x'", "~1", "~'x'", "(", "((", "~", "", None, "None", True, "True",
    ("a-b", 0), "a-b", ("~x",), "(~x,)", ("('y', 1)",),
]


def test_distinct_keys_have_distinct_names():
    names = [key_str(k) for k in DISTINCT]
    assert len(set(names)) == len(names), sorted(names)


def test_plain_string_keys_and_tuples_keep_their_readable_form():
    assert key_str("inc-abc123") == "inc-abc123"
    assert key_str(("array-abc", 0, 1)) == "('array-abc', 0, 1)"


@pytest.mark.parametrize("key, other", [(("y", 1), "('y', 1)"), (1, "1"), (b"x", "b'x'"), ("~1", 1)])
def test_submits_under_colliding_reprs_keep_their_own_results(client, key, other):
    a = client.submit(inc, 1, key=key)
    b = client.submit(neg, 100, key=other)
    assert a.result(timeout=30) == 2
    assert b.result(timeout=30) == -100
    assert a.key == key and b.key == other


def test_one_graph_with_keys_whose_reprs_collide(client):
    dsk = {("y", 1): (inc, 1), "('y', 1)": (neg, 100), "z": (sum, [("y", 1), "('y', 1)"])}
    assert client.get(dsk, ["z", ("y", 1), "('y', 1)"]) == [-98, 2, -100]
