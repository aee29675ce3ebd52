"""What a benchmark leaves behind: result files under ``bench/results/``, Markdown tables, paired ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from support.paths import RESULTS_DIR


def stamp() -> str:
    """The time a result file is named by: ``20261130T130333`` (local time)."""
    return time.strftime("%Y%m%dT%H%M%S")


def write_results(stem: str, documents: Mapping[str, str], *, directory: Path = RESULTS_DIR,
                  also_as: str | None = None) -> Path:
    """``documents`` (suffix -> text) as ``directory/<stem><suffix>``, and as ``<also_as><suffix>`` if given.

    Returns ``directory/<stem>`` (without a suffix), for the message that says where they are.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for suffix, text in documents.items():
        (directory / f"{stem}{suffix}").write_text(text)
        if also_as:
            (directory / f"{also_as}{suffix}").write_text(text)
    return directory / stem


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """The lines of a Markdown table; ``align`` has an ``l`` or ``r`` per column (missing: ``l``)."""
    rule = "".join("|---:" if align[i:i + 1] == "r" else "|---" for i in range(len(header))) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> tuple[float, list[float]]:
    """The median of the per-round ratios ``b / a`` and the ratios themselves.

    A and B ran back to back in each round, so load from other work on the machine hits both sides
    of a pair: their ratio is steadier than the ratio of the two medians.
    """
    pairs = [y / x for x, y in zip(a, b, strict=True)]
    return statistics.median(pairs), pairs
