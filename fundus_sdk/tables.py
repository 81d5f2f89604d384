"""The one text-table formatter of every command line, report and benchmark."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(
    headers: Sequence[object], rows: Sequence[Sequence[object]], *, align: str | None = None, markdown: bool = False
) -> str:
    """Rows under headers: plain text with a rule under the headers, or a Markdown table.

    `align` has one letter per column, "l" or "r" (default: the first column left, the rest
    right, as numbers read best).
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join([lines[0], "|" + "---|" * len(headers), *lines[1:]])
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip() for r in cells
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
