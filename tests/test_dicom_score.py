"""`inspector score` on DICOM files (#18): the same reading code as intake, one result per frame, bad files
reported with their reason without stopping; the frame and UIDs in the CSV export for DICOM rows only. The
DICOM files are pydicom's bundled test files (``tests/test_dicom.py`` says which).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from inspector.store import open_store

from .dicom_helpers import PATIENT_ID, PATIENT_NAME, UIDS, bundled, craft, mixed_dicom_folder, uids_of
from .pipeline_helpers import image_list, run_cli, small_png

pytestmark = pytest.mark.usefixtures("one_thread")

# -------------------------------------------------------------------------------------------------
# inspector score


def test_score_takes_dicom_files_one_result_per_frame_and_reports_bad_ones(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(bundled("rtdose.dcm"), folder / "dose.dcm")  # 15 frames
    shutil.copy(bundled("CT_small.dcm"), folder / "IM000001")  # no suffix: the DICM preamble says what it is
    shutil.copy(bundled("MR_truncated.dcm"), folder / "truncated.dcm")
    shutil.copy(bundled("test-SR.dcm"), folder / "1.2.826.0.1.3680043.8.498.1")  # a report named by its UID
    craft("MR_small.dcm", folder / "frames.dcm", NumberOfFrames=3)
    (folder / "DICOMDIR.txt").write_text("an export's index: neither image nor DICOM\n")
    (folder / "NOTES").write_text("no suffix, not DICOM: not taken from a folder\n")
    small_png(folder / "photo.png", 1)
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    done = run_cli(["score", str(folder), "-n", "head CT", "--window", "brain", "--json", "--maps", "maps"], db,
                   tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]  # some files failed: non-zero, the others scored
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(Path(row["path"]).name, []).append(row)
    assert set(by_name) == {"dose.dcm", "IM000001", "truncated.dcm", "1.2.826.0.1.3680043.8.498.1", "frames.dcm",
                            "photo.png"}
    dose = by_name["dose.dcm"]
    assert [(r["frame"], r["frames"], r["status"]) for r in dose] == [(i, 15, "done") for i in range(15)]
    assert {tuple(r[k] for k in UIDS) for r in dose} == {uids_of("rtdose.dcm")}
    assert all(0 <= r["image_score"] <= 1 for r in dose)
    ct = by_name["IM000001"]
    assert [(r["frame"], r["status"]) for r in ct] == [(0, "done")] and tuple(ct[0][k] for k in UIDS) == uids_of(
        "CT_small.dcm")
    photo = by_name["photo.png"]
    assert photo[0]["status"] == "done" and not {"frame", "frames", *UIDS} & set(photo[0])  # DICOM rows only
    reasons = {name: by_name[name][0] for name in ("truncated.dcm", "1.2.826.0.1.3680043.8.498.1", "frames.dcm")}
    assert all(r["status"] == "failed" and r["image_score"] is None for r in reasons.values())
    assert reasons["truncated.dcm"]["error"].startswith("truncated: the pixel data declares 8192 bytes")
    assert reasons["1.2.826.0.1.3680043.8.498.1"]["error"] == (
        "DICOM without pixel data: a Comprehensive SR Storage (modality SR), not an image")
    assert "wrong Number of Frames" in reasons["frames.dcm"]["error"]
    maps = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert maps == sorted([f"dose_frame{i}_map.png" for i in range(15)] + ["IM000001_map.png", "photo_map.png"])
    assert {r["map"] for r in dose} == {f"maps/dose_frame{i}_map.png" for i in range(15)}
    assert Image.open(tmp_path / "maps" / "dose_frame14_map.png").size[0] > 0
    # the window reached the worker: the CT was scored in the brain preset (stored with its image)
    stored = {Path(r["path"]).name: r for r in image_list(db) if r["frame"] == 0}
    from inspector.store.dicom import dicom_of

    engine = open_store(db)
    assert dicom_of(engine, stored["IM000001"]["id"])["window_center"] == 40.0
    engine.dispose()
    # the same files again: nothing scored twice, the same results come back, frame by frame
    again = run_cli(["score", str(folder), "-n", "head CT", "--window", "brain", "--json"], db, tmp_path)
    repeat = [json.loads(line) for line in again.stdout.splitlines()]
    assert [(r["path"], r.get("frame"), r["image_score"]) for r in repeat] == [
        (r["path"], r.get("frame"), r["image_score"]) for r in rows]
    assert len(image_list(db)) == 15 + 1 + 1 + 3  # 15 frames, the CT, the photo, three failed files


def test_score_names_a_bad_window_and_takes_a_suffixless_dicom_file_named_on_the_command_line(tmp_path):
    path = tmp_path / "IM000002"
    shutil.copy(bundled("MR_small.dcm"), path)
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    bad = run_cli(["score", str(path), "-n", "brain MRI", "--window", "brian"], db, tmp_path)
    assert bad.returncode == 2 and "--window: window 'brian' is not a preset" in bad.stderr, bad.stderr[-2000:]
    done = run_cli(["score", str(path), "-n", "brain MRI", "--json"], db, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert (row["frame"], row["frames"], row["sop_uid"], row["status"]) == (0, 1, uids_of("MR_small.dcm")[2], "done")
    # in the site's words: another version (its manifest keeps them), the file scored again under it
    described = run_cli(["score", str(path), "-n", "brain MRI", "--class-description", "axial brain MRI slice",
                         "--json", "-d", "winclip"], db, tmp_path)
    assert described.returncode == 0, described.stderr[-3000:]
    (other,) = [json.loads(line) for line in described.stdout.splitlines()]
    plain = run_cli(["score", str(path), "-n", "brain MRI", "--json", "-d", "winclip"], db, tmp_path)
    (same,) = [json.loads(line) for line in plain.stdout.splitlines()]
    assert other["model_version"] != same["model_version"] and other["status"] == same["status"] == "done"
    assert other["image_score"] != same["image_score"]
    from sqlalchemy import create_engine, select

    from inspector.store.schema import model_versions

    engine = create_engine(db)
    with engine.connect() as conn:
        manifests = {r.name: json.loads(r.manifest) for r in conn.execute(select(model_versions))}
    engine.dispose()
    assert manifests[other["model_version"]]["identity"]["class_descriptions"] == {"brain MRI": "axial brain MRI slice"}
    assert "class_descriptions" not in manifests[same["model_version"]]["identity"]


# -------------------------------------------------------------------------------------------------
# the CSV export


def test_csv_export_carries_frame_and_uids_of_dicom_rows_only(tmp_path, db_url, monkeypatch):
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    folder = mixed_dicom_folder(tmp_path / "pacs")
    db = db_url  # the export's query on SQLite and on Postgres
    done = run_cli(["score", str(folder), "-n", "scan", "--json"], db, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the export the dashboard offers
    from inspector.store.review import export_csv

    engine = open_store(db)
    exported = list(csv.DictReader(io.StringIO(export_csv(engine))))
    engine.dispose()
    by_name = {}
    for row in exported:
        by_name.setdefault(Path(row["path"]).name, []).append(row)
    assert [(r["frame"], r["frames"]) for r in by_name["rgb.dcm"]] == [("0", "2"), ("1", "2")]
    assert {tuple(r[k] for k in UIDS) for r in by_name["rgb.dcm"]} == {uids_of("SC_rgb_rle_2frame.dcm")}
    assert tuple(by_name["IM000001"][0][k] for k in ("frame", *UIDS)) == ("0", *uids_of("CT_small.dcm"))
    assert all(by_name["photo.png"][0][k] == "" for k in ("frame", "frames", *UIDS))
    assert PATIENT_NAME not in json.dumps(exported) and PATIENT_ID not in json.dumps(exported)


def test_score_reports_the_content_a_path_holds_now(tmp_path):
    """A path scored with content A, then B, then A again: the third run reports A's stored result, not the
    newest row of the path (B's)."""
    path = tmp_path / "part.png"
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"

    def score() -> dict:
        done = run_cli(["score", str(path), "-n", "part", "--json", "-d", "winclip"], db, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        (row,) = [json.loads(line) for line in done.stdout.splitlines()]
        return row

    small_png(path, 1)
    first = score()
    small_png(path, 2)
    second = score()
    small_png(path, 1)
    third = score()
    assert first["image_score"] != second["image_score"] and third["image_score"] == first["image_score"]
    assert len(image_list(db)) == 2  # A and B, each once
