"""Comparing row counts: the manifest's (what was backed up) against a restored database's.

A logical restore brings back every row of the dump, unlogged tables included: its counts must be
equal. A physical recovery (a snapshot and WAL) brings back no unlogged table's rows, and a server
still in recovery cannot even read one: ``expected_after_recovery`` turns a dump's counts into what
such a copy of the same moment must show, and those tables are named, never counted.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping


def compare_counts(expected: Mapping[str, int], restored: Mapping[str, int]) -> list[str]:
    """Describe every difference between the manifest's row counts and the restored database."""
    problems = [f"table {name} is missing from the restored database" for name in expected if name not in restored]
    problems += [f"table {name}: {restored[name]} rows restored, {count} backed up"
                 for name, count in expected.items() if name in restored and restored[name] != count]
    problems += [f"table {name} is in the restored database but not in the manifest"
                 for name in restored if name not in expected]
    return problems


def expected_after_recovery(expected: Mapping[str, int], *, unlogged: Collection[str],
                            partitions: Mapping[str, Collection[str]]) -> dict[str, int]:
    """The counts a physical recovery of the moment of ``expected`` (a dump's counts) must show.

    ``unlogged``: the tables expected empty (the dump manifest's ``unlogged_tables``, or the recovered
    catalog's): left out, as ``count_rows(recovered=True)`` leaves them out. ``partitions``: each
    partitioned table's leaf partitions (``partition_leaves``): a parent's count loses the rows of its
    unlogged partitions, which the dump counted in it.
    """
    left_out = set(unlogged)
    result = {}
    for name, count in expected.items():
        if name in left_out:
            continue
        result[name] = count - sum(expected.get(leaf, 0) for leaf in partitions.get(name, ()) if leaf in left_out)
    return result
