"""DICOM rows: the ``dicom_images`` record of an image (one per frame), written with the image at intake
and read by the dashboard. Never patient data: the record's keys are the columns of ``dicom_images``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select

from .schema import dicom_images, images

#: the columns a record may set (anything else in a record is refused, so nothing else can slip in)
COLUMNS = tuple(c.name for c in dicom_images.columns if c.name != "image_id")
#: what finds a DICOM image in the PACS again, as outbound events, `inspector score --json` and the CSV
#: export carry it (DICOM rows only): the frame (0-based) of the file's frames and the Study / Series / SOP
#: Instance UIDs, never patient data
EVENT_FIELDS = ("frame", "frames", "study_uid", "series_uid", "sop_uid")


def insert_dicom(conn: Any, image_id: int, record: dict[str, Any]) -> None:
    """Store the DICOM attributes of one image row (``record``: ``inspector.dicom.DicomHeader.record``)."""
    unknown = set(record) - set(COLUMNS)
    if unknown:
        raise ValueError(f"not dicom_images columns: {', '.join(sorted(unknown))}")
    conn.execute(dicom_images.insert().values(image_id=image_id, **record))


def dicom_of(engine: Engine, image_id: int) -> dict[str, Any] | None:
    """The image's path, frame, content hash and size with its DICOM attributes; None if it is not DICOM."""
    query = (select(images.c.id, images.c.path, images.c.sha256, images.c.frame, images.c.width,
                    images.c.height, *[dicom_images.c[name] for name in COLUMNS])
             .join(dicom_images, dicom_images.c.image_id == images.c.id).where(images.c.id == image_id))
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    return dict(row) if row is not None else None


def event_fields(conn: Any, image_id: int) -> dict[str, Any]:
    """``EVENT_FIELDS`` of a DICOM image row (its frame and UIDs); {} for any other image."""
    row = conn.execute(select(images.c.frame, dicom_images.c.frames, dicom_images.c.study_uid,
                              dicom_images.c.series_uid, dicom_images.c.sop_uid)
                       .join(dicom_images, dicom_images.c.image_id == images.c.id)
                       .where(images.c.id == image_id)).mappings().first()
    return dict(row) if row is not None else {}

