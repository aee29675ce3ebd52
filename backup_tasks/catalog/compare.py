"""Comparing row counts: the manifest's (what was backed up) against a restored database's."""

from __future__ import annotations


def compare_counts(expected: dict[str, int], restored: dict[str, int]) -> list[str]:
    """Describe every difference between the manifest's row counts and the restored database."""
    problems = [f"table {name} is missing from the restored database" for name in expected if name not in restored]
    problems += [f"table {name}: {restored[name]} rows restored, {count} backed up"
                 for name, count in expected.items() if name in restored and restored[name] != count]
    problems += [f"table {name} is in the restored database but not in the manifest"
                 for name in restored if name not in expected]
    return problems
