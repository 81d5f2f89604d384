"""What a clinician looks at: each query photo beside its most similar cases, with the heatmaps.

`report(queries, index)` searches, then explains (fundus_sdk.explain) each query and each
retrieved case. The result writes as one self-contained HTML file (`Report.write_html`: every
image inline, a content-security policy that forbids any request, so it opens offline on a
hospital PC) or as a PNG of one query and its neighbours for a clinical note (`write_png`).
Both carry the model's name and version and the line DISCLAIMER. Patient identifiers appear
only where the index's metadata holds them, i.e. where whoever built the index kept them.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .atomic import write_output
from .errors import ImageError, OnError
from .explain import Explanation
from .filters import Where
from .index import Hit, Index, photo_of, searched
from .inputs import ImageInput
from .labels import ICDR, Scale, grade_name
from .model import Model, as_list
from .pipeline import warn_ungradable

DISCLAIMER = "A retrieval aid, not a diagnostic device."
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # nothing leaves the file
HIDDEN = ("gradability", "split")  # metadata shown otherwise (the score, the gate) or internal to a data set
HEATMAP_NOTE = (
    "The heatmap shows where inside the field of view the model gathered the evidence for its match (bright = "
    "more). It is not a lesion map: it marks no findings, and a dark area is not a healthy one."
)


@dataclass(frozen=True)
class Neighbour:
    """One retrieved case and its explanation (None, with the reason, when its photo cannot be read here)."""

    hit: Hit
    explanation: Explanation | None
    problem: str = ""


@dataclass(frozen=True)
class QueryReport:
    """One query: its explanation and its neighbours, best first."""

    query: Explanation
    neighbours: list[Neighbour]

    def grade_shares(self) -> dict[int, float]:
        """Share of each grade among the graded neighbours."""
        grades = Counter(n.hit.grade for n in self.neighbours if n.hit.grade is not None)
        total = sum(grades.values())
        return {g: c / total for g, c in sorted(grades.items())} if total else {}


@dataclass(frozen=True)
class Report:
    """A search, explained: what `report` returns; write it with `write_html` or `write_png`."""

    model: str  # name and version
    index: str  # the index's path
    cases: int
    priors: dict[int, float]  # share of each grade among the index's graded cases
    queries: list[QueryReport]
    created: str
    scale: Scale = ICDR  # the index's grading scale, for grade names

    @classmethod
    def build(cls, index: Index, results: Sequence[tuple[ImageInput, list[Hit]]]) -> "Report":
        """Explain queries whose neighbours were already found (`Index.search`) in `index`."""
        model = index.model
        info = index.info()
        graded = {int(g): n for g, n in info["grades"].items() if g != "none"}
        total = sum(graded.values())
        out = []
        for query, hits in results:
            (explained,) = model.explain([query])
            out.append(QueryReport(explained, explain_cases(model, hits)))
        return cls(
            model.name, str(index.path), len(index), {g: n / total for g, n in graded.items()} if total else {}, out,
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), index.scale,
        )  # fmt: skip

    def to_html(self) -> str:
        """The report as one HTML document (images inline as data: URIs)."""
        body = "\n".join(self._query_html(q, i) for i, q in enumerate(self.queries, 1))
        return PAGE.format(
            csp=CSP, title=esc(f"fundus-sdk report: {len(self.queries)} {'query' if len(self.queries) == 1 else 'queries'}"),
            disclaimer=esc(DISCLAIMER), model=esc(self.model), index=path_html(self.index), cases=self.cases,
            created=esc(self.created), style=STYLE, body=body,
            legend=" · ".join(esc(grade_name(g, self.scale)) for g in self.scale.values),
        )  # fmt: skip

    def write_html(self, path: str | Path) -> Path:
        """Write `to_html()` to `path` (fundus_sdk.atomic.write_output: atomically, readable by its
        owner only, since it names patients' photos; "-" is standard output)."""
        with write_output(path) as f:
            f.write(self.to_html())
        return Path(path)

    def panel(self, i: int = 0) -> Image.Image:
        """Query `i` and its neighbours as one picture: photo and heatmap, then each case's
        heatmap with its rank, grade and score, the model and the disclaimer underneath."""
        q = self.queries[i]
        tile, pad, per_row, big = 220, 10, 5, 330
        rows = max(1, -(-len(q.neighbours) // per_row))
        width = pad + per_row * (tile + pad)
        top = big + 3 * pad + 30
        canvas = Image.new("RGB", (width, top + rows * (tile + 40 + pad) + 50), "white")
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=15)
        draw.text((pad, pad), f"query: {short(q.query.name, 120)}", fill="black", font=font)
        canvas.paste(square(q.query.photo, big), (pad, 30 + pad))
        canvas.paste(square(q.query.overlay(), big), (2 * pad + big, 30 + pad))
        side_text = [*textwrap.wrap(verdict_text(q.query), 50), "", "grade  top %d  index" % len(q.neighbours)]
        shares = q.grade_shares()
        side_text += [f"{g:>5}  {100 * shares.get(g, 0):>5.0f}%  {100 * self.priors.get(g, 0):>4.0f}%"
                      for g in sorted(set(shares) | set(self.priors))]  # fmt: skip
        draw.multiline_text((3 * pad + 2 * big, 30 + pad), "\n".join(side_text), fill="black", font=font, spacing=5)
        for n, neighbour in enumerate(q.neighbours):
            x, y = pad + (n % per_row) * (tile + pad), top + (n // per_row) * (tile + 40 + pad)
            if neighbour.explanation is not None:
                canvas.paste(square(neighbour.explanation.overlay(), tile), (x, y))
            else:
                draw.rectangle((x, y, x + tile, y + tile), outline="grey")
                draw.text((x + 8, y + tile // 2), "photo not available", fill="grey", font=font)
            h = neighbour.hit
            draw.text((x, y + tile + 4), f"#{n + 1}  {grade_name(h.grade, self.scale)}", fill="black", font=font)
            draw.text((x, y + tile + 22), f"{h.score:.3f}  {short(Path(h.path or '').name, 20)}", fill="dimgrey", font=font)
        draw.text((pad, canvas.height - 40), f"{self.model} · {self.created} · {DISCLAIMER}", fill="black", font=font)
        return canvas

    def write_png(self, path: str | Path, i: int = 0) -> Path:
        """Write `panel(i)` as a PNG, atomically, readable by its owner only."""
        with write_output(path, text=False) as f:
            self.panel(i).save(f, format="PNG")
        return Path(path)

    def _query_html(self, q: QueryReport, number: int) -> str:
        shares = q.grade_shares()
        grades = sorted(set(shares) | set(self.priors))
        bars = "\n".join(
            f'<tr><td>{esc(grade_name(g, self.scale))}</td><td><div class="bar top" style="width:{100 * shares.get(g, 0):.1f}%"></div>'
            f'{100 * shares.get(g, 0):.0f}%</td><td><div class="bar prior" style="width:{100 * self.priors.get(g, 0):.1f}%">'
            f"</div>{100 * self.priors.get(g, 0):.0f}%</td></tr>"
            for g in grades
        ) or '<tr><td colspan="3">no graded cases</td></tr>'
        cards = "\n".join(case_html(rank, n, self.scale, n.hit.sha256 == q.query.sha256) for rank, n in enumerate(q.neighbours, 1))
        return QUERY.format(
            number=number, name=path_html(q.query.name), photo=data_uri(q.query.photo, 360),
            heat=data_uri(q.query.overlay(), 360), note=esc(HEATMAP_NOTE), verdict=esc(verdict_text(q.query)),
            k=len(q.neighbours), bars=bars, cards=cards,
        )  # fmt: skip


def explain_cases(model: Model, hits: list[Hit]) -> list[Neighbour]:
    """Each hit with the explanation of its case's photo, read from where the index says it is
    and shown only if it is still the photo that was indexed (same sha256)."""
    out = []
    for hit in hits:
        try:
            if hit.path is None or not Path(hit.path).is_file():
                raise ImageError(hit.path or f"case {hit.key}", "the photo is not at its indexed path")
            (explained,) = model.explain([photo_of(hit)])
            if explained.sha256 != hit.sha256:  # another photo copied over it: never shown as this case
                raise ImageError(hit.path, f"the photo at {hit.path} changed since it was indexed")
            out.append(Neighbour(hit, explained))
        except ImageError as err:
            out.append(Neighbour(hit, None, err.reason))
    return out


def report(
    queries: ImageInput | Sequence[ImageInput],
    index: Index | str | Path,
    *,
    k: int = 10,
    where: Where | None = None,
    exclude: Where | None = None,
    check: bool = True,
    on_error: OnError = "raise",
) -> Report:
    """Search `index` for each query image (as `Index.search`, gate included) and explain the results.

    The index's model must have the attention output (`Model.explains`; the bundled one has).
    A query that cannot be read or is not a fundus photograph goes to `on_error` ("raise", the
    default; "skip" warns and reports the others; or a callable), never into the report.
    """
    images = as_list(queries)
    with searched(index) as ix:
        answered = ix.query(images, k, where, exclude, check, on_error)
        warn_ungradable(answered)
        return Report.build(ix, [(image, r.hits) for image, r in zip(images, answered) if r.ok])


# -- rendering helpers ----------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def short(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3) :]


def square(image: Image.Image, side: int) -> Image.Image:
    """The image scaled (up or down) to fit a side x side square, aspect kept, centred on black."""
    scale = side / max(image.size)
    fitted = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    out = Image.new("RGB", (side, side), "black")
    out.paste(fitted, ((side - fitted.width) // 2, (side - fitted.height) // 2))
    return out


def data_uri(image: Image.Image, side: int) -> str:
    """A JPEG of the image, at most side x side pixels, as a data: URI."""
    fitted = image.convert("RGB")
    fitted.thumbnail((side, side), Image.LANCZOS)
    buf = io.BytesIO()
    fitted.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def verdict_text(explained: Explanation) -> str:
    v = explained.verdict
    if v is None:
        return "input gate: not checked (the model carries no calibration)"
    state = ("a colour fundus photograph" if v.fundus else "NOT a colour fundus photograph") + (
        ", gradable" if v.gradable else ", UNGRADABLE"
    )
    return f"input gate: {state} (fundus score {v.fundus_score:.2f}, gradability {v.gradability:.2f})" + (
        "; " + "; ".join(v.reasons) if v.reasons else ""
    )


def path_html(path: str) -> str:
    """A path that wraps at its separators in a narrow card."""
    return esc(path).replace("/", "/<wbr>").replace("\\", "\\<wbr>")


def case_html(rank: int, n: Neighbour, scale: Scale, is_query: bool = False) -> str:
    h = n.hit
    details = " · ".join(f"{esc(k)}: {esc(v)}" for k, v in h.metadata.items() if k not in HIDDEN and k != "eye")
    if n.explanation is not None:
        pictures = (
            f'<img class="case" alt="case {h.key} photo" src="{data_uri(n.explanation.photo, 200)}">'
            f'<img class="case heat" alt="case {h.key} heatmap" src="{data_uri(n.explanation.overlay(), 200)}">'
        )
    else:
        pictures = f'<div class="missing">photo not available: {esc(n.problem)}</div>'
    return CARD.format(
        rank=rank, pictures=pictures, grade=esc(grade_name(h.grade, scale)), score=f"{h.score:.3f}",
        eye=esc(h.metadata.get("eye", "-")), path=path_html(h.path or "-"), key=h.key, details=details,
        itself='<div class="itself">This is the query photo itself: it is already in the index.</div>' if is_query else "",
    )  # fmt: skip


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
header { border-bottom: 2px solid #444; margin-bottom: 1em; }
.disclaimer { font-weight: bold; color: #8a1c1c; }
section.query { border-top: 1px solid #bbb; padding-top: 1em; margin-top: 1.5em; }
.pair img { width: 360px; height: 360px; object-fit: contain; background: #000; margin-right: 8px; }
.cases { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ccc; padding: 6px; width: 368px; font-size: 0.9em; }
.card img.case { width: 180px; height: 180px; object-fit: contain; background: #000; }
.missing { height: 180px; display: flex; align-items: center; color: #888; }
.path { color: #555; overflow-wrap: anywhere; }
.itself { font-weight: bold; color: #1c4f8a; }
.note { max-width: 728px; color: #444; }
table.grades td { padding: 1px 8px; width: 14em; }
table.grades td:first-child { width: 3em; }
.bar { display: inline-block; height: 0.8em; margin-right: 6px; vertical-align: middle; }
.bar.top { background: #c2452d; } .bar.prior { background: #8a8a8a; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>Similar graded cases</h1>
<p class="disclaimer">{disclaimer}</p>
<p>Model <b>{model}</b> · index {index} ({cases} cases) · {created}</p>
<p>Heatmaps: where the model's mirror attention fell inside the field of view (bright = more).</p>
<p class="legend">Grades (ICDR where numbered): {legend}</p>
</header>
{body}
</body>
</html>
"""

QUERY = """<section class="query">
<h2>Query {number}: <span class="path">{name}</span></h2>
<div class="pair"><img class="query" alt="query photo" src="{photo}"><img class="query heat" alt="query heatmap" src="{heat}"></div>
<p class="note">{note}</p>
<p class="verdict">{verdict}</p>
<table class="grades"><tr><th>grade</th><th>top {k}</th><th>index</th></tr>
{bars}
</table>
<div class="cases">
{cards}
</div>
</section>"""

CARD = """<div class="card">
{itself}<div>{pictures}</div>
<div><b>#{rank}</b> · grade <b>{grade}</b> · score {score} · eye {eye} · case {key}</div>
<div class="path">{path}</div>
<div class="details">{details}</div>
</div>"""
