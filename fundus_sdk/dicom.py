"""DICOM input: ophthalmic photographs straight from a PACS (the `dicom` extra).

A DICOM file is recognised by its content (the "DICM" marker after the 128-byte preamble),
whatever its name: Ophthalmic Photography 8 Bit Image Storage from current cameras, Secondary
Capture from older ones, or any other single- or multi-frame colour or grey photograph.

- Decoding: pydicom reads the file; the compressed transfer syntaxes are decoded by pylibjpeg's
  plugins, all wheels without system libraries: pylibjpeg-libjpeg (JPEG Baseline, Extended and
  Lossless, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000) and pylibjpeg-rle (RLE; pydicom decodes RLE
  itself too). RGB, YBR_FULL, YBR_FULL_422 (converted to RGB) and MONOCHROME1/2 are supported.
- Frames: a multi-frame file is one photo per frame; `frames(path)` lists them as inputs.
- Identity: a frame's sha256 is that of its decoded pixels (`fundus_sdk.inputs.pixel_hash`), so
  the same photo arriving twice, in files with different headers or transfer syntaxes, is one case.
- Metadata: laterality as `eye` (left/right), the study, series and SOP instance UIDs, the
  acquisition date, manufacturer and model, the frame number (1-based, multi-frame files only).
- Identity of the patient: kept apart as `identifiers` (patient name, ID, birth date, sex,
  accession number, institution, and every person-name element). The index stores none of them
  unless asked (`keep_identifiers`); by default it stores a keyed pseudonym of the PatientID.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageError

MARKER_OFFSET, MARKER = 128, b"DICM"
EXTRA = "install the dicom extra to read it: pip install 'fundus-sdk[dicom]'"
SUFFIXES = frozenset({".dcm", ".dicom"})

# Header fields kept as case metadata: (keyword, metadata name). Laterality is handled apart.
DESCRIPTIVE = (
    ("StudyInstanceUID", "study_uid"),
    ("SeriesInstanceUID", "series_uid"),
    ("SOPInstanceUID", "sop_instance_uid"),
    ("Modality", "modality"),
    ("Manufacturer", "manufacturer"),
    ("ManufacturerModelName", "model"),
)
# Elements that say who the patient is (besides every element of value representation PN).
IDENTIFYING = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDs",
    "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "StudyID",
)  # fmt: skip
EYES = {"L": "left", "R": "right"}


def identifying(field: str) -> bool:
    """Whether a metadata field holds a patient identifier (kept only with `keep_identifiers`):
    one of IDENTIFYING, or a person's name (every DICOM person-name keyword says Name)."""
    return field in IDENTIFYING or "Name" in field


@dataclass(frozen=True)
class Frame:
    """One frame of a DICOM file, usable wherever an image input is."""

    path: Path
    index: int  # 0-based
    count: int

    def __str__(self) -> str:
        return f"{self.path} [frame {self.index + 1}/{self.count}]" if self.count > 1 else str(self.path)


def is_dicom(head: bytes) -> bool:
    """Whether these are the first bytes of a DICOM file (the DICM marker after the preamble)."""
    return head[MARKER_OFFSET : MARKER_OFFSET + 4] == MARKER


def looks_like_dicom(path: Path) -> bool:
    """Whether the file at `path` starts like a DICOM file (reads 132 bytes)."""
    try:
        with open(path, "rb") as f:
            return is_dicom(f.read(MARKER_OFFSET + 4))
    except OSError:
        return False


def _pydicom(name: str):
    try:
        import pydicom
    except ImportError:
        raise ImageError(name, f"a DICOM file; {EXTRA}") from None
    return pydicom


def _read(source: bytes | Path, name: str, pixels: bool = True):
    """The dataset of DICOM bytes or a file (a file without pixels: pydicom stops at the header)."""
    pydicom = _pydicom(name)
    try:
        return pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom raises many types for a broken file
        raise ImageError(name, f"unreadable DICOM file ({exc})") from exc


def frame_count(ds: Any) -> int:
    try:
        return max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frames(path: str | Path) -> list[Frame]:
    """One input per frame of the DICOM file at `path` (reads its header only)."""
    path = Path(path)
    if not looks_like_dicom(path):
        raise ImageError(path, "not a readable DICOM file")
    count = checked_frame_count(_read(path, str(path), pixels=False), path.stat().st_size, str(path))
    return [Frame(path, i, count) for i in range(count)]


def checked_frame_count(ds: Any, size: int, name: str) -> int:
    """The dataset's frame count, after an ImageError if a file of `size` bytes cannot hold them
    (a 200 KB file declaring a billion frames)."""
    count = frame_count(ds)
    if count > 1 and count * min_frame_bytes(ds) > size:
        raise ImageError(name, f"declares {count} frames, more than its {size} bytes can hold")
    return count


def min_frame_bytes(ds: Any) -> int:
    """The fewest bytes a frame of `ds` can take in its file: its pixels when uncompressed, else an
    encapsulated item's header (8 bytes)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and getattr(syntax, "is_compressed", True):
        return 8
    try:
        return max(1, int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8)
    except (AttributeError, TypeError, ValueError):
        return 1


def expand_frames(files: list[Path]) -> list[Path | Frame]:
    """`files` with each multi-frame DICOM file replaced by its frames (unreadable ones kept as they are)."""
    out: list[Path | Frame] = []
    for f in files:
        try:
            found = frames(f) if looks_like_dicom(f) else []
        except ImageError:
            found = []  # decoding will report it
        out += found if len(found) > 1 else [f]  # a single-frame file stays its file
    return out


def header(ds: Any, frame: Frame | None) -> tuple[dict[str, Any], dict[str, str]]:
    """(case metadata, patient identifiers) from a dataset's header."""
    meta: dict[str, Any] = {}
    side = str(getattr(ds, "ImageLaterality", "") or getattr(ds, "Laterality", "") or "").upper()
    if side in EYES:
        meta["eye"] = EYES[side]
    for keyword, field in DESCRIPTIVE:
        value = getattr(ds, keyword, None)
        if value not in (None, ""):
            meta[field] = str(value)
    date = next((str(v) for k in ("AcquisitionDate", "ContentDate", "StudyDate") if (v := getattr(ds, k, None))), None)
    if date:
        meta["acquisition_date"] = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else date
    if frame is not None and frame.count > 1:
        meta["frame"] = frame.index + 1
    identifiers = {k: str(v) for k in IDENTIFYING if (v := getattr(ds, k, None)) not in (None, "")}
    for element in ds.iterall():
        if element.VR == "PN" and element.value not in (None, "") and element.keyword:
            identifiers.setdefault(element.keyword, str(element.value))
    return meta, identifiers


def to_rgb(ds: Any, index: int, name: str) -> np.ndarray:
    """Frame `index` of a dataset as HxWx3 uint8 RGB."""
    from pydicom.pixels import pixel_array

    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ImageError(name, "a DICOM file without pixel data (not an image)")
    photometric = str(getattr(ds, "PhotometricInterpretation", ""))
    try:
        arr = pixel_array(ds, index=index if frame_count(ds) > 1 else None)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = syntax.name if syntax is not None else "its transfer syntax"
        raise ImageError(name, f"cannot decode the pixel data ({what}: {exc})") from exc
    except Exception as exc:  # a decoder failing on broken data is this file's problem only
        raise ImageError(name, f"corrupt DICOM pixel data ({exc})") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ImageError(name, f"unsupported DICOM pixel layout {arr.shape} ({photometric})")
    if arr.dtype != np.uint8:
        bits = int(getattr(ds, "BitsStored", 8) or 8)
        arr = np.clip(arr.astype(np.float64) * (255.0 / (2**bits - 1)), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        arr = 255 - arr
    return np.ascontiguousarray(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr)


def decode_dicom(data: bytes, name: str, frame: Frame | None = None) -> tuple[np.ndarray, dict[str, Any], dict[str, str]]:
    """(RGB pixels, case metadata, patient identifiers) of one frame of DICOM file bytes.

    A multi-frame file must be given frame by frame (`frames()`): an ImageError says so.
    """
    ds = _read(data, name)
    count = checked_frame_count(ds, len(data), name)
    if frame is None and count > 1:
        raise ImageError(name, f"a multi-frame DICOM file ({count} frames): use fundus_sdk.dicom.frames(path), one input per frame")
    meta, identifiers = header(ds, frame)
    return to_rgb(ds, frame.index if frame is not None else 0, name), meta, identifiers
