"""DICOM in: recognise a file, read its header within limits, and turn one frame into the RGB image that
every detector takes, with the window (level/width) a radiologist would look at.

Recognised (``is_dicom_name`` / ``is_dicom``): a ``.dcm`` or ``.dicom`` file, and a file without a suffix,
or whose "suffix" is a number (``1.2.840.113619.2.55.3.604688119.969.1268071029.320``: PACS exports name
files by their UID), that starts with the 128-byte preamble and ``DICM`` (PS3.10 section 7.1).

Read, in this order, and nothing is decoded before it is checked (``read_header``):

* the header alone (``stop_before_pixels``), at most ``MAX_HEADER_BYTES`` read (values of 4 KiB and more
  are skipped, not read): a file of millions of tiny elements cannot exhaust memory;
* the Pixel Data element's own header: present (else the file is a structured report, a DICOMDIR or
  another non-image object and fails with that reason), its length against Rows x Columns x samples x
  Bits Allocated x Number of Frames and against the file (a truncated file, a wrong frame count and huge
  declared dimensions with tiny data all fail here), or, encapsulated, its fragment count against the
  frames;
* one frame's pixels at a time (``pydicom.pixels.pixel_array(index=...)``), at most Pillow's
  ``MAX_IMAGE_PIXELS`` pixels per frame, at most ``MAX_FRAMES`` frames per file; compressed transfer
  syntaxes through whichever pydicom decoding plugin is installed, else a failure that names the plugins
  that would decode it.

From pixels to an 8-bit image (``decode_frame``), after PS3.3 C.11 (the grayscale pipeline):

1. the Modality LUT: Rescale Slope / Intercept (from the frame's functional groups in an enhanced
   multi-frame file, else the top level; CT values become Hounsfield units) or a Modality LUT Sequence;
   16-bit data stays in float32 (float64 above 16 bits) until here;
2. the VOI: the source's window preset (``PRESETS`` or "center/width"), else the file's VOI LUT Sequence,
   else the file's Window Center / Width (its first pair; LINEAR, LINEAR_EXACT or SIGMOID as its VOI LUT
   Function says, PS3.3 C.11.2.1.2), else the frame's own min..max;
3. MONOCHROME1 is inverted (its lowest value is white);
4. colour: RGB as it is (YBR converted to RGB by pydicom), PALETTE COLOR through its palette.

Kept (``DicomHeader.record``, the ``dicom_images`` table): Study, Series and SOP Instance UIDs, SOP Class,
frame count, modality, body part, photometric interpretation, transfer syntax, rows and columns, and the
window used. Patient name, ID, birth date and every other tag are read by pydicom (it has to parse the
header) but never copied anywhere: not into the database, messages, logs or events. pydicom's own
validation warnings (which quote values) are switched off, and an error message that comes from pydicom is
scrubbed of the file's patient values before it is stored.

pydicom is an optional dependency (``pip install 'inspector[dicom]'``); without it a DICOM file fails
with a reason saying so.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from .errors import InspectorError

DICOM_SUFFIXES = {".dcm", ".dicom"}
#: most header bytes read before the pixel data (enhanced multi-frame files carry a few KiB per frame)
MAX_HEADER_BYTES = 8 << 20
#: most frames scored per file (each frame becomes one image row, one job, one result)
MAX_FRAMES = 2000
#: header values this long or longer are skipped while reading, not loaded (pydicom's defer_size)
DEFER_BYTES = 4096
#: the Deflated Explicit VR Little Endian transfer syntax UID, refused (see ``read_header``)
DEFLATED = b"1.2.840.10008.1.2.1.99"

#: Window presets: name -> (center, width) in the units after the Modality LUT (Hounsfield units for CT).
#: Values from Radiopaedia, "Windowing (CT)" (https://radiopaedia.org/articles/windowing-ct): brain
#: W:80 L:40; subdural W:130-300 L:50-100 (here the middle of both ranges); stroke W:40 L:40; temporal bones
#: W:2800 L:600; bone W:1800 L:400; soft tissue W:350-400 L:20-60 (here 400 / 50); lungs W:1500 L:-600;
#: mediastinum W:350 L:50; liver W:150 L:30.
PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "temporal_bone": (600.0, 2800.0),
    "bone": (400.0, 1800.0),
    "soft_tissue": (50.0, 400.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "liver": (30.0, 150.0),
}

#: keywords whose values are the patient's and are scrubbed from any message that comes from pydicom
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
                    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID",
                    "AccessionNumber", "ReferringPhysicianName", "InstitutionName")


class DicomError(InspectorError, ValueError):
    """A DICOM file that cannot be scored; the message says why (and never quotes patient data)."""


class _HeaderTooLarge(Exception):
    pass


def _at(name: str) -> str:
    """The prefix of a message about the file ``name`` (none when the caller names the file itself)."""
    return f"{name}: " if name else ""


# -------------------------------------------------------------------------------------------------
# recognising


def is_dicom_name(name: str) -> bool:
    """A name that may be a DICOM file: ``.dcm`` / ``.dicom``, no suffix, or a numeric one (UID names)."""
    suffix = os.path.splitext(name.lower())[1]
    return suffix in DICOM_SUFFIXES or suffix == "" or suffix[1:].isdigit()


def has_preamble(head: bytes) -> bool:
    """The first 132 bytes of a DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def is_dicom(name: str, head: bytes) -> bool:
    """``head`` (the file's first 132 bytes or more) is a DICOM file: the preamble, or a ``.dcm`` /
    ``.dicom`` suffix (old files without a preamble are read too, and fail if they are not DICOM)."""
    return has_preamble(head) or os.path.splitext(name.lower())[1] in DICOM_SUFFIXES


def _pydicom():
    try:
        import pydicom
        from pydicom import config
    except ImportError:
        raise DicomError("DICOM support is not installed: pip install 'inspector[dicom]' (pydicom)") from None
    # validation messages quote the offending value (a birth date, a name): never produce them; and the
    # decoders' own log lines (with tracebacks) are left out: the reason is in the DicomError
    config.settings.reading_validation_mode = config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    return pydicom


# -------------------------------------------------------------------------------------------------
# windows


@dataclass(frozen=True)
class Window:
    """The VOI step applied to a grayscale frame. ``source``: "preset" (``name`` set), "file" (Window
    Center / Width of the file), "file VOI LUT", "frame range" (min..max of the frame), "colour",
    "palette"; ``function``: LINEAR, LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2)."""

    source: str
    center: float | None = None
    width: float | None = None
    function: str = "LINEAR"
    name: str | None = None

    def describe(self) -> str:
        if self.center is None or self.width is None:
            return self.source
        label = f"{self.name} " if self.name else ""
        return f"{label}{self.source} C {self.center:g} / W {self.width:g}".strip()


def parse_window(spec: str | None) -> Window | None:
    """A source's ``window``: a preset name (``PRESETS``) or "center/width" ("40/80"); empty = the file's.
    Raises ValueError saying what is allowed."""
    if spec is None or not str(spec).strip():
        return None
    text = str(spec).strip().lower().replace(" ", "_")
    if text in PRESETS:
        center, width = PRESETS[text]
        return Window("preset", center, width, name=text)
    parts = text.split("/")
    if len(parts) == 2:
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            center = width = math.nan
        if math.isfinite(center) and math.isfinite(width) and width >= 1:
            return Window("preset", center, width)
    raise ValueError(f"window {spec!r} is not a preset ({', '.join(PRESETS)}) nor \"center/width\" with a "
                     "width of at least 1")


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2: values (after the Modality LUT) -> [0, 1] (float32)."""
    c, w = float(window.center), max(float(window.width), 1.0)
    if window.function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    elif window.function == "LINEAR_EXACT":
        out = (values - c) / w + 0.5
    elif w == 1.0:  # LINEAR with width 1: a threshold at c - 0.5
        out = (values > c - 0.5).astype(np.float32)
    else:  # LINEAR
        out = (values - (c - 0.5)) / (w - 1.0) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _first(value: Any) -> float | None:
    """The first number of a (possibly multi-valued) DS/IS element."""
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else None
        number = float(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError, IndexError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _functional(ds: Any, frame: int, sequence: str) -> Any | None:
    """Item 0 of ``sequence`` in the frame's Per-Frame Functional Groups, else the Shared ones (enhanced
    multi-frame IODs, PS3.3 C.7.6.16)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is None or index >= len(items):
            continue
        inner = items[index].get(sequence)
        if inner is not None and len(inner):
            return inner[0]
    return None


def _rescale(ds: Any, frame: int) -> tuple[float, float] | None:
    item = _functional(ds, frame, "PixelValueTransformationSequence")
    for holder in (item, ds):
        if holder is not None and "RescaleSlope" in holder and "RescaleIntercept" in holder:
            slope, intercept = _first(holder.RescaleSlope), _first(holder.RescaleIntercept)
            if slope is not None and intercept is not None:
                return slope, intercept
    return None


def file_window(ds: Any, frame: int) -> Window:
    """The window the file asks for (grayscale): VOI LUT Sequence, else Window Center / Width (the frame's
    functional group first), else "frame range"."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        return Window("file VOI LUT")
    item = _functional(ds, frame, "FrameVOILUTSequence")
    for holder in (item, ds):
        if holder is not None and "WindowCenter" in holder and "WindowWidth" in holder:
            center, width = _first(holder.WindowCenter), _first(holder.WindowWidth)
            if center is not None and width is not None and width > 0:
                function = str(holder.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
                if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
                    function = "LINEAR"
                return Window("file", center, width, function)
    return Window("frame range")


# -------------------------------------------------------------------------------------------------
# the header


@dataclass
class DicomHeader:
    """What ``read_header`` learned, patient data left out (``dataset`` is pydicom's, for decoding only:
    never store, log or print it)."""

    dataset: Any
    frames: int
    rows: int
    columns: int
    samples: int
    photometric: str
    transfer_syntax: str
    encapsulated: bool

    @property
    def frame_pixels(self) -> int:
        return self.rows * self.columns

    def window_for(self, frame: int, preset: Window | None) -> Window:
        """The window ``decode_frame`` applies to ``frame`` (colour images have none)."""
        if self.photometric == "PALETTE COLOR":
            return Window("palette")
        if self.samples != 1:
            return Window("colour")
        return preset if preset is not None else file_window(self.dataset, frame)

    def record(self, preset: Window | None, window_spec: str | None = None) -> dict[str, Any]:
        """The columns of ``dicom_images`` for this file (the window of frame 0; ``window`` = the source's
        preset as configured, which the worker applies), ``frames`` included: no patient data."""
        ds = self.dataset
        window = self.window_for(0, preset)
        return {"study_uid": _text(ds, "StudyInstanceUID", 64), "series_uid": _text(ds, "SeriesInstanceUID", 64),
                "sop_uid": _text(ds, "SOPInstanceUID", 64), "sop_class_uid": _text(ds, "SOPClassUID", 64),
                "frames": self.frames, "modality": _text(ds, "Modality", 16),
                "body_part": _text(ds, "BodyPartExamined", 64), "photometric": self.photometric[:32],
                "transfer_syntax": self.transfer_syntax[:64] or None,
                "window": (window_spec or None) if preset is not None else None, "window_source": window.source,
                "window_center": window.center, "window_width": window.width}


def _text(ds: Any, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] if text and text.isprintable() else None


class _Bounded:
    """A file wrapper that refuses to *read* more than ``limit`` bytes (seeks over skipped values are free)."""

    def __init__(self, fp: BinaryIO, limit: int):
        self.fp, self.limit, self.read_bytes = fp, limit, 0
        self.name = getattr(fp, "name", None)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.limit - self.read_bytes + 1
        if self.read_bytes + size > self.limit:
            raise _HeaderTooLarge
        data = self.fp.read(size)
        self.read_bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fp.seek(offset, whence)

    def tell(self) -> int:
        return self.fp.tell()


def _count(ds: Any, keyword: str, default: int | None = None, name: str = "") -> int:
    value = ds.get(keyword, default)
    try:
        number = int(str(value).strip()) if value is not None and str(value).strip() != "" else default
    except (TypeError, ValueError):
        raise DicomError(f"{_at(name)}{keyword} is not a number") from None
    if number is None:
        raise DicomError(f"{_at(name)}no {keyword} in the header")
    return number


def read_header(fp: BinaryIO, name: str, size: int) -> DicomHeader:
    """Parse and check the header of the DICOM file ``fp`` (``size`` bytes; the position is moved). Raises
    ``DicomError`` for anything that cannot become images: not DICOM, no pixel data, truncated, frames or
    dimensions that do not match the data, over the limits."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import UID

    head = fp.read(1 << 16)
    fp.seek(0)
    if DEFLATED in head[:1 << 16]:  # pydicom inflates the whole dataset in one call: unbounded, never
        raise DicomError(f"{_at(name)}transfer syntax Deflated Explicit VR Little Endian is not read (inflating "
                         "it has no size limit); export the file uncompressed or with an image compression")
    bounded = _Bounded(fp, MAX_HEADER_BYTES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(bounded, stop_before_pixels=True, defer_size=DEFER_BYTES,
                                 force=not has_preamble(head))
    except _HeaderTooLarge:
        raise DicomError(f"{_at(name)}DICOM header larger than {MAX_HEADER_BYTES >> 20} MiB, refused") from None
    except InvalidDicomError:
        raise DicomError(f"{_at(name)}not a DICOM file") from None
    except Exception as exc:  # noqa: BLE001 - a broken header in any way pydicom reports it
        raise DicomError(f"{_at(name)}not a readable DICOM file (broken header near byte {fp.tell()}, "
                         f"{type(exc).__name__})") from None
    at = fp.tell()
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    implicit, little = ds.original_encoding if ds.original_encoding[0] is not None else (True, True)
    element = fp.read(12)
    tag = struct.unpack("<HH" if little else ">HH", element[:4]) if len(element) >= 4 else None
    if tag != (0x7FE0, 0x0010):
        sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
        kind = UID(sop_class).name if sop_class else "DICOM object without a SOP Class"
        modality = _text(ds, "Modality", 16)
        what = f"a {kind}" + (f" (modality {modality})" if modality else "")
        if tag in ((0x7FE0, 0x0008), (0x7FE0, 0x0009)):
            raise DicomError(f"{_at(name)}{what} with float pixel data, which is not supported")
        if len(element) >= 4 and tag is not None and tag[0] != 0xFFFC:
            raise DicomError(f"{_at(name)}DICOM header unreadable at byte {at}")
        raise DicomError(f"{_at(name)}DICOM without pixel data: {what}, not an image")
    vr = element[4:6]
    if implicit or not (vr.isalpha() and vr.isupper()):  # implicit, or written implicit against its syntax
        header_len, length = 8, struct.unpack("<I" if little else ">I", element[4:8])[0]
    elif vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        header_len, length = 12, struct.unpack("<I" if little else ">I", element[8:12])[0]
    else:
        header_len, length = 8, struct.unpack("<H" if little else ">H", element[6:8])[0]
    rows, columns = _count(ds, "Rows", name=name), _count(ds, "Columns", name=name)
    samples, bits = _count(ds, "SamplesPerPixel", 1, name), _count(ds, "BitsAllocated", name=name)
    frames = _count(ds, "NumberOfFrames", 1, name)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if rows < 1 or columns < 1 or samples not in (1, 3) or bits not in (1, 8, 16, 32, 64) or frames < 1:
        raise DicomError(f"{_at(name)}impossible image geometry (Rows {rows}, Columns {columns}, Samples per Pixel "
                         f"{samples}, Bits Allocated {bits}, Number of Frames {frames})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and rows * columns > limit:
        raise DicomError(f"{_at(name)}refused, too many pixels ({rows} x {columns} per frame; the limit is {limit})")
    if frames > MAX_FRAMES:
        raise DicomError(f"{_at(name)}{frames} frames, more than the {MAX_FRAMES} scored per file")
    encapsulated = length == 0xFFFFFFFF
    start = at + header_len
    if encapsulated:
        _check_fragments(fp, start, frames, little, name)
    else:
        from pydicom.pixels.utils import get_expected_length

        expected = get_expected_length(ds, unit="bytes")
        if start + length > size:
            raise DicomError(f"{_at(name)}truncated: the pixel data declares {length} bytes but the file ends "
                             f"{size - start} bytes after its start")
        if length < expected:
            raise DicomError(f"{_at(name)}the pixel data holds {length} bytes, but {frames} frame(s) of {rows} x "
                             f"{columns} x {samples} samples x {bits} bits need {expected} (wrong Number of "
                             "Frames or dimensions)")
        if frames > 1 and length - expected >= expected // frames:
            raise DicomError(f"{_at(name)}the pixel data holds {length} bytes, more than the {frames} frame(s) "
                             f"declared need ({expected}): wrong Number of Frames")
    return DicomHeader(ds, frames, rows, columns, samples, photometric, syntax, encapsulated)


def _check_fragments(fp: BinaryIO, start: int, frames: int, little: bool, name: str) -> None:
    """Encapsulated pixel data: at least one fragment per frame, and a Basic Offset Table, when present,
    with one entry per frame. Reads item headers only (fragments are skipped)."""
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    fp.seek(start)
    endian = "<" if little else ">"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            offsets = parse_basic_offsets(fp, endianness=endian)
            count, _ = parse_fragments(fp, endianness=endian)
    except Exception as exc:  # noqa: BLE001 - broken item tags, truncated fragments
        raise DicomError(f"{_at(name)}broken encapsulated pixel data ({type(exc).__name__})") from None
    if count < frames:
        raise DicomError(f"{_at(name)}Number of Frames says {frames} but the encapsulated pixel data holds "
                         f"{count} fragment(s)")
    if offsets and len(offsets) != frames:
        raise DicomError(f"{_at(name)}the Basic Offset Table lists {len(offsets)} frame(s), Number of Frames "
                         f"says {frames}")


def inspect_file(fp: BinaryIO, name: str, preset: str | None = None) -> dict[str, Any]:
    """Intake's look at a DICOM file: its ``dicom_images`` record (with ``frames``). Raises DicomError."""
    size = os.fstat(fp.fileno()).st_size if hasattr(fp, "fileno") else len(fp.getbuffer())
    header = read_header(fp, name, size)
    return header.record(parse_window(preset), preset)


# -------------------------------------------------------------------------------------------------
# decoding


def _one_line(exc: BaseException) -> str:
    """An exception as one line (pydicom lists each plugin's failure on a line of its own)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0].rstrip(":") + (": " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def _scrub(text: str, ds: Any) -> str:
    """``text`` without the values of the patient tags of ``ds`` (pydicom messages may quote values)."""
    for keyword in PATIENT_KEYWORDS:
        value = ds.get(keyword) if ds is not None else None
        for part in ([value] if value is not None else []):
            needle = str(part).strip()
            if len(needle) >= 2:
                text = text.replace(needle, "[patient data removed]")
    return text


def check_decoder(transfer_syntax: str, name: str) -> None:
    """Raise DicomError naming the plugins to install when no installed plugin decodes the syntax."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(transfer_syntax) if transfer_syntax else None
    if uid is None or not uid.is_compressed:
        return
    label = f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DicomError(f"{_at(name)}transfer syntax {label} cannot be decoded: pydicom has no decoder for "
                         "it") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DicomError(f"{_at(name)}transfer syntax {label} needs a pixel data plugin that is not installed: "
                         f"{needs}")


def _to_uint8(values: np.ndarray, top: float) -> np.ndarray:
    return np.clip(values.astype(np.float32) * (255.0 / max(top, 1.0)) + 0.5, 0, 255).astype(np.uint8)


@dataclass
class Decoded:
    image: Image.Image  # RGB, 8 bits
    window: Window  # the window applied (center/width filled in for "frame range")


def decode_frame(data: bytes, header: DicomHeader, frame: int = 0, preset: Window | str | None = None,
                 name: str = "") -> Decoded:
    """One frame of the DICOM file ``data`` (checked by ``read_header``) -> an RGB 8-bit image, with the
    Modality LUT, the window (``preset``, else the file's), MONOCHROME1 inversion and colour applied."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array

    ds = header.dataset
    if isinstance(preset, str) or preset is None:
        preset = parse_window(preset)
    if not 0 <= frame < header.frames:
        raise DicomError(f"{_at(name)}frame {frame + 1} asked for, the file has {header.frames}")
    check_decoder(header.transfer_syntax, name)
    index = frame if header.frames > 1 else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # from the bytes: only this frame's pixel data is read
                arr = pixel_array(io.BytesIO(data), index=index)
            except MemoryError:
                raise
            except Exception as first:  # noqa: BLE001 - then from the parsed dataset, which reads elements
                # written against their transfer syntax (an implicit VR Pixel Data in an explicit file) that
                # the bytes route refuses; the first reason is the one reported if this fails too
                try:
                    full = _pydicom().dcmread(io.BytesIO(data), force=not has_preamble(data[:132]))
                    arr = pixel_array(full, index=index)
                except Exception:  # noqa: BLE001
                    raise first from None
    except MemoryError:
        raise DicomError(f"{_at(name)}frame too large to decode in memory") from None
    except Exception as exc:  # noqa: BLE001 - every decoder reports its own way
        message = _scrub(_one_line(exc), ds)
        raise DicomError(f"{_at(name)}cannot decode frame {frame + 1} of {header.frames}: {message}") from None
    window = header.window_for(frame, preset)
    bits_stored = _count(ds, "BitsStored", _count(ds, "BitsAllocated", name=name), name)
    try:
        if window.source == "palette":
            rgb = apply_color_lut(arr, ds)
            rgb = rgb[..., :3] if rgb.dtype == np.uint8 else _to_uint8(rgb[..., :3], float(np.iinfo(rgb.dtype).max))
            return Decoded(Image.fromarray(np.ascontiguousarray(rgb), "RGB"), window)
        if window.source == "colour":
            rgb = arr if arr.dtype == np.uint8 else _to_uint8(arr, float(2 ** bits_stored - 1))
            return Decoded(Image.fromarray(np.ascontiguousarray(rgb), "RGB"), window)
        values = arr.astype(np.float64 if arr.dtype.itemsize > 2 else np.float32)
        rescale = _rescale(ds, frame)
        if "ModalityLUTSequence" in ds:
            values = apply_modality_lut(arr, ds).astype(np.float32)
        elif rescale is not None:
            values = values * rescale[0] + rescale[1]
        if window.source == "file VOI LUT":
            lut = apply_voi(values.astype(np.int64) if values.dtype.kind == "f" else values, ds)
            descriptor = ds.VOILUTSequence[0].get("LUTDescriptor") or [0, 0, 16]
            gray = lut.astype(np.float32) / float(2 ** int(descriptor[2]) - 1)
        elif window.source == "frame range":
            low, high = float(values.min()), float(values.max())
            window = Window("frame range", (low + high) / 2, max(high - low, 1.0), "LINEAR_EXACT")
            gray = apply_window(values, window)
        else:
            gray = apply_window(values, window)
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken LUT or palette
        message = _scrub(_one_line(exc), ds)
        raise DicomError(f"{_at(name)}cannot apply the file's lookup table to frame {frame + 1}: {message}") from None
    if header.photometric == "MONOCHROME1":
        gray = 1.0 - gray
    gray8 = np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Decoded(Image.fromarray(gray8, "L").convert("RGB"), window)


def decode_file(data: bytes, frame: int = 0, preset: Window | str | None = None, name: str = "") -> Decoded:
    """``read_header`` + ``decode_frame`` on the bytes of a file (the dashboard's re-render)."""
    header = read_header(io.BytesIO(data), name, len(data))
    return decode_frame(data, header, frame, preset, name)
