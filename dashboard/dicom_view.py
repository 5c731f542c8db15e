"""The DICOM panel of an image under review: where it comes from in the PACS (Study, Series and SOP Instance
UIDs, the frame), its modality and body part, the window it was scored in, and window/level presets that
re-render the stored frame for the reviewer (the score is not touched: it was computed in the stored window).

Nothing about the patient is read from the store or shown: the store has none (``inspector/dicom.py``).
``show(engine, image_id, container)`` draws the panel; ``frame_image`` is the windowed frame itself, for a
page that draws the picture its own way (a DICOM file is not something Pillow can open).
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import streamlit as st
from PIL import Image
from sqlalchemy import Engine

from inspector import dicom
from inspector.store import review as rv
from inspector.store.dicom import dicom_of

AS_SCORED = "as scored"
CUSTOM = "custom"


def frame_image(engine: Engine, image_id: int, window: str | None = None) -> tuple[Image.Image, dicom.Window] | None:
    """The image's frame as an RGB image in ``window`` (a preset name or "center/width"; None: the window it
    was scored in) and the window applied; None if the image is not DICOM. Reads the file through the store's
    guard and refuses a file whose content is no longer what was scored. Raises ``rv.ImageNotAllowed``,
    ``FileNotFoundError``, ``OSError`` or ``dicom.DicomError``."""
    row = dicom_of(engine, image_id)
    if row is None:
        return None
    data = rv.read_allowed_image(engine, row["path"])
    if row["sha256"] and hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise rv.ImageNotAllowed("the file has been replaced since it was scored")
    decoded = dicom.decode_file(data, row["frame"], window if window is not None else row["window"])
    return decoded.image, decoded.window


@st.cache_data(max_entries=64, show_spinner=False)
def _rendered(_engine: Engine, image_id: int, window: str | None, stamp: tuple[int, int, int]) -> tuple[bytes, str]:
    """PNG bytes and the window's description, cached by (image, window, the file's mtime / size / inode)."""
    del stamp
    image, used = frame_image(_engine, image_id, window)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue(), used.describe()


def facts(row: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) lines of the panel, from a ``dicom_of`` row."""
    scored = row["window_source"] or "?"
    if row["window_center"] is not None and row["window_width"] is not None:
        name = f"{row['window']} " if row["window"] and not row["window"][0].isdigit() else ""
        scored = f"{name}{scored} C {row['window_center']:g} / W {row['window_width']:g}"
    return [("Modality", row["modality"] or "?"), ("Body part", row["body_part"] or "?"),
            ("Frame", f"{row['frame'] + 1} of {row['frames']}"), ("Window (scored)", scored),
            ("Study UID", row["study_uid"] or "?"), ("Series UID", row["series_uid"] or "?"),
            ("SOP Instance UID", row["sop_uid"] or "?")]


def show(engine: Engine, image_id: int, container: Any = None, key: str = "dicom") -> bool:
    """Draw the DICOM panel of ``image_id`` into ``container`` (default: where the page is). Returns False,
    drawing nothing, when the image is not DICOM."""
    row = dicom_of(engine, image_id)
    if row is None:
        return False
    with container if container is not None else st.container():
        st.markdown("\n".join(f"- **{label}:** `{value}`" for label, value in facts(row)))
        grayscale = row["window_source"] not in ("colour", "palette")
        window = None
        if grayscale:
            choice = st.selectbox("Window / level", [AS_SCORED, *dicom.PRESETS, CUSTOM], key=f"{key}-window-{image_id}",
                                  help="Re-renders the frame for review; the score stays the one computed in "
                                       "the window it was scored in.")
            if choice == CUSTOM:
                left, right = st.columns(2)
                center = left.number_input("Center", value=float(row["window_center"] or 40.0),
                                           key=f"{key}-center-{image_id}")
                width = right.number_input("Width", value=float(row["window_width"] or 400.0), min_value=1.0,
                                           key=f"{key}-width-{image_id}")
                window = f"{center:g}/{width:g}"
            elif choice != AS_SCORED:
                window = choice
        try:
            stat = os.stat(row["path"])
            png, used = _rendered(engine, image_id, window, (stat.st_mtime_ns, stat.st_size, stat.st_ino))
        except rv.ImageNotAllowed as exc:
            st.error(f"Not shown: {exc}")
        except FileNotFoundError:
            st.warning(f"The file is gone: {row['path']}")
        except (OSError, ValueError) as exc:  # DicomError is a ValueError
            st.warning(f"The frame cannot be shown ({exc}).")
        else:
            st.image(png, caption=f"frame {row['frame'] + 1}, {used}")
    return True
