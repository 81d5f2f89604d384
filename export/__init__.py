"""Export a trained FundusNet checkpoint to the ONNX file the torch-free runtime loads.

    from export import export_checkpoint
    report = export_checkpoint("runs/x/best.pt", "model.onnx")               # fp32
    print(report.summary())
    export_variants("runs/x/best.pt", {"fp16": "m-fp16.onnx", "int8": "m-int8.onnx"}, calib="photos/")

One self-contained file per precision: input `image` uint8 (batch, S, S, 3) RGB, output
`embedding` float32 (batch, D), unit norm; metadata per fundus_sdk/contract.py. Every export is
checked against the torch model on real photographs before it is written. Command line:
`python -m export --help`; comparing variants: `python -m export.compare --help`; several models as
one file: `python -m export.ensemble --help`.
"""

from .errors import ExportError
from .exporter import ExportReport, export_checkpoint, export_variants
from .metadata import fingerprint, read_metadata
from .verify import VariantReport, compare_variants, format_reports

__all__ = [
    "ExportError",
    "ExportReport",
    "VariantReport",
    "compare_variants",
    "export_checkpoint",
    "export_variants",
    "fingerprint",
    "format_reports",
    "read_metadata",
]
