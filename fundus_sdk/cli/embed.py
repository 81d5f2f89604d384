"""`fundus-sdk embed`: photos to vectors, in one process or on a Ray cluster."""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import click

from ..embeddings import FORMATS, file_format, write_embeddings
from ..errors import Exit, ImageError
from ..pipeline import embed_files
from .common import (
    Runtime,
    batch_option,
    check_option,
    gather,
    handle_errors,
    model_option,
    progress,
    quiet_option,
    recursive_option,
    report_failure,
)


@click.command()
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
    failures = [*missing]
    model = runtime.load()
    started = time.perf_counter()

    def failed(err: ImageError) -> None:
        failures.append(err)
        report_failure(err)

    with progress(len(files), "embedding", quiet) as advance:
        embeddings = embed_files(model, files, batch_size=batch_size, check=not no_check, on_error=failed,
                                 progress=advance)  # fmt: skip
    elapsed = time.perf_counter() - started
    write_embeddings(sys.stdout.buffer if output == "-" else output, embeddings, fmt)
    click.echo(
        f"embedded {len(embeddings)} images, {len(failures)} failed, {len(files) / max(elapsed, 1e-9):.1f} images/s -> "
        + ("stdout" if output == "-" else output),
        err=output == "-",  # stdout carries the vectors
    )
    if failures:
        sys.exit(Exit.PARTIAL)


RAY_ADDRESS = re.compile(r"^(local|auto|ray://\S+|[\w.-]+:\d+)$")  # what --ray takes as a cluster address


def embed_ray(paths, output, address, actors, batch_size, runtime: Runtime, no_check: bool, quiet: bool) -> None:
    """`embed --ray`: the archive on a Ray cluster, into Parquet shards (fundus_sdk.cluster)."""
    from ..cluster import embed_on_ray

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


