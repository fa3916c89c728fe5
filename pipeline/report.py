"""Markdown tables of metric rows (the CLI and the benchmarks print the same format)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_value(value: Any, ci: Sequence[float] | None = None) -> str:
    if isinstance(value, float):
        text = f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"  # metrics vs. ms and seconds
        if ci is not None:
            text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
        return text
    return str(value).replace("|", "\\|")  # a pipe inside a cell ("HNSW32|efSearch=64") must be escaped


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table; a metric with a ``"<metric>_ci"`` entry prints as ``mean [lo, hi]``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [format_value(row.get(c, ""), row.get(f"{c}_ci")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
