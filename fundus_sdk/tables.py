"""The one text-table formatter of every command line, report and benchmark."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[object], rows: Sequence[Sequence[object]], *, markdown: bool = False) -> str:
    """Rows under headers: plain text (first column left-aligned, the rest right-aligned, a rule
    under the headers) or, with `markdown`, a Markdown table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join([lines[0], "|" + "---|" * len(headers), *lines[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
