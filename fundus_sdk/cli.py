"""The `fundus-sdk` command line: a thin layer over the Python API for clinic IT and scripts.

Exit status (fundus_sdk.errors.Exit): 0 everything succeeded; 1 some inputs failed (each named
on stderr, the rest processed); 2 usage error; 3 fatal error (missing index or model, model
mismatch, ...); 130 interrupted (an index keeps its last committed state).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__, metrics
from .embeddings import FORMATS, Embeddings, read_embeddings, write_embeddings
from .errors import Exit, FundusError, ImageError
from .evaluation import evaluate_index
from .index import Hit, Index
from .inputs import find_images
from .labels import read_labels
from .model import load_model


def fatal(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(Exit.FATAL)


def handle_errors(fn: Callable) -> Callable:
    """Expected errors become one line on stderr and an exit status, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (FundusError, FileNotFoundError, ValueError) as exc:
            fatal(str(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(Exit.INTERRUPTED)

    return wrapper


@contextmanager
def progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal and not --quiet; otherwise silent."""
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True) as bar:
        yield bar.update


def report_failure(err: ImageError) -> None:
    click.echo(f"skipped {err}", err=True)


model_option = click.option(
    "--model", "model_path", type=click.Path(dir_okay=False), help="ONNX model file (default: the bundled model)."
)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
batch_option = click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
recursive_option = click.option("-r", "--recursive", is_flag=True, help="Look for images in sub-folders too.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=__doc__.split("\n\n", 1)[1])
@click.version_option(__version__, prog_name="fundus-sdk")
def main() -> None:
    """Retrieve similar graded fundus photographs: embed photos, build case indexes, search them.

    \b
    Example:
      fundus-sdk index create cases/
      fundus-sdk index add cases/ photos/ --labels grades.csv
      fundus-sdk search new_photo.jpg --index cases/ -k 5
    """


# -- embed -------------------------------------------------------------------------------------


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", default="embeddings.npz", show_default=True, type=click.Path(dir_okay=False), help="Where to write the vectors.")
@click.option("--format", "fmt", type=click.Choice(["npz", "jsonl"]), default=None, help="Output format (default: from the output's suffix, else npz).")
@recursive_option
@batch_option
@model_option
@quiet_option
@handle_errors
def embed(paths, output, fmt, recursive, batch_size, model_path, quiet) -> None:
    """Embed every image in the files and folders given.

    Writes one unit-norm vector per readable image, with its path and content hash (sha256),
    to OUTPUT: an .npz (arrays vectors, paths, sha256, and the model's fingerprint) or JSON
    lines. Unreadable images are named on stderr and skipped (exit status 1).

    \b
    Example:
      fundus-sdk embed photos/ -o photos.npz
    """
    files = find_images(paths, recursive)
    if not files:
        fatal(f"no images found in {', '.join(paths)}")
    model = load_model(model_path)
    vectors, names, hashes, failures = [], [], [], 0
    started = time.perf_counter()
    with progress(len(files), "embedding", quiet) as advance:
        for positions, vecs, digests, errors in model.iter_embed(files, batch_size=batch_size):
            for err in errors:
                report_failure(err)
            failures += len(errors)
            vectors.append(vecs)
            names += [str(files[p]) for p in positions]
            hashes += digests
            advance(len(positions) + len(errors))
    elapsed = time.perf_counter() - started
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, model.dim), np.float32)
    write_embeddings(output, Embeddings(matrix, names, hashes, model.fingerprint, model.name), fmt)
    click.echo(
        f"embedded {len(names)} images, {failures} failed, {len(files) / max(elapsed, 1e-9):.1f} images/s -> {output}"
    )
    if failures:
        sys.exit(Exit.PARTIAL)


# -- index ---------------------------------------------------------------------------------------


@main.group()
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
def index_create(directory, model_path, dtype) -> None:
    """Create an empty case index in DIRECTORY for the model's vectors.

    \b
    Example:
      fundus-sdk index create cases/
    """
    with Index.create(directory, model=load_model(model_path), dtype=dtype) as ix:
        click.echo(f"created {directory} for {ix.info()['model_name']} (dimension {ix.dim}, {dtype})")


@index.command("add")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--labels", type=click.Path(dir_okay=False), help="CSV with columns image, grade and any others (kept as metadata).")
@recursive_option
@batch_option
@model_option
@quiet_option
@handle_errors
def index_add(directory, paths, labels, recursive, batch_size, model_path, quiet) -> None:
    """Add photos (or an .npz/.jsonl written by `fundus-sdk embed`) to the index in DIRECTORY.

    Photos already in the index (same content hash) are not added twice. Work is committed in
    steps of 256 photos: an interruption leaves the index as of the last step, never broken.

    \b
    Example:
      fundus-sdk index add cases/ photos/ --labels grades.csv
    """
    ix = Index.open(directory, model=load_model(model_path) if model_path else None)
    with ix:
        before = len(ix)
        for file in (p for p in paths if Path(p).suffix.lower() in FORMATS):
            add_embeddings(ix, Path(file), labels)
        photos = [p for p in paths if Path(p).suffix.lower() not in FORMATS]
        files = find_images(photos, recursive) if photos else []
        if photos and not files:
            fatal(f"no images found in {', '.join(photos)}")
        failures: list[ImageError] = []
        if files:
            meta = label_metadata(files, labels)
            with progress(len(files), "adding", quiet) as advance:
                ix.add(files, meta, on_error=lambda e: (failures.append(e), report_failure(e)), batch_size=batch_size, commit_every=256, progress=advance)
        click.echo(f"added {len(ix) - before} cases ({len(failures)} failed); {directory} now holds {len(ix)}")
    if failures:
        sys.exit(Exit.PARTIAL)


def add_embeddings(ix: Index, file: Path, labels_csv: str | None = None) -> None:
    """Add the vectors of an embedding file from `embed`, with label metadata matched by their recorded paths."""
    data = read_embeddings(file)
    labels = label_metadata([Path(p) for p in data.paths], labels_csv)
    ix.add(
        data.vectors,
        [{**(meta or {}), "path": p, "sha256": s or None} for p, s, meta in zip(data.paths, data.sha256, labels)],
        model_fingerprint=data.model_fingerprint,
    )


def label_metadata(files: list[Path], labels_csv: str | None) -> list[dict | None]:
    """Metadata per file from a label CSV, matched by the CSV's image path or file name."""
    if labels_csv is None:
        return [None] * len(files)
    rows = read_labels(labels_csv, require_grade=False, require_files=False)
    by_name = {Path(r.image).name: r for r in rows} | {r.image: r for r in rows}
    meta: list[dict | None] = []
    for f in files:
        row = by_name.get(f.name) or by_name.get(str(f))
        meta.append(None if row is None else {"grade": row.grade, **row.fields})
    unmatched = sum(m is None for m in meta)
    if unmatched:
        click.echo(f"note: {unmatched} photos have no row in {labels_csv} and are added without a grade", err=True)
    return meta


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
    for key, value in info.items():
        click.echo(f"{key:>18}: {value}")


@index.command("remove")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("keys", nargs=-1, required=True, type=int)
@handle_errors
def index_remove(directory, keys) -> None:
    """Remove cases by key (as `search` shows them).

    \b
    Example:
      fundus-sdk index remove cases/ 12 13
    """
    with Index.open(directory) as ix:
        removed = ix.remove(keys)
    click.echo(f"removed {removed} of {len(keys)} keys")
    if removed < len(keys):
        sys.exit(Exit.PARTIAL)


# -- search and evaluate -----------------------------------------------------------------------------


def parse_where(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """--where grade=2 --where eye=left,right  ->  {"grade": [2], "eye": ["left", "right"]}."""
    where: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r}: expected FIELD=VALUE[,VALUE...]", param_hint="--where")
        where[name] = [int(v) if v.lstrip("-").isdigit() else v for v in value.split(",")]
    return where or None


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False), help="The case index to search.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1, 1000), help="How many cases per photo.")
@click.option("--where", multiple=True, help="Keep only cases with FIELD=VALUE (repeatable; VALUE may be a,b).")
@model_option
@json_option
@handle_errors
def search(images, index_dir, k, where, model_path, as_json) -> None:
    """Find the cases most similar to each photo.

    \b
    Example:
      fundus-sdk search new_photo.jpg --index cases/ -k 5 --where grade=2,3
    """
    filters = parse_where(where)
    failures = 0
    results = []
    with Index.open(index_dir, read_only=True, model=load_model(model_path) if model_path else None) as ix:
        for image in images:
            try:
                hits = ix.search(image, k=k, where=filters)
            except ImageError as err:
                report_failure(err)
                failures += 1
                continue
            results.append((image, hits))
    if as_json:
        click.echo(json.dumps([{"query": q, "hits": [h.to_dict() for h in hits]} for q, hits in results], indent=2))
    else:
        for query, hits in results:
            click.echo(format_hits(query, hits))
    if failures:
        sys.exit(Exit.PARTIAL)


def format_hits(query: str, hits: list[Hit]) -> str:
    lines = [f"{query}", f"{'rank':>4}  {'score':>6}  {'grade':>5}  {'key':>6}  path"]
    for rank, h in enumerate(hits, 1):
        grade = "-" if h.grade is None else str(h.grade)
        lines.append(f"{rank:>4}  {h.score:>6.3f}  {grade:>5}  {h.key:>6}  {h.path or ''}")
    return "\n".join(lines)


@main.command()
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False), help="The graded gallery.")
@click.option("--queries", required=True, type=click.Path(dir_okay=False), help="CSV with columns image, grade.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1, 1000))
@model_option
@json_option
@quiet_option
@handle_errors
def evaluate(index_dir, queries, k, model_path, as_json, quiet) -> None:
    """Retrieval quality of an index for graded query photos: mHR@k, mAP@k, AP@k, NDCG@k.

    Per grade and averaged (micro over queries, macro over grades), each next to its chance
    level. Query photos already in the index (same content hash) never count as their own hit.

    \b
    Example:
      fundus-sdk evaluate --index cases/ --queries test.csv -k 10
    """
    labels = read_labels(queries)
    failures: list[ImageError] = []

    def failed(err: ImageError) -> None:
        failures.append(err)
        report_failure(err)

    with Index.open(index_dir, read_only=True, model=load_model(model_path) if model_path else None) as ix:
        with progress(len(labels), "evaluating", quiet) as advance:
            report = evaluate_index(ix, labels, k, on_error=failed, progress=advance)
    click.echo(json.dumps(report, indent=2) if as_json else metrics.format_report(report))
    if failures:
        sys.exit(Exit.PARTIAL)


# -- info -------------------------------------------------------------------------------------------


@main.command()
@model_option
@json_option
@handle_errors
def info(model_path, as_json) -> None:
    """Show the model (name, dimension, fingerprint, metadata), providers and package versions.

    \b
    Example:
      fundus-sdk info --json
    """
    import importlib.metadata as md

    import onnxruntime as ort

    model = load_model(model_path)
    versions = {}
    for dist in ("fundus-sdk", "onnxruntime", "onnxruntime-gpu", "usearch", "numpy", "pillow", "click"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    data = {
        "model": {"path": str(model.path), "name": model.name, "dim": model.dim, "fingerprint": model.fingerprint},
        "metadata": model.metadata,
        "providers": {"available": ort.get_available_providers(), "in_use": model.providers},
        "packages": versions,
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"model:       {model.name} ({model.path})")
    click.echo(f"dimension:   {model.dim}")
    click.echo(f"fingerprint: {model.fingerprint}")
    click.echo(f"providers:   {', '.join(model.providers)} (available: {', '.join(data['providers']['available'])})")
    click.echo("packages:    " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if "onnxruntime" in versions and "onnxruntime-gpu" in versions:
        click.echo("warning: onnxruntime and onnxruntime-gpu are both installed; uninstall both and reinstall one", err=True)
    click.echo("metadata:")
    for key, value in sorted(model.metadata.items()):
        click.echo(f"  {key}: {value if len(value) < 100 else value[:97] + '...'}")
