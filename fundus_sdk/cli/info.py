"""`fundus-sdk info`: the model, the providers and the packages."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import contract
from ..gate import CALIBRATION_KEY
from ..labels import ICDR
from ..model import MODEL_LICENCE, default_model_path
from .common import handle_errors, json_option, model_option


@click.command()
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
