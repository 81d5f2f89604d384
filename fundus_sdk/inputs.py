"""The one door for inputs: find image files, recognise, decode, orient and hash any input.

An input is a file path, the bytes of a file, a binary file object, a PIL image or an HxWx3
uint8 array. Whatever it is, `decode()` returns a `Decoded`: an 8-bit RGB PIL image the right
way up (EXIF orientation applied), the sha256 that identifies it (of the file's bytes for
encoded inputs, of the pixels and their shape for in-memory images), its format as recognised
from its content (never from a file name; raster formats only) and a name for messages. Preprocessing takes it from
there (fundus_sdk.preprocess). Every failure is an ImageError naming the input and the reason.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps

from .dicom import SUFFIXES as DICOM_SUFFIXES
from .dicom import Frame, decode_dicom, is_dicom, looks_like_dicom
from .errors import ImageError

ImageInput = Union[str, Path, bytes, bytearray, BinaryIO, Image.Image, np.ndarray, Frame]


def describe(source: object) -> str:
    """A short name for an input in messages: the path for files (a DICOM frame: with its
    number), the type otherwise."""
    if isinstance(source, (str, Path, Frame)):
        return str(source)
    return f"<{type(source).__name__}>"


MIN_SIDE = 32  # PIL's own limit (Image.MAX_IMAGE_PIXELS, ~89 megapixels) refuses bombs
MAX_ASPECT = 4.0  # cameras give 1:1 to 16:9; a 20000x100 strip is no fundus photo

# The still raster formats PIL may recognise an encoded input as (by its content, whatever its
# name). Vector and document formats (EPS, PS, PDF) are never opened: PIL hands them to
# Ghostscript.
RASTER_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "AVIF", "JPEG2000", "GIF", "PPM", "TGA", "SGI", "ICO", "DDS")
# The names a folder's image files may have: every suffix PIL registers for those formats.
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in RASTER_FORMATS)


@dataclass(frozen=True)
class Decoded:
    """A decoded input: RGB pixels the right way up, its identity and where it came from."""

    image: Image.Image
    sha256: str
    format: str  # "JPEG", "PNG", "DICOM", ... or "array" / "PIL" for in-memory images
    name: str  # for messages: the path, or the input's type
    metadata: dict[str, Any] = field(default_factory=dict)  # from a DICOM header (fundus_sdk.dicom)
    identifiers: dict[str, str] = field(default_factory=dict)  # who the patient is (DICOM): never stored unasked


def find_images(
    paths: Iterable[str | Path],
    recursive: bool = False,
    on_missing: Callable[[ImageError], None] | None = None,
    on_skipped: Callable[[Path, str], None] | None = None,
) -> list[Path]:
    """Image files named directly, plus those inside the folders given, in a stable order.

    Files named directly are kept whatever their suffix (the user asked for them; the content
    decides); files found in folders are kept by `photo_by_name`, a suffix-less one when it starts
    like a DICOM file (PACS exports).
    A path that cannot be opened (missing, a dangling symbolic link, a link loop) raises
    FileNotFoundError, or, with `on_missing`, is reported to it and left out. `on_skipped`
    hears of every other file left out of a folder, and of sub-folders not searched, with why.
    """
    found: list[Path] = []

    def cannot_open(p: Path, reason: str) -> None:
        if on_missing is None:
            raise FileNotFoundError(f"{p}: {reason}")
        on_missing(ImageError(p, reason))

    for p in map(Path, paths):
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            for f in sorted(p.glob(pattern)):  # each entry judged once (a suffix-less file is read to judge it)
                if f.is_file() and _wanted(f):
                    found.append(f)
                elif f.is_file():
                    if on_skipped is not None:
                        on_skipped(f, "not an image file (by its name and content)")
                elif f.is_dir():
                    if on_skipped is not None and not recursive:
                        on_skipped(f, "a sub-folder, not searched (add -r to search sub-folders)")
                else:  # a dangling link, a link loop, a device, a FIFO: named, never opened
                    cannot_open(f, unopenable_reason(f))
        elif p.is_file():
            found.append(p)
        else:
            cannot_open(p, unopenable_reason(p))
    seen: set[Path] = set()
    return [f for f in found if not (f in seen or seen.add(f))]


def photo_by_name(name: str) -> bool | None:
    """The one rule for which files in a folder are photos, by name: a raster or DICOM suffix is
    one, no suffix is for the content to say (PACS exports often have none: None), anything else,
    and hidden files (".DS_Store", "._photo.jpg"), are not."""
    if name.startswith("."):
        return False
    suffix = os.path.splitext(name)[1].lower()
    return None if not suffix else suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES


def _wanted(path: Path) -> bool:
    by_name = photo_by_name(path.name)
    return by_name if by_name is not None else looks_like_dicom(path)


def unopenable_reason(path: Path) -> str:
    """Why `path` is not opened as a photo, in words: not a regular file (a device, a FIFO, a
    socket), no such file, a dangling link or a link loop."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return missing_reason(path)
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")  # fmt: skip
    return f"not a regular file ({kind})" + (f", linked to {os.readlink(path)}" if path.is_symlink() else "")


def missing_reason(path: Path) -> str:
    """Why `path` cannot be opened, in words: no such file, a dangling link or a link loop."""
    if not path.is_symlink():
        return "no such file or folder"
    try:
        path.resolve(strict=True)
    except RuntimeError:
        return "symbolic link loop"
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            return "symbolic link loop"
    return f"dangling symbolic link (to {os.readlink(path)})"


def pixel_hash(rgb: np.ndarray) -> str:
    """sha256 of an image's pixels with their shape: the identity of an in-memory image."""
    pixels = np.ascontiguousarray(rgb)
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def identify(source: ImageInput) -> tuple[str, ImageInput]:
    """(sha256, the input to decode) without decoding: what `decode` would report as its sha256.

    Cheap next to decoding, so an index can skip photos it already holds. A file object is read
    here, so its bytes are returned for decoding.
    """
    if isinstance(source, Image.Image):
        return pixel_hash(np.asarray(source)), source
    if isinstance(source, np.ndarray):
        return pixel_hash(source), source
    if isinstance(source, Frame):
        decoded = decode(source)
        return decoded.sha256, decoded
    encoded = read_bytes(source)
    if encoded is None:
        raise ImageError(describe(source), EXPECTED)
    data, name = encoded
    if is_dicom(data):  # identified by its pixels, so decoded here (and not again)
        decoded = _decoded_dicom(data, name, None)
        return decoded.sha256, decoded
    return hashlib.sha256(data).hexdigest(), (source if isinstance(source, (str, Path)) else data)


EXPECTED = "expected a file path, bytes, a binary file object, a PIL image, an HxWx3 uint8 array or a DICOM frame"


def _decoded_dicom(data: bytes, name: str, frame: Frame | None) -> Decoded:
    rgb, meta, identifiers = decode_dicom(data, name, frame)
    return Decoded(_from_array(rgb, name), pixel_hash(rgb), "DICOM", name, meta, identifiers)


def read_bytes(source: ImageInput) -> tuple[bytes, str] | None:
    """(encoded bytes, name) of a path, bytes or file object; None for in-memory images."""
    name = describe(source)
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        data = read_regular_file(Path(source), name)
    elif hasattr(source, "read"):
        try:
            data = source.read()
        except OSError as exc:
            raise ImageError(name, f"cannot read file object ({exc})") from exc
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(name, "file objects must be opened in binary mode")
        name = str(getattr(source, "name", name))
    else:
        return None
    if not data:
        raise ImageError(name, "empty input (0 bytes)")
    return bytes(data), name


def read_regular_file(path: Path, name: str) -> bytes:
    """The bytes of the regular file at `path`. Anything else (a device such as /dev/zero, a
    FIFO) is an ImageError: it is opened without blocking and never read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(name, unopenable_reason(path))
        try:
            return f.read()
        except OSError as exc:
            raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from exc


def decode(source: ImageInput, *, draft_size: int | None = None) -> Decoded:
    """Decode any supported input to RGB. JPEGs decode in draft mode at about `draft_size` px.

    Raises ImageError naming the input for anything that is not a readable, sane image.
    """
    if isinstance(source, Decoded):
        return source
    if isinstance(source, Frame):
        data, _ = read_bytes(source.path)
        return _decoded_dicom(data, str(source), source)
    name = describe(source)
    if isinstance(source, Image.Image):
        rgb = _to_rgb(ImageOps.exif_transpose(source), name)
        return Decoded(rgb, pixel_hash(np.asarray(source)), "PIL", name)
    if isinstance(source, np.ndarray):
        rgb = _from_array(source, name)
        return Decoded(rgb, pixel_hash(np.asarray(source)), "array", name)
    encoded = read_bytes(source)
    if encoded is None:
        raise ImageError(name, EXPECTED)
    data, name = encoded
    if is_dicom(data):
        return _decoded_dicom(data, name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            pil = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
            fmt = pil.format
            w, h = pil.size
            if min(w, h) < MIN_SIDE:
                raise ImageError(name, f"image is {w}x{h} pixels, too small to be a fundus photo")
            if max(w, h) > MAX_ASPECT * min(w, h):
                raise ImageError(name, f"image is {w}x{h} pixels, too elongated to be a fundus photo")
            if draft_size and fmt == "JPEG":
                pil.draft(None, (draft_size, draft_size))
            pil = ImageOps.exif_transpose(pil)
            pil.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(name, f"refused as a decompression bomb ({exc})") from exc
        except Image.UnidentifiedImageError as exc:
            raise ImageError(name, "not an image file PIL can identify (raster formats only)") from exc
        except Exception as exc:  # any decoder failure is this file's problem, never the batch's
            raise ImageError(name, f"corrupt or truncated image ({exc})") from exc
    return Decoded(_to_rgb(pil, name), hashlib.sha256(data).hexdigest(), fmt, name)


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise ImageError(name, f"arrays must be HxWx3 uint8, got shape {arr.shape} dtype {arr.dtype}")
    if min(arr.shape[:2]) < MIN_SIDE:
        raise ImageError(name, f"array is {arr.shape[1]}x{arr.shape[0]} pixels, too small")
    if max(arr.shape[:2]) > MAX_ASPECT * min(arr.shape[:2]):
        raise ImageError(name, f"array is {arr.shape[1]}x{arr.shape[0]} pixels, too elongated to be a fundus photo")
    return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), "RGB")


def _to_rgb(pil: Image.Image, name: str) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency goes to black, deep images are rescaled."""
    mode = pil.mode
    if mode == "RGB":
        return pil
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(pil, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return pil.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(name, f"cannot convert image mode {mode} to RGB") from exc
