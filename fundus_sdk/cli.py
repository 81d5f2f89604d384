"""The `fundus-sdk` command line: a thin layer over the Python API for clinic IT and scripts.

Exit status (fundus_sdk.errors.Exit): 0 everything succeeded; 1 some inputs failed (each named
on stderr, the rest processed); 2 usage error; 3 fatal error (missing index or model, model
mismatch, ...); 130 interrupted (an index keeps its last committed state).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import wraps
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__, contract, metrics
from .dicom import Frame, expand_frames
from .embeddings import FORMATS, Embeddings, file_format, is_embeddings, read_embeddings, write_embeddings
from .errors import Exit, FundusError, ImageError, ModelError
from .evaluation import evaluate_index
from .filters import FilterError, compile_filter, conditions_to_where
from .gate import CALIBRATION_KEY, NotFundusError, UngradableWarning, Verdict
from .index import RESERVED, Conflict, Hit, Index, rebuild
from .inputs import find_images
from .labels import ICDR, Scale, match_labels, parse_value, read_labels
from .model import MODEL_LICENCE, Model, default_model_path, load_model
from .report import Report
from .tables import format_table


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
        except KeyError as exc:  # a case that is not in the index
            fatal(str(exc.args[0]))
        except BrokenPipeError:  # the reader went away (`| head -1`): what it wanted was written; end quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(Exit.OK)
        except sqlite3.Error as exc:  # a damaged database file, or a full disk at commit
            fatal(f"the index database failed: {exc}")
        except OSError as exc:  # e.g. a full disk: the index and any output stay as they were
            fatal(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
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


def gather(paths: tuple[str, ...] | list[str], recursive: bool) -> tuple[list[Path | Frame], list[ImageError]]:
    """The image files of PATHS (a multi-frame DICOM file as its frames); paths that cannot be
    opened are named on stderr and left out, and finding nothing at all is fatal (one line)."""
    missing: list[ImageError] = []
    skipped: list[tuple[Path, str]] = []
    files = expand_frames(find_images(paths, recursive, on_missing=missing.append, on_skipped=lambda *s: skipped.append(s)))
    for path, reason in skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    if skipped:
        click.echo(f"note: {len(skipped)} entries of the folders given are not photos and were skipped (named above)", err=True)
    if not files:
        fatal("; ".join(str(e) for e in missing) if missing else f"no images found in {', '.join(map(str, paths))}")
    for err in missing:
        report_failure(err)
    return files, missing


@dataclass(frozen=True)
class Runtime:
    """The model a command uses and how it runs: --model, --provider, --threads."""

    path: str | None
    providers: tuple[str, ...]
    threads: int | None

    def load(self) -> Model:
        """The model (the bundled one unless --model), on the providers and threads asked for."""
        return load_model(self.path, list(self.providers) or None, self.threads)

    def open(self, directory: str, read_only: bool = False) -> Index:
        """An index, with this model when --model was given (else the index's own default)."""
        return Index.open(directory, read_only=read_only, model=self.path, providers=list(self.providers) or None,
                          threads=self.threads)  # fmt: skip


def model_option(command: Callable) -> Callable:
    """--model, --provider and --threads on a command, passed to it as `runtime` (a Runtime)."""

    @click.option("--model", "model_path", type=click.Path(dir_okay=False), help="ONNX model file (default: the bundled model).")
    @click.option("--provider", "providers", multiple=True, metavar="NAME",
                  help="ONNX Runtime execution provider: cpu, cuda or a full name (repeatable, in order of preference; "
                  "default: CUDA when this onnxruntime has it, else the CPU).")
    @click.option("--threads", type=click.IntRange(1, 1024), default=None,
                  help="ONNX Runtime threads (default: every core); give each of several processes its share.")
    @wraps(command)
    def with_runtime(*args: Any, model_path: str | None, providers: tuple[str, ...], threads: int | None, **kwargs: Any) -> Any:
        return command(*args, runtime=Runtime(model_path, providers, threads), **kwargs)

    return with_runtime
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
COMMIT_SECONDS = 20.0  # `index add` commits at least this often: what an interruption can lose
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
batch_option = click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
recursive_option = click.option("-r", "--recursive", is_flag=True, help="Look for images in sub-folders too.")
check_option = click.option(
    "--no-check", "no_check", is_flag=True,
    help="Skip the input gate (by default, pictures that are not colour fundus photographs are refused).",
)  # fmt: skip


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
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("-o", "--output", default="embeddings.npz", show_default=True, metavar="PATH",
              help="Where to write the vectors: a .npz or .jsonl file, or - for stdout; with --ray a folder (or URI) for Parquet shards.")
@click.option("--format", "fmt", type=click.Choice(["npz", "jsonl"]), default=None,
              help="Output format, where the name does not say it (stdout: jsonl unless npz is asked for).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Embed on a Ray cluster (the ray extra): alone, one started on this machine; or an address "
              "(auto, ray://head:10001). PATHS may be URIs such as s3://bucket/photos.")
@click.option("--actors", type=click.IntRange(1, 100_000), default=None,
              help="With --ray: model actors (default: one per --threads CPUs of the cluster, less one).")
@recursive_option
@batch_option
@model_option
@check_option
@quiet_option
@handle_errors
def embed(paths, output, fmt, ray_address, actors, recursive, batch_size, runtime, no_check, quiet) -> None:
    """Embed every image in the files and folders given.

    Writes one unit-norm vector per readable image, with its path and content hash (sha256),
    to OUTPUT: an .npz (arrays vectors, paths, sha256, the model's fingerprint and the input
    gate's verdicts) or JSON lines. Unreadable images, and pictures the input gate judges not to
    be colour fundus photographs, are named on stderr with the reason and skipped (exit status 1).

    With --ray, Ray Data reads, decodes and embeds the photos (folders recursively) and OUTPUT is
    a folder of Parquet shards: one row per photo with path, sha256, vector, verdict and error,
    the model's fingerprint in each file. A re-run embeds only what the folder lacks; `index add`
    reads the folder.

    \b
    Examples:
      fundus-sdk embed photos/ -o photos.npz
      fundus-sdk embed --ray auto s3://archive/fundus/ -o s3://archive/vectors/
    """
    if ray_address is not None and not RAY_ADDRESS.match(ray_address):  # `--ray photos/`: a path, no address
        paths, ray_address = (ray_address, *paths), "local"
    if not paths:
        raise click.UsageError("Missing argument 'PATHS...': the photos (files or folders) to embed.")
    if ray_address is not None:
        embed_ray(paths, output, ray_address, actors, batch_size, runtime, no_check, quiet)
        return
    fmt = output_format(output, fmt)
    files, missing = gather(paths, recursive)
    model = runtime.load()
    vectors, names, hashes, verdicts, failures = [], [], [], [], len(missing)
    started = time.perf_counter()
    with progress(len(files), "embedding", quiet) as advance:
        for batch in model.iter_embed(files, batch_size=batch_size, check=not no_check):
            for err in batch.errors:
                report_failure(err)
            failures += len(batch.errors)
            for pos, vec, sha, verdict in zip(batch.positions, batch.vectors, batch.sha256, batch.verdicts):
                if verdict is not None and not verdict.fundus:
                    report_failure(NotFundusError(files[pos], verdict))
                    failures += 1
                    continue
                vectors.append(vec)
                names.append(absolute(files[pos]))  # opens from any directory
                hashes.append(sha)
                verdicts.append(verdict.to_dict() if verdict else None)
            advance(len(batch.positions) + len(batch.errors))
    elapsed = time.perf_counter() - started
    matrix = np.stack(vectors) if vectors else np.zeros((0, model.dim), np.float32)
    checked = verdicts if any(v is not None for v in verdicts) else None
    embeddings = Embeddings(matrix, names, hashes, model.fingerprint, model.name, checked)
    write_embeddings(click.get_binary_stream("stdout") if output == "-" else output, embeddings, fmt)
    click.echo(
        f"embedded {len(names)} images, {failures} failed, {len(files) / max(elapsed, 1e-9):.1f} images/s -> "
        + ("stdout" if output == "-" else output),
        err=output == "-",  # stdout carries the vectors
    )
    if failures:
        sys.exit(Exit.PARTIAL)


RAY_ADDRESS = re.compile(r"^(local|auto|ray://\S+|[\w.-]+:\d+)$")  # what --ray takes as a cluster address


def embed_ray(paths, output, address, actors, batch_size, runtime: Runtime, no_check: bool, quiet: bool) -> None:
    """`embed --ray`: the archive on a Ray cluster, into Parquet shards (fundus_sdk.cluster)."""
    from .cluster import embed_on_ray

    if output == "-" or Path(output).suffix.lower() in FORMATS:
        raise click.BadParameter("with --ray, OUTPUT is a folder (or URI) for Parquet shards", param_hint="-o")
    if quiet:
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray").setLevel(logging.WARNING)
    report = embed_on_ray(
        list(paths), output, model=runtime.path, address=address, actors=actors, threads=runtime.threads or 1,
        providers=list(runtime.providers) or None, batch_size=batch_size, check=not no_check,
    )  # fmt: skip
    click.echo(
        f"embedded {report.embedded} photos on Ray ({report.failed} failed, {report.skipped} already in {output}) "
        f"in {report.seconds:.0f} s, {report.embedded / max(report.seconds, 1e-9):.1f} photos/s -> {output}"
    )
    if report.failed:
        click.echo(f"{report.failed} photos of this run have an error row in {output} (see its `error` column)", err=True)
        sys.exit(Exit.PARTIAL)


def output_format(output: str, fmt: str | None) -> str:
    """The format `embed` writes OUTPUT in, checked before any work (a usage error otherwise)."""
    if output == "-":
        if fmt == "npz" and sys.stdout.isatty():
            raise click.BadParameter("npz is binary: redirect stdout to a file or pipe, or use --format jsonl", param_hint="-o")
        return fmt or "jsonl"
    try:
        fmt = file_format(output, fmt)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="-o") from None
    if Path(output).exists() and not Path(output).is_file():
        raise click.BadParameter(f"{output} exists and is not a regular file: refusing to replace it", param_hint="-o")
    return fmt


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
    for file in (p for p in paths if is_embeddings(p)):
        data = read_embeddings(file)
        for path, reason in data.failed:  # rows of `embed --ray` without a vector
            failed(ImageError(path, reason))
        files = [Path(p) for p in data.paths]
        keep, meta = label_metadata(files, labels, [], allow_unlabelled, failed, ix.scale, ungraded)
        if data.metadata is not None:  # DICOM headers read by `embed --ray`
            meta = [{**h, **(m or {})} for h, m in zip(data.metadata, meta)]
        if data.verdicts is not None:  # checked by `embed`: its verdicts' gradability is kept
            if not no_check:
                refused = {i for i, v in enumerate(data.verdicts) if v is not None and not v["fundus"]}
                for i in sorted(refused & set(keep)):
                    failed(NotFundusError(data.paths[i], Verdict.from_dict(data.verdicts[i])))
                keep = [i for i in keep if i not in refused]
        added += ix.add(
            data.vectors[keep], [meta[i] for i in keep], paths=[data.paths[i] for i in keep],
            hashes=[data.sha256[i] or None for i in keep], model_fingerprint=data.model_fingerprint,
            verdicts=None if data.verdicts is None else [data.verdicts[i] for i in keep], on_conflict=conflict,
        )  # fmt: skip
    photos = [p for p in paths if not is_embeddings(p)]
    files, missing = gather(photos, recursive) if photos else ([], [])
    for err in missing:  # named on stderr by gather
        failed(err, reported=True)
    if files:
        folders = [Path(p) for p in photos if Path(p).is_dir()]
        plain = [f.path if isinstance(f, Frame) else f for f in files]  # labels name files, not frames
        keep, meta = label_metadata(plain, labels, folders, allow_unlabelled, failed, ix.scale, ungraded)
        with progress(len(keep), "adding", quiet) as advance:
            keys = ix.add(
                [files[i] for i in keep], [meta[i] for i in keep], on_error=failed, on_conflict=conflict,
                batch_size=batch_size, commit_seconds=COMMIT_SECONDS, progress=advance, check=not no_check,
                keep_identifiers=keep_identifiers,
            )  # fmt: skip
        first: dict[int, Path | Frame] = {}
        for i, key in zip(keep, keys):
            if key is not None and first.setdefault(key, files[i]) is not files[i]:
                click.echo(f"note: {files[i]} is the same photo as {first[key]} (same content): one case, key {key}", err=True)
        added += keys


def absolute(item: Path | Frame) -> str:
    """A gathered input's absolute path (a DICOM frame: with its frame number)."""
    return str(Frame(item.path.resolve(), item.index, item.count) if isinstance(item, Frame) else item.resolve())


def label_metadata(
    files: list[Path], labels_csv: str | None, folders: list[Path], allow_unlabelled: bool,
    failed: Callable[[ImageError], None], scale: Scale, ungraded: bool = False,
) -> tuple[list[int], list[dict | None]]:
    """(positions of the files to add, metadata per file) from a label CSV (fundus_sdk.labels.match_labels),
    its grades read on the index's `scale`.

    Columns named like what the index derives itself (fundus_sdk.index.RESERVED) are kept under
    `label_<name>`, said so on stderr. Files without a row go to `failed` unless allowed.
    """
    if labels_csv is None:
        return list(range(len(files))), [None] * len(files)
    rows = read_labels(labels_csv, require_grade=False, grade_column=not ungraded, require_files=False, scale=scale)
    clashes = sorted({name for r in rows for name in r.fields if name in RESERVED})
    if clashes:
        click.echo(f"note: {labels_csv}: column(s) {', '.join(clashes)} kept as "
                   f"{', '.join('label_' + c for c in clashes)} (the index derives {', '.join(RESERVED)} itself)", err=True)
    keep, meta = [], []
    for i, (f, row) in enumerate(zip(files, match_labels(files, rows, folders))):
        if row is None:
            meta.append(None)
            if not allow_unlabelled:
                failed(ImageError(f, f"no row in {labels_csv} (--allow-unlabelled adds it without a grade)"))
                continue
        else:
            meta.append({("label_" + k if k in RESERVED else k): v for k, v in row.metadata().items()})
        keep.append(i)
    unlabelled = sum(m is None for m in meta)
    if allow_unlabelled and unlabelled:
        click.echo(f"note: {unlabelled} photos have no row in {labels_csv} and are added without a grade", err=True)
    return keep, meta


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


def trained_on(recorded: str | None) -> str:
    """The training data a model records, in words: its photo counts and data sets' names, not the
    folders they sat in on the machine that trained it."""
    if not recorded:
        return "not recorded in the model"
    data = json.loads(recorded)
    sources = data.get("source") or []
    names = [Path(str(p)).name for p in (sources if isinstance(sources, list) else [sources])]
    fit, val = (data.get(part, {}).get("images") for part in ("train", "validation"))
    return f"{', '.join(names) or 'unnamed data'} ({fit} photos trained on, {val} for validation)"


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


def case_ref(text: str) -> int | str:
    """A case named on the command line: a key (digits), else a sha256 or a path."""
    return int(text) if text.isdigit() else text


# -- search and evaluate -----------------------------------------------------------------------------


@main.command()
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
    results = []
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
        for image in queries:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", UngradableWarning)
                    vecs, verdicts = ix.embed_queries([image], check=not no_check)
                for w in caught:
                    click.echo(f"warning: {w.message}", err=True)
            except ImageError as err:
                report_failure(err)
                failures += 1
                continue
            hits = ix.search(vecs[0], k=k, where=filters or None, exclude=leave_out or None)
            results.append((str(image), verdicts[0], hits))
        if (html_out or png_out) and results:
            write_reports(Report.build(ix, [(q, hits) for q, _, hits in results]), html_out, png_out)
    if as_json:
        click.echo(json.dumps([
            {"query": q, "verdict": v.to_dict() if v else None, "hits": [h.to_dict() for h in hits]} for q, v, hits in results
        ], indent=2))  # fmt: skip
    else:
        for query, _, hits in results:
            click.echo(format_hits(query, hits))
    if failures:
        sys.exit(Exit.PARTIAL)


def filter_text(where: tuple[str, ...], exclude: tuple[str, ...]) -> str:
    return " ".join([*(f"--where {w}" for w in where), *(f"--exclude {e}" for e in exclude)])


def known_values(ix: Index, fields: list[str], most: int = 8) -> str:
    """What the index holds in `fields`, for a filter that matched nothing: 'eye: left, right'."""
    seen: dict[str, set] = {f: set() for f in fields}
    for case in ix:
        for f in fields:
            value = getattr(case, f, None) if f in ("grade", "key", "path", "sha256", "added") else case.metadata.get(f)
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


@main.command()
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


# -- info -------------------------------------------------------------------------------------------


@main.command()
@model_option
@json_option
@handle_errors
def info(runtime, as_json) -> None:
    """Show the model (name, dimension, fingerprint, metadata), providers and package versions.

    \b
    Example:
      fundus-sdk info --json
    """
    import importlib.metadata as md

    import onnxruntime as ort

    model = runtime.load()
    versions = {}
    for dist in ("fundus-sdk", "onnxruntime", "onnxruntime-gpu", "usearch", "numpy", "pillow", "click"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    data = {
        "model": {"path": str(model.path), "name": model.name, "dim": model.dim, "fingerprint": model.fingerprint,
                  "weights_fingerprint": model.weights_fingerprint},
        "metadata": model.metadata,
        "providers": {"available": ort.get_available_providers(), "in_use": model.providers},
        "packages": versions,
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"model:       {model.name} ({model.path})")
    click.echo(f"dimension:   {model.dim}")
    click.echo(f"grades:      {model.scale.spec}{' (ICDR)' if model.scale == ICDR else ''}")
    click.echo(f"fingerprint: {model.fingerprint}")
    click.echo(f"providers:   {', '.join(model.providers)} (available: {', '.join(data['providers']['available'])})")
    click.echo("packages:    " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if "onnxruntime" in versions and "onnxruntime-gpu" in versions:
        click.echo("warning: onnxruntime and onnxruntime-gpu are both installed; uninstall both and reinstall one", err=True)
    click.echo(f"licence:     {model.metadata.get(contract.LICENCE) or 'not recorded in the model'}")
    if model.path == default_model_path():
        click.echo(f"             (terms in full: {default_model_path().parent / MODEL_LICENCE})")
    click.echo(f"trained on:  {trained_on(model.metadata.get(contract.TRAINING_DATA))}")
    click.echo("metadata:")
    for key, value in sorted(model.metadata.items()):
        if key in (contract.LICENCE, CALIBRATION_KEY, contract.TRAINING_DATA):
            continue  # the licence is printed in full above; the calibration is numbers; the data below
        click.echo(f"  {key}: {value if len(value) < 100 else value[:97] + '...'}")
