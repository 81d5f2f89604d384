"""DICOM files built with pydicom from real photographs, as fundus cameras and PACS write them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

OPHTHALMIC_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
IDENTIFIERS = {  # values that must never reach an index unless kept
    "PatientName": "Doe^Jane^Q",
    "PatientID": "MRN-55501234",
    "PatientBirthDate": "19470215",
    "AccessionNumber": "ACC-9981-77",
    "InstitutionName": "St Elsewhere Eye Clinic",
    "ReferringPhysicianName": "Kildare^James",
    "OperatorsName": "Ratched^Mildred",
}
SYNTAXES = ("explicit", "rle", "jpeg-baseline", "jpeg-ls", "jpeg2000")


def _encapsulated(frames: list[bytes]) -> bytes:
    from pydicom.encaps import encapsulate

    return encapsulate(frames)


def _encode(frame: np.ndarray, syntax: str) -> bytes:
    if syntax == "jpeg-baseline":
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "JPEG", quality=95, subsampling=2)  # 4:2:0, as cameras write
        return buf.getvalue()
    if syntax == "jpeg-ls":
        import imagecodecs

        return imagecodecs.jpegls_encode(frame, level=0)
    if syntax == "jpeg2000":
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "JPEG2000", irreversible=False, no_jp2=True)
        return buf.getvalue()
    raise ValueError(syntax)


def make_dicom(
    path: Path,
    pixels: np.ndarray | list[np.ndarray],
    *,
    syntax: str = "explicit",
    photometric: str = "RGB",
    identifiers: bool = True,
    laterality: str | None = "L",
    sop_class: str = OPHTHALMIC_8BIT,
    patient_id: str | None = None,
) -> Path:
    """Write `pixels` (one HxWx3 uint8 frame, or a list of frames) as a DICOM file at `path`."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.pixels import convert_color_space
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGLSLossless,
        RLELossless,
        generate_uid,
    )  # fmt: skip

    frames = pixels if isinstance(pixels, list) else [pixels]
    rows, cols = frames[0].shape[:2]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OP" if sop_class == OPHTHALMIC_8BIT else "OT"
    ds.Manufacturer, ds.ManufacturerModelName = "Acme Optics", "FundusCam 3000"
    ds.AcquisitionDate = "20261124"
    if laterality:
        ds.ImageLaterality = laterality
    if identifiers:
        for keyword, value in IDENTIFIERS.items():
            setattr(ds, keyword, value)
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    if photometric.startswith("MONOCHROME"):
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        data = [f.mean(axis=2).round().astype(np.uint8) if f.ndim == 3 else f for f in frames]
        if photometric == "MONOCHROME1":
            data = [255 - d for d in data]
    else:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PhotometricInterpretation = photometric
        data = [convert_color_space(f, "RGB", photometric) if photometric != "RGB" else f for f in frames]
    if syntax in ("explicit", "rle"):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = b"".join(np.ascontiguousarray(d).tobytes() for d in data)
        if syntax == "rle":
            ds.compress(RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = {"jpeg-baseline": JPEGBaseline8Bit, "jpeg-ls": JPEGLSLossless,
                                          "jpeg2000": JPEG2000Lossless}[syntax]  # fmt: skip
        if syntax == "jpeg-baseline":
            ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = _encapsulated([_encode(f, syntax) for f in frames])
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def photo(path: Path, size: int = 512) -> np.ndarray:
    """A real photograph as HxWx3 uint8 at `size` px (multiples of 16 keep every codec exact)."""
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS))
