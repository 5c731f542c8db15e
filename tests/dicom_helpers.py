"""DICOM files for the tests: pydicom's bundled test files (inside its wheel, never downloaded) and copies
of them changed with pydicom (a patient's name and ID, bad elements)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

PATIENT_NAME = "Zyxwvut^Qwertyuiop"
PATIENT_ID = "PID-8842-QX"
BIRTH_DATE = "19230517"
BAD_BIRTH_DATE = "BAD1923DATE"  # an invalid DA value: pydicom's validation would quote it in a warning


def bundled(name: str) -> str:
    """A test file shipped inside the installed pydicom wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None and Path(path).is_file(), f"{name} is not bundled with pydicom {pydicom.__version__}"
    return path


def craft(source: str, path: Path, **changes) -> Path:
    """A bundled file with data elements changed (a keyword set to None is deleted), saved at ``path``."""
    ds = pydicom.dcmread(bundled(source))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def with_patient(source: str, path: Path, birth_date: str = BIRTH_DATE) -> Path:
    """A copy of a bundled file carrying a patient's name, ID, birth date and other IDs."""
    ds = pydicom.dcmread(bundled(source))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid date (quoting it): on purpose here
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, birth_date
    ds.OtherPatientIDs = PATIENT_ID + "-B"
    ds.save_as(path)
    return path


def mixed_dicom_folder(folder: Path) -> Path:
    """A folder with a 2-frame RGB file and a suffix-less CT slice, both carrying a patient's name and ID,
    and a PNG photo beside them."""
    from .pipeline_helpers import small_png

    folder.mkdir(parents=True)
    with_patient("SC_rgb_rle_2frame.dcm", folder / "rgb.dcm")
    with_patient("CT_small.dcm", folder / "IM000001")
    small_png(folder / "photo.png", 2)
    return folder


#: the UIDs that find a DICOM image in the PACS again, as events and exports name them
UIDS = ("study_uid", "series_uid", "sop_uid")


def uids_of(name: str) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance UID) of a bundled file."""
    ds = pydicom.dcmread(bundled(name))
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
