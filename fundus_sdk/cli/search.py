"""`fundus-sdk search` and `fundus-sdk evaluate`: photos as queries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import metrics
from ..errors import Exit, ImageError, ModelError
from ..evaluation import evaluate_index
from ..filters import FilterError, compile_filter, conditions_to_where
from ..index import Index
from ..labels import read_labels
from ..records import Hit
from ..report import Report
from ..tables import format_table
from .common import check_option, gather, handle_errors, json_option, model_option, progress, quiet_option, report_failure


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False), help="The case index to search.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1, 1000), help="How many cases per photo.")
@click.option("--where", multiple=True, metavar="COND",
              help="Keep only cases where FIELD=VALUE[,VALUE...] or FIELD op VALUE, op one of != < <= > >= (repeatable).")
@click.option("--exclude", multiple=True, metavar="COND", help="Leave out cases matching COND, e.g. patient=10310 (repeatable).")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a self-contained visual report: photos, attention heatmaps, grades (opens offline).")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write each query and its cases as a PNG (several queries: NAME-1.png, NAME-2.png, ...).")
@model_option
@check_option
@json_option
@handle_errors
def search(images, index_dir, k, where, exclude, html_out, png_out, runtime, no_check, as_json) -> None:
    """Find the cases most similar to each photo.

    Values compare by type: numbers as numbers (as label CSVs store them), text as text. A
    field that no case has is an error naming the fields the index knows. A photo that the
    input gate judges not to be a colour fundus photograph gets no neighbours (named on
    stderr, exit status 1); an ungradable one gets them with a warning. --html and --png show
    the photos with the model's attention heatmaps (they need a model with the attention
    output, as the bundled one).

    \b
    Example:
      fundus-sdk search new_photo.jpg --index cases/ -k 5 --where grade=2,3 --exclude patient=10310
      fundus-sdk search new_photo.jpg --index cases/ --html report.html
    """
    try:
        filters, leave_out = conditions_to_where(where), conditions_to_where(exclude)
    except FilterError as exc:
        raise click.BadParameter(str(exc), param_hint="--where/--exclude") from None
    queries, missing = gather(images, recursive=False)  # a folder of query photos, as embed and add take
    failures = len(missing)
    with runtime.open(index_dir, read_only=True) as ix:
        if (html_out or png_out) and not ix.model.explains:
            raise ModelError(f"{ix.model.path}: this model has no attention output, which --html/--png show; "
                             f"add it with `python -m export.explain {ix.model.path}`")  # fmt: skip
        if filters or leave_out:
            try:
                compile_filter(filters, leave_out, ix.fields())  # an unknown field fails here, before any embedding
            except FilterError as exc:
                raise click.BadParameter(str(exc), param_hint="--where/--exclude") from None
            if not ix.cases(filters or None, leave_out or None):  # said before any embedding, not as an empty table
                click.echo(f"error: no case matches {filter_text(where, exclude)}; {known_values(ix, [*filters, *leave_out])}",
                           err=True)  # fmt: skip
                sys.exit(Exit.PARTIAL)
        results = ix.query(queries, k, filters or None, leave_out or None, check=not no_check, on_error=report_failure)
        for result in results:
            if result.ok and result.verdict is not None and not result.verdict.gradable:
                click.echo(f"warning: {result.query}: {result.verdict.summary()}", err=True)
        answered = [(image, r) for image, r in zip(queries, results) if r.ok]
        failures += len(results) - len(answered)
        if (html_out or png_out) and answered:
            write_reports(Report.build(ix, [(image, r.hits) for image, r in answered]), html_out, png_out)
    if as_json:
        click.echo(json.dumps([
            {"query": r.query, "verdict": r.verdict.to_dict() if r.verdict else None, "hits": [h.to_dict() for h in r.hits]}
            for _, r in answered
        ], indent=2))  # fmt: skip
    else:
        for _, r in answered:
            click.echo(format_hits(r.query, r.hits))
    if failures:
        sys.exit(Exit.PARTIAL)


def filter_text(where: tuple[str, ...], exclude: tuple[str, ...]) -> str:
    return " ".join([*(f"--where {w}" for w in where), *(f"--exclude {e}" for e in exclude)])


def known_values(ix: Index, fields: list[str], most: int = 8) -> str:
    """What the index holds in `fields`, for a filter that matched nothing: 'eye: left, right'."""
    seen: dict[str, set] = {f: set() for f in fields}
    for case in ix:
        for f in fields:
            value = case.value(f)
            if value is not None and len(seen[f]) <= most:
                seen[f].add(value)
    return "; ".join(f"{f} holds " + (", ".join(map(repr, sorted(v, key=str)[:most])) + (", ..." if len(v) > most else "")
                     if v else "no values") for f, v in seen.items())  # fmt: skip


def write_reports(report: Report, html_out: Path | None, png_out: Path | None) -> None:
    """The --html file and the --png picture(s) of `search`, each named on stderr."""
    if html_out:
        click.echo(f"wrote {report.write_html(html_out)}", err=True)
    if png_out:
        many = len(report.queries) > 1
        for i in range(len(report.queries)):
            target = png_out.with_name(f"{png_out.stem}-{i + 1}{png_out.suffix or '.png'}") if many else png_out
            click.echo(f"wrote {report.write_png(target, i)}", err=True)


def format_hits(query: str, hits: list[Hit]) -> str:
    rows = [
        [rank, f"{h.score:.3f}", "-" if h.grade is None else h.grade, h.key, h.path or ""] for rank, h in enumerate(hits, 1)
    ]
    return f"{query}\n" + format_table(["rank", "score", "grade", "key", "path"], rows, align="rrrrl")


@click.command()
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False), help="The graded gallery.")
@click.option("--queries", required=True, type=click.Path(dir_okay=False), help="CSV with columns image, grade.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--keep-own-patient", is_flag=True,
              help="Count the query patient's other photos (e.g. the fellow eye) as results; left out by default.")
@model_option
@json_option
@quiet_option
@handle_errors
def evaluate(index_dir, queries, k, keep_own_patient, runtime, as_json, quiet) -> None:
    """Retrieval quality of an index for graded query photos: mHR@k, mAP@k, AP@k, NDCG@k.

    Per grade and averaged (micro over queries, macro over grades), each next to its chance
    level. Query photos already in the index (same content hash) never count as their own hit,
    and where the queries CSV has a patient column, the patient's other photos in the index are
    left out too (--keep-own-patient counts them); the output says what was left out.

    \b
    Example:
      fundus-sdk evaluate --index cases/ --queries test.csv -k 10
    """
    failures: list[ImageError] = []

    def failed(err: ImageError) -> None:
        failures.append(err)
        report_failure(err)

    with runtime.open(index_dir, read_only=True) as ix:
        labels = read_labels(queries, scale=ix.scale)
        with progress(len(labels), "evaluating", quiet) as advance:
            report = evaluate_index(ix, labels, k, on_error=failed, progress=advance, own_patient=keep_own_patient)
    left_out = "; ".join(f"{what}: {how}" for what, how in report["left_out"].items())
    click.echo(json.dumps(report, indent=2) if as_json else f"{metrics.format_report(report)}\nleft out of results: {left_out}")
    if failures:
        sys.exit(Exit.PARTIAL)

