"""`fundus-sdk index ...`: create, fill, inspect, correct and rebuild a case index."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import click

from ..dicom import Frame
from ..embeddings import is_embeddings, read_embeddings
from ..errors import Exit, ImageError
from ..index import Conflict, Index, rebuild
from ..labels import parse_value
from ..pipeline import label_metadata
from ..tables import format_table
from .common import (
    batch_option,
    case_ref,
    check_option,
    gather,
    handle_errors,
    json_option,
    model_option,
    progress,
    quiet_option,
    recursive_option,
    report_failure,
)

COMMIT_SECONDS = 20.0  # `index add` commits at least this often: what an interruption can lose


@click.group()
def index() -> None:
    """Create, fill and inspect a case index (a directory).

    \b
    Example:
      fundus-sdk index create cases/
      fundus-sdk index add cases/ photos/ --labels grades.csv
      fundus-sdk index info cases/
    """


@index.command("create")
@click.argument("directory", type=click.Path(file_okay=False))
@model_option
@click.option("--dtype", type=click.Choice(["f16", "f32"]), default="f16", show_default=True, help="How vectors are stored for search.")
@handle_errors
def index_create(directory, runtime, dtype) -> None:
    """Create an empty case index in DIRECTORY for the model's vectors.

    \b
    Example:
      fundus-sdk index create cases/
    """
    with Index.create(directory, model=runtime.load(), dtype=dtype) as ix:
        click.echo(f"created {directory} for {ix.info()['model_name']} (dimension {ix.dim}, {dtype})")


@index.command("add")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--labels", type=click.Path(dir_okay=False), help="CSV with columns image, grade and any others (kept as metadata).")
@click.option("--allow-unlabelled", is_flag=True, help="With --labels: add photos that have no row (without a grade) instead of skipping them.")
@click.option("--ungraded", is_flag=True, help="With --labels: the CSV has no grade column on purpose (the cases are added ungraded).")
@click.option("--update", is_flag=True, help="Photos already in the index: store the given metadata instead of keeping the stored values.")
@recursive_option
@batch_option
@model_option
@check_option
@click.option("--keep-identifiers", is_flag=True,
              help="DICOM: store patient names, IDs, birth dates and other identifiers (by default only a pseudonym).")
@quiet_option
@handle_errors
def index_add(
    directory, paths, labels, allow_unlabelled, ungraded, update, recursive, batch_size, runtime, no_check, keep_identifiers,
    quiet,
) -> None:  # fmt: skip
    """Add photos (or an .npz/.jsonl written by `fundus-sdk embed`) to the index in DIRECTORY.

    With --labels, each photo's row is found by its path relative to the folder given (or as
    the CSV names it, against the CSV's folder); a bare file name that fits two photos is an
    error. Photos without a row are named and skipped (--allow-unlabelled adds them ungraded);
    a CSV without a grade column is an error unless --ungraded.
    Photos already in the index (same content) are recognised before any decoding and not
    embedded again; metadata other than the stored one is named and not applied unless
    --update. Pictures the input gate judges not to be colour fundus photographs are named
    and skipped (--no-check adds them); each case keeps the gate's gradability score. Work is
    committed every 20 seconds: an interruption loses at most that, and a re-run completes
    exactly what is missing. DICOM files (recognised by content; a multi-frame file is one case
    per frame) add their header's eye, UIDs, date, manufacturer and model, and a pseudonym of the
    patient, never the patient's name or ID unless --keep-identifiers.

    \b
    Example:
      fundus-sdk index add cases/ photos/ --labels grades.csv
    """
    ix = runtime.open(directory)
    failures, conflicts = 0, 0

    def failed(err: ImageError, reported: bool = False) -> None:
        nonlocal failures
        failures += 1
        if not reported:
            report_failure(err)

    corrections: dict[int, dict] = {}  # --update: the given values of cases already held, by key

    def conflict(c: Conflict) -> None:
        nonlocal conflicts
        if update:
            corrections.setdefault(c.key, {})[c.field] = c.given
            return
        conflicts += 1
        click.echo(f"kept {c} (--update stores it)", err=True)

    added: list[int | None] = []
    with ix:
        first_new = ix.last_key + 1  # keys are never reused: this call's new cases have keys from here
        try:
            add_inputs(ix, paths, labels, allow_unlabelled, ungraded, recursive, batch_size, no_check, keep_identifiers,
                       quiet, failed, conflict, added)  # fmt: skip
        except KeyboardInterrupt:
            new = len(ix_keys_since(ix, first_new))
            click.echo(f"interrupted: {new} cases were committed before it and are kept; the same command adds the rest",
                       err=True)  # fmt: skip
            sys.exit(Exit.INTERRUPTED)
        for key, values in corrections.items():
            ix.update(key, values)
        new = len({k for k in added if k is not None and k >= first_new})
        kept = f", {conflicts} conflicting values kept" if conflicts else ""
        updated = f", {len(corrections)} updated" if update else ""
        click.echo(f"added {new} cases{updated} ({failures} failed{kept}); {directory} now holds {len(ix)}")
    if failures or conflicts:
        sys.exit(Exit.PARTIAL)


def ix_keys_since(ix: Index, first: int) -> list[int]:
    """Keys of the cases now in `ix` from `first` on (this call's, and any another writer added meanwhile)."""
    return [c.key for c in ix.cases(where={"key": {">=": first}})]


def add_inputs(
    ix: Index, paths, labels, allow_unlabelled, ungraded, recursive, batch_size, no_check, keep_identifiers, quiet,
    failed: Callable[[ImageError], None], conflict: Callable[[Conflict], None], added: list[int | None],
) -> None:  # fmt: skip
    """`index add`'s work: embedding files, then photos; each call's keys are appended to `added`."""

    def note(text: str) -> None:
        click.echo(f"note: {text}", err=True)

    for file in (p for p in paths if is_embeddings(p)):
        data = read_embeddings(file)
        keep, meta = label_metadata([Path(p) for p in data.paths], labels, [], allow_unlabelled, failed, ix.scale, ungraded, note)
        added += ix.add(data.take(keep), [meta[i] for i in keep], on_error=failed, on_conflict=conflict, check=not no_check)
    photos = [p for p in paths if not is_embeddings(p)]
    files, missing = gather(photos, recursive) if photos else ([], [])
    for err in missing:  # named on stderr by gather
        failed(err, reported=True)
    if files:
        folders = [Path(p) for p in photos if Path(p).is_dir()]
        plain = [f.path if isinstance(f, Frame) else f for f in files]  # labels name files, not frames
        keep, meta = label_metadata(plain, labels, folders, allow_unlabelled, failed, ix.scale, ungraded, note)
        with progress(len(keep), "adding", quiet) as advance:
            keys = ix.add(
                [files[i] for i in keep], [meta[i] for i in keep], on_error=failed, on_conflict=conflict,
                batch_size=batch_size, commit_seconds=COMMIT_SECONDS, progress=advance, check=not no_check,
                keep_identifiers=keep_identifiers,
            )  # fmt: skip
        first: dict[int, Path | Frame] = {}
        for i, key in zip(keep, keys):
            if key is not None and first.setdefault(key, files[i]) is not files[i]:
                note(f"{files[i]} is the same photo as {first[key]} (same content): one case, key {key}")
        added += keys


@index.command("info")
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
@handle_errors
def index_info(directory, as_json) -> None:
    """Show what an index holds: cases, grades, model, storage.

    \b
    Example:
      fundus-sdk index info cases/ --json
    """
    with Index.open(directory, read_only=True) as ix:
        info = ix.info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(describe_index(info))


def describe_index(info: dict) -> str:
    """`index info` in words: what a user needs to know of an index, none of its internals."""
    grades = info["grades"]
    counts = ", ".join(f"{n:,} {'ungraded' if g == 'none' else f'grade {g}'}" for g, n in grades.items()) or "none yet"
    paths = f"relative to {info['root']}" if info.get("root") else "absolute"
    lines = [
        ("index", info["path"]),
        ("cases", f"{info['cases']:,} ({counts})"),
        ("model", f"{info.get('model_name', 'unknown')} (fingerprint {info['model_fingerprint'][:12]})"),
        ("grading scale", info.get("scale", "0-4")),
        ("vectors", f"{info['dim']} dimensions, stored as {info['dtype']}"),
        ("photo paths", paths),
        ("created", info.get("created", "unknown")),
        ("changes", f"{info['generation']} committed"),
    ]
    return "\n".join(f"{name:>14}: {value}" for name, value in lines)


@index.command("check")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--repair", is_flag=True, help="Rewrite the vector file from SQLite and remove leftovers of interrupted writers.")
@json_option
@handle_errors
def index_check(directory, repair, as_json) -> None:
    """Check an index: rows against searchable vectors, the vector file's checksum, damaged rows.

    Exit status 0 when consistent (or repaired), 1 when not. A directory left by an interrupted
    `index create` holds no index: create it again.

    \b
    Example:
      fundus-sdk index check cases/ --repair
    """
    with Index.open(directory, read_only=not repair) as ix:
        report = ix.check(repair=repair)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            click.echo(f"{key:>15}: {value}")
    if not (report["ok"] or report.get("repaired")):
        sys.exit(Exit.PARTIAL)


@index.command("remove")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("cases", nargs=-1, required=True)
@handle_errors
def index_remove(directory, cases) -> None:
    """Remove cases named by key (as `search` shows them), sha256 or photo path.

    \b
    Example:
      fundus-sdk index remove cases/ 12 13 photos/p7_left.jpg
    """
    with Index.open(directory) as ix:
        refs = [case_ref(c) for c in cases]
        absent = [c for c, ref in zip(cases, refs) if not ix.holds(ref)]
        removed = ix.remove(refs)
    for case in absent:
        click.echo(f"not removed {case}: no such case in {directory}", err=True)
    click.echo(f"removed {removed} of {len(cases)} cases")
    if removed < len(cases):
        sys.exit(Exit.PARTIAL)


@index.command("update")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("case")
@click.option("--set", "assignments", multiple=True, required=True, metavar="FIELD=VALUE",
              help="A field to set (repeatable); an empty VALUE removes the field.")
@json_option
@handle_errors
def index_update(directory, case, assignments, as_json) -> None:
    """Correct a case named by key, sha256 or photo path: set (or remove) metadata fields.

    Every change is recorded with its time and the old value (see `index history`).

    \b
    Example:
      fundus-sdk index update cases/ 12 --set grade=3 --set note="re-graded by retina clinic"
    """
    values = {}
    for text in assignments:
        name, sep, raw = text.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{text!r}: expected FIELD=VALUE", param_hint="--set")
        values[name] = parse_value(raw) if raw != "" else None
    with Index.open(directory) as ix:
        before = ix.get(case_ref(case))
        after = ix.update(before.key, values)
    if as_json:
        click.echo(json.dumps(after.to_dict(), indent=2))
    else:
        click.echo(f"case {after.key} ({after.path}): grade {after.grade}, {json.dumps(after.metadata)}")


@index.command("history")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("case", required=False)
@json_option
@handle_errors
def index_history(directory, case, as_json) -> None:
    """Every recorded change of a stored value (of one case, or of all): when, old, new.

    \b
    Example:
      fundus-sdk index history cases/ 12
    """
    with Index.open(directory, read_only=True) as ix:
        changes = ix.history(case_ref(case) if case is not None else None)
    if as_json:
        click.echo(json.dumps([asdict(c) for c in changes], indent=2))
    else:
        click.echo(format_table(["key", "at", "field", "old", "new"], [[c.key, c.at, c.field, c.old, c.new] for c in changes]))


@index.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="The file to write (readable by its owner only), or - for stdout.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None, help="Default: from the suffix, else csv.")
@handle_errors
def index_export(directory, output, fmt) -> None:
    """Write every case (key, path, sha256, grade, added and the metadata; not the vectors).

    \b
    Example:
      fundus-sdk index export cases/ -o cases.csv
    """
    with Index.open(directory, read_only=True) as ix:
        n = ix.export(output, fmt)
    click.echo(f"exported {n} cases -> {'stdout' if output == '-' else output}", err=output == "-")  # stdout carries the cases


@index.command("rebuild")
@click.argument("old", type=click.Path(file_okay=False))
@click.argument("new", type=click.Path(file_okay=False))
@model_option
@batch_option
@quiet_option
@handle_errors
def index_rebuild(old, new, runtime, batch_size, quiet) -> None:
    """Re-embed every case of the index OLD into a new index NEW, for a new model.

    Each case whose photo is still at its path, unchanged (same sha256), keeps its key, grade,
    metadata and history; the others are listed (exit status 1). OLD is only read.

    \b
    Example:
      fundus-sdk index rebuild cases/ cases-0.3/ --model new.onnx
    """
    with Index.open(old, read_only=True) as ix:
        total = len(ix)
    with progress(total, "re-embedding", quiet) as advance:
        report = rebuild(old, new, runtime.load(), batch_size=batch_size, progress=advance)
    for case in report.missing:
        click.echo(f"not rebuilt: case {case.key}: {case.path}: the photo is gone", err=True)
    for case in report.changed:
        click.echo(f"not rebuilt: case {case.key}: {case.path}: the photo changed since it was indexed", err=True)
    for case, reason in report.unreadable:
        click.echo(f"not rebuilt: case {case.key}: {case.path}: {reason}", err=True)
    left = len(report.missing) + len(report.changed) + len(report.unreadable)
    click.echo(f"rebuilt {report.rebuilt} of {total} cases into {new} ({left} not rebuilt)")
    if left:
        sys.exit(Exit.PARTIAL)


