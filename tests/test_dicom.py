"""DICOM intake (#18) on real DICOM files no one here made: the test files bundled in pydicom's wheel
(``pydicom.data``: CT_small, MR_small and its RLE / JPEG 2000 / JPEG-LS copies, JPEG baseline and 12-bit JPEG,
multi-frame RTDOSE, RGB RLE and YBR JPEG cine, palette colour, the truncated MR, structured reports), read
from the installed package; plus bad files crafted from them with pydicom (no pixel data, a transfer syntax
nothing decodes, wrong frame counts, huge declared dimensions with tiny data, a header of thousands of
elements). No MONOCHROME1 file is bundled: one is made from MR_small by changing its Photometric
Interpretation (the pixels are the same; only the display inverts).

The pixel checks compare with pydicom's own processing functions (``apply_modality_lut``, ``apply_voi_lut``,
``apply_color_lut``), an implementation independent of ``inspector/dicom.py``'s windowing.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import MPEG2MPML
from sqlalchemy import MetaData, create_engine, select

from inspector import dicom
from inspector.config import ConfigError, load_settings
from inspector.store import open_store
from inspector.store.queue import ensure_source, register_file
from inspector.store.schema import dicom_images, images, results

from .dicom_helpers import BAD_BIRTH_DATE, BIRTH_DATE, PATIENT_ID, PATIENT_NAME, bundled, craft, with_patient
from .pipeline_helpers import image_list, run_cli, table_rows


def decode(name_or_path: str, frame: int = 0, window: str | None = None) -> dicom.Decoded:
    path = name_or_path if Path(name_or_path).is_file() else bundled(name_or_path)
    return dicom.decode_file(Path(path).read_bytes(), frame, window, name=Path(path).name)


def gray(decoded: dicom.Decoded) -> np.ndarray:
    array = np.asarray(decoded.image)
    assert array.ndim == 3 and array.shape[2] == 3 and (array[..., 0] == array[..., 2]).all()
    return array[..., 0].astype(np.int16)


def header_error(path: str | Path) -> str:
    data = Path(path).read_bytes()
    with pytest.raises(dicom.DicomError) as caught:
        dicom.read_header(io.BytesIO(data), "f", len(data))
    return str(caught.value)


def unsupported_syntax(path: Path) -> Path:
    """MR_small's header with an MPEG-2 transfer syntax (a video codec pydicom has no decoder for)."""
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(96)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


# -------------------------------------------------------------------------------------------------
# recognising and reading, in process


def test_names_and_preamble_decide_what_is_dicom():
    assert dicom.is_dicom_name("a.dcm") and dicom.is_dicom_name("B.DICOM") and dicom.is_dicom_name("IM000001")
    assert dicom.is_dicom_name("1.2.840.113619.2.55.3.604688119.969.1268071029.320")  # a UID-named file
    assert not dicom.is_dicom_name("photo.png") and not dicom.is_dicom_name("notes.txt")
    head = Path(bundled("CT_small.dcm")).read_bytes()[:132]
    assert dicom.is_dicom("IM000001", head) and not dicom.is_dicom("IM000001", b"hello" * 40)


def test_grayscale_matches_pydicoms_own_modality_and_voi_processing():
    """MR_small (signed 16-bit, Window Center 600 / Width 1600): our 8-bit frame equals pydicom's windowing
    scaled to 0..255 (one grey level for rounding), so the 16-bit values reached the window unchanged."""
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    reference = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, prefer_lut=False)
    low, high = -(2 ** 15), 2 ** 15 - 1  # pydicom's output range for signed 16-bit data
    expected = np.round((reference - low) / (high - low) * 255)
    ours = decode("MR_small.dcm")
    assert ours.window == dicom.Window("file", 600.0, 1600.0)
    assert np.abs(gray(ours) - expected).max() <= 1
    assert int(ds.pixel_array.max()) > 255  # the data really is 16-bit


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_compressed_and_other_encodings_of_the_same_mr_give_the_same_image(name):
    assert np.array_equal(gray(decode(name)), gray(decode("MR_small.dcm")))


def test_ct_rescale_to_hounsfield_units_and_window_presets():
    """CT_small (slope 1, intercept -1024, no window in the file): a preset windows the Hounsfield units."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert float(ds.RescaleIntercept) != 0
    brain = gray(decode("CT_small.dcm", window="brain"))
    assert (brain[hu <= 0] == 0).all() and (brain[hu >= 80] == 255).all()
    inside = (hu > 5) & (hu < 75)
    assert inside.any() and ((brain[inside] > 0) & (brain[inside] < 255)).all()
    bone = decode("CT_small.dcm", window="bone")
    assert bone.window == dicom.Window("preset", 400.0, 1800.0, name="bone")
    assert not np.array_equal(gray(bone), brain)
    custom = decode("CT_small.dcm", window="40/80")  # "center/width" is the same window as the preset
    assert np.array_equal(gray(custom), brain)
    own = decode("CT_small.dcm")  # no window in the file: the frame's range
    assert own.window.source == "frame range" and gray(own).min() == 0 and gray(own).max() == 255


def test_monochrome1_is_inverted(tmp_path):
    inverted = craft("MR_small.dcm", tmp_path / "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    assert np.abs(gray(decode(str(inverted))) - (255 - gray(decode("MR_small.dcm")))).max() <= 1


def test_colour_palette_and_multi_frame_match_pydicom():
    rgb = decode("examples_rgb_color.dcm")
    assert np.array_equal(np.asarray(rgb.image), pydicom.dcmread(bundled("examples_rgb_color.dcm")).pixel_array)
    ds = pydicom.dcmread(bundled("examples_palette.dcm"))
    palette = decode("examples_palette.dcm")
    assert palette.window.source == "palette"
    reference = apply_color_lut(ds.pixel_array, ds)[..., :3]  # 16-bit palette entries
    assert reference.dtype == np.uint16
    assert np.abs(np.asarray(palette.image).astype(np.int32) - np.round(reference / 257.0)).max() <= 1
    cine = pydicom.dcmread(bundled("examples_ybr_color.dcm"))  # 30 frames, YBR_FULL_422, JPEG baseline
    assert int(cine.NumberOfFrames) == 30
    frame = decode("examples_ybr_color.dcm", frame=17)
    assert np.array_equal(np.asarray(frame.image), pixel_array(bundled("examples_ybr_color.dcm"), index=17))
    assert not np.array_equal(np.asarray(frame.image), np.asarray(decode("examples_ybr_color.dcm", frame=0).image))
    dose = [gray(decode("rtdose.dcm", frame=i)) for i in (0, 14)]  # 15 frames of 32-bit dose
    assert dose[0].shape == (10, 10) and not np.array_equal(dose[0], dose[1])
    with pytest.raises(dicom.DicomError, match="frame 16 asked for, the file has 15"):
        decode("rtdose.dcm", frame=15)


def test_files_that_cannot_become_images_fail_with_their_reason(tmp_path):
    assert "without pixel data: a Comprehensive SR Storage (modality SR)" in header_error(bundled("test-SR.dcm"))
    assert "without pixel data: a Basic Text SR Storage" in header_error(bundled("reportsi.dcm"))
    assert "truncated: the pixel data declares 8192 bytes but the file ends 8130" in header_error(
        bundled("MR_truncated.dcm"))
    assert "Deflated Explicit VR Little Endian is not read" in header_error(bundled("image_dfl.dcm"))
    no_pixels = tmp_path / "nopix.dcm"
    craft("CT_small.dcm", no_pixels, PixelData=None)
    assert "without pixel data: a CT Image Storage (modality CT)" in header_error(no_pixels)
    frames = craft("MR_small.dcm", tmp_path / "frames.dcm", NumberOfFrames=3)
    assert "holds 8192 bytes, but 3 frame(s) of 64 x 64 x 1 samples x 16 bits need 24576" in header_error(frames)
    fewer = craft("rtdose.dcm", tmp_path / "fewer.dcm", NumberOfFrames=5)  # 15 frames of data, 5 declared
    assert "more than the 5 frame(s) declared need" in header_error(fewer)
    rle = craft("MR_small_RLE.dcm", tmp_path / "rle.dcm", NumberOfFrames=4)
    assert "Number of Frames says 4 but the encapsulated pixel data holds 1 fragment(s)" in header_error(rle)
    huge = craft("MR_small.dcm", tmp_path / "huge.dcm", Rows=30000, Columns=30000)
    assert "too many pixels (30000 x 30000 per frame" in header_error(huge)
    big = craft("MR_small.dcm", tmp_path / "big.dcm", Rows=4000, Columns=4000)  # under the limit, tiny data
    assert "holds 8192 bytes, but 1 frame(s) of 4000 x 4000" in header_error(big)
    video = unsupported_syntax(tmp_path / "video.dcm")
    data = video.read_bytes()
    with pytest.raises(dicom.DicomError, match="MPEG2 Main Profile / Main Level .* pydicom has no decoder"):
        dicom.decode_file(data, 0, None, "video.dcm")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(bytes(128) + b"DICM" + b"\xff" * 64)
    assert "not a readable DICOM file" in header_error(garbage) or "not a DICOM file" in header_error(garbage)


def test_a_header_of_thousands_of_elements_is_refused_before_it_is_read_whole(tmp_path):
    """3000 private text elements of 3000 bytes (each under the size that is skipped): 9 MB of header."""
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    for i in range(3000):
        block, element = divmod(i, 240)
        ds.add_new((0x0019 + 2 * block, 0x1000 + element), "UT", "x" * 3000)
    path = tmp_path / "bomb.dcm"
    ds.save_as(path)
    assert "DICOM header larger than 8 MiB, refused" in header_error(path)


def test_record_keeps_identifiers_of_the_image_never_of_the_patient(tmp_path):
    path = craft("CT_small.dcm", tmp_path / "ct.dcm", PatientName=PATIENT_NAME, PatientID=PATIENT_ID,
                 PatientBirthDate=BIRTH_DATE)
    ds = pydicom.dcmread(path)
    with open(path, "rb") as handle:
        record = dicom.inspect_file(handle, "", "brain")
    assert record["study_uid"] == ds.StudyInstanceUID and record["series_uid"] == ds.SeriesInstanceUID
    assert record["sop_uid"] == ds.SOPInstanceUID and record["modality"] == "CT" and record["frames"] == 1
    assert (record["window"], record["window_center"], record["window_width"]) == ("brain", 40.0, 80.0)
    text = json.dumps(record)
    assert PATIENT_NAME.split("^")[0] not in text and PATIENT_ID not in text and BIRTH_DATE not in text


def test_window_and_domain_settings_of_a_source(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[[sources]]\npath = "/x"\nclass_name = "head CT"\nwindow = "subdural"\ndomain = "medical"\n')
    source = load_settings(config, environ={}).sources[0]
    assert (source.window, source.domain) == ("subdural", "medical")
    config.write_text('[[sources]]\npath = "/x"\nclass_name = "c"\nwindow = "brian"\n')
    with pytest.raises(ConfigError, match="window 'brian' is not a preset .*brain"):
        load_settings(config, environ={})
    config.write_text('[[sources]]\npath = "/x"\nclass_name = "c"\ndomain = "medicall"\n')
    with pytest.raises(ConfigError, match="domain: 'medicall' is not one of industrial, medical"):
        load_settings(config, environ={})


def test_a_medical_source_scores_under_a_version_of_its_own(tmp_path):
    from inspector.intake import WatchedFolder
    from inspector.pipeline import folder_settings
    from inspector.versions import recipe_from_settings

    settings = load_settings(None, environ={"INSPECTOR_MODEL__DETECTOR": "aa-clip",
                                            "INSPECTOR_MODEL__BACKBONE": "test-tiny",
                                            "INSPECTOR_MODEL__PRETRAINED": "random"})
    plain = WatchedFolder(tmp_path, "brain MRI")
    medical = WatchedFolder(tmp_path, "brain MRI", domain="medical")
    assert folder_settings(settings, plain) is settings
    own = folder_settings(settings, medical)
    assert own.aa_clip.domain == "medical" and settings.aa_clip.domain == "industrial"
    assert recipe_from_settings(own).digest != recipe_from_settings(settings).digest
    assert recipe_from_settings(own).identity["options"]["domain"] == "medical"


def test_one_row_per_frame_renames_and_copies_follow_every_frame(tmp_path, db_url):
    engine = open_store(db_url, auto_upgrade=True)
    source = ensure_source(engine, str(tmp_path), "dose")
    path = tmp_path / "dose.dcm"
    shutil.copy(bundled("rtdose.dcm"), path)
    with open(path, "rb") as handle:
        record = dicom.inspect_file(handle, "")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert register_file(engine, source, "dose", str(path), sha, 1, 1, dicom=record) == "new"
    assert register_file(engine, source, "dose", str(path), sha, 1, 1, dicom=record) == "known"
    copy = tmp_path / "copy.dcm"
    shutil.copy(path, copy)
    assert register_file(engine, source, "dose", str(copy), sha, 1, 1, dicom=record) == "duplicate"
    moved = tmp_path / "moved.dcm"
    path.rename(moved)
    assert register_file(engine, source, "dose", str(moved), sha, 1, 1, dicom=record) == "renamed"
    with engine.connect() as conn:
        rows = conn.execute(select(images).order_by(images.c.id)).mappings().all()
        originals = [r for r in rows if r["status"] != "duplicate"]
        copies = [r for r in rows if r["status"] == "duplicate"]
        assert [r["frame"] for r in originals] == list(range(15)) and {r["path"] for r in originals} == {str(moved)}
        by_id = {r["id"]: r for r in rows}
        assert [(r["frame"], by_id[r["duplicate_of"]]["frame"]) for r in copies] == [(i, i) for i in range(15)]
        attrs = conn.execute(select(dicom_images.c.image_id, dicom_images.c.frames, dicom_images.c.modality)).all()
        assert sorted(a.image_id for a in attrs) == [r["id"] for r in originals]
        assert {(a.frames, a.modality) for a in attrs} == {(15, "RTDOSE")}
    engine.dispose()


# -------------------------------------------------------------------------------------------------
# the real pipeline: `inspector watch --once` over real and crafted files


def _write_config(root: Path, sources: list[dict]) -> None:
    lines = []
    for source in sources:
        lines.append("[[sources]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in source.items()]
    (root / "config.toml").write_text("\n".join(lines) + "\n")


def test_watch_once_scores_real_dicom_files_frame_by_frame_and_records_the_bad_ones(tmp_path):
    folder, ct_folder = tmp_path / "pacs", tmp_path / "ct"
    folder.mkdir()
    ct_folder.mkdir()
    for name in ["MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg.dcm", "examples_palette.dcm",
                 "rtdose.dcm", "SC_rgb_rle_2frame.dcm", "MR_truncated.dcm", "test-SR.dcm", "JPEG-lossy.dcm"]:
        shutil.copy(bundled(name), folder / name)
    shutil.copy(bundled("MR_small_jp2klossless.dcm"), folder / "1.2.826.0.1.3680043.2.1125.1.99")  # no suffix
    shutil.copy(bundled("CT_small.dcm"), ct_folder / "IM000001")  # no suffix either
    (folder / "README").write_text("an export's readme: not DICOM, ignored\n")
    craft("MR_small.dcm", folder / "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    craft("CT_small.dcm", folder / "nopix.dcm", PixelData=None)
    craft("MR_small.dcm", folder / "frames.dcm", NumberOfFrames=3)
    craft("MR_small.dcm", folder / "huge.dcm", Rows=30000, Columns=30000)
    unsupported_syntax(folder / "video.dcm")
    _write_config(tmp_path, [{"path": str(folder), "class_name": "scan"},
                             {"path": str(ct_folder), "class_name": "head CT", "window": "brain"}])
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    done = run_cli(["watch", "--once"], db, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = image_list(db)
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(Path(row["path"]).name, []).append(row)
    assert "README" not in by_name
    for name in ["MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg.dcm", "examples_palette.dcm",
                 "mono1.dcm", "1.2.826.0.1.3680043.2.1125.1.99", "IM000001"]:
        assert [(r["frame"], r["status"]) for r in by_name[name]] == [(0, "done")], (name, by_name[name])
    assert [(r["frame"], r["status"]) for r in by_name["rtdose.dcm"]] == [(i, "done") for i in range(15)]
    assert [(r["frame"], r["status"]) for r in by_name["SC_rgb_rle_2frame.dcm"]] == [(0, "done"), (1, "done")]
    assert by_name["examples_palette.dcm"][0]["width"] == 800 and by_name["examples_palette.dcm"][0]["height"] == 350
    reasons = {name: by_name[name][0]["error"] for name in ["MR_truncated.dcm", "test-SR.dcm", "JPEG-lossy.dcm",
                                                            "nopix.dcm", "frames.dcm", "huge.dcm", "video.dcm"]}
    assert all(len(by_name[name]) == 1 and by_name[name][0]["status"] == "failed" for name in reasons)
    assert reasons["MR_truncated.dcm"].startswith("truncated: the pixel data declares 8192 bytes")
    assert reasons["test-SR.dcm"] == "DICOM without pixel data: a Comprehensive SR Storage (modality SR), not an image"
    assert reasons["nopix.dcm"] == "DICOM without pixel data: a CT Image Storage (modality CT), not an image"
    assert "wrong Number of Frames" in reasons["frames.dcm"] and "too many pixels" in reasons["huge.dcm"]
    assert "MPEG2 Main Profile / Main Level" in reasons["video.dcm"] and "pydicom has no decoder" in reasons["video.dcm"]
    # the 12-bit JPEG no installed plugin decodes: each plugin's own reason
    assert "cannot decode frame 1 of 1" in reasons["JPEG-lossy.dcm"] and "pylibjpeg:" in reasons["JPEG-lossy.dcm"]
    attrs = {r["image_id"]: r for r in table_rows(db, dicom_images)}
    ct = pydicom.dcmread(bundled("CT_small.dcm"))
    ct_row = attrs[by_name["IM000001"][0]["id"]]
    assert (ct_row["study_uid"], ct_row["series_uid"], ct_row["sop_uid"]) == (
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    assert (ct_row["modality"], ct_row["window"], ct_row["window_center"], ct_row["window_width"]) == (
        "CT", "brain", 40.0, 80.0)
    mr_row = attrs[by_name["MR_small.dcm"][0]["id"]]
    assert (mr_row["window"], mr_row["window_source"], mr_row["window_center"]) == (None, "file", 600.0)
    assert {attrs[r["id"]]["frames"] for r in by_name["rtdose.dcm"]} == {15}
    scored = [r["image_id"] for r in table_rows(db, results)]
    assert len(scored) == len(set(scored)) == sum(1 for r in rows if r["status"] == "done") == 8 + 15 + 2


def test_a_box_without_the_jpeg_plugin_says_which_plugin_to_install(tmp_path):
    """pydicom alone (no pylibjpeg): JPEG-LS cannot be decoded and the reason names the plugins that would.
    The child process sees no pylibjpeg: a package of that name first on its path raises ImportError, as
    Python does when it is not installed."""
    hidden = tmp_path / "hidden" / "pylibjpeg"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("pylibjpeg is not installed on this box")\n')
    folder = tmp_path / "pacs"
    folder.mkdir()
    shutil.copy(bundled("MR_small_jpeg_ls_lossless.dcm"), folder / "jls.dcm")
    shutil.copy(bundled("MR_small_RLE.dcm"), folder / "rle.dcm")  # pydicom decodes RLE itself
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    root = Path(__file__).parents[1]
    done = run_cli(["watch", str(folder), "--class-name", "scan", "--once"], db, tmp_path,
                   env={"PYTHONPATH": f"{hidden.parent}:{root}"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in image_list(db)}
    assert rows["rle.dcm"]["status"] == "done"
    assert rows["jls.dcm"]["status"] == "failed"
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80) needs a pixel data plugin that is not " \
           "installed" in rows["jls.dcm"]["error"]
    assert "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1" in rows["jls.dcm"]["error"]


def test_no_patient_name_or_id_anywhere_after_scoring_files_that_carry_them(tmp_path, monkeypatch):
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    folder = tmp_path / "pacs"
    folder.mkdir()
    for source, name in [("CT_small.dcm", "ct.dcm"), ("MR_small_RLE.dcm", "mr.dcm"), ("rtdose.dcm", "dose.dcm"),
                         ("SC_rgb_rle_2frame.dcm", "rgb.dcm"), ("MR_truncated.dcm", "truncated.dcm"),
                         ("test-SR.dcm", "report.dcm"), ("JPEG-lossy.dcm", "lossy.dcm")]:
        with_patient(source, folder / name)
    with_patient("MR_small.dcm", folder / "baddate.dcm", BAD_BIRTH_DATE)
    ds = pydicom.dcmread(folder / "ct.dcm")
    ds.NumberOfFrames = 4  # wrong frame count: an error message about a file that carries patient data
    ds.save_as(folder / "frames.dcm")
    outbox = tmp_path / "outbox"
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    done = run_cli(["watch", str(folder), "--class-name", "scan", "--once", "--verbose"], db, tmp_path,
                   env={"INSPECTOR_OUTPUTS__FOLDER_ROOT": str(outbox), "INSPECTOR_DECISIONS__PROVISIONAL_AFTER": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = image_list(db)
    assert sum(r["status"] == "done" for r in rows) == 1 + 1 + 15 + 2 + 1
    assert sum(r["status"] == "failed" for r in rows) == 4
    needles = [PATIENT_NAME, "Zyxwvut", "Qwertyuiop", PATIENT_ID, BIRTH_DATE, BAD_BIRTH_DATE]
    # every table, every column, as text
    engine = create_engine(db)
    meta = MetaData()
    meta.reflect(engine)
    dumped = []
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                dumped.append(" ".join(repr(v) for v in row))
        outbox_rows = conn.execute(select(meta.tables["outbox"].c.payload)).scalars().all()
    assert len(dumped) > 40 and outbox_rows, "the database holds the scored images and their events"
    text = "\n".join(dumped)
    # the database files themselves (and the write-ahead log, if any is left)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("inspector.sqlite*"))
    from inspector.store.review import export_csv

    csv = export_csv(open_store(db))
    assert csv.count("\n") > 20
    logs = done.stdout + done.stderr + "".join(p.read_text() for p in tmp_path.glob("*.log"))
    for needle in needles:
        assert needle not in text, f"{needle!r} in the database"
        assert needle.encode() not in raw, f"{needle!r} in the database file"
        assert needle not in csv, f"{needle!r} in the CSV export"
        assert needle not in logs, f"{needle!r} in the logs"
        assert all(needle not in payload for payload in outbox_rows)
    engine.dispose()


def _captions(at) -> str:
    """The captions of the page's images (the element is "image" in current Streamlit, "imgs" before)."""
    return " ".join(img.caption for kind in ("image", "imgs") for element in at.get(kind) for img in element.proto.imgs)


def _dicom_panel(db_url: str, image_id: int) -> None:  # an AppTest script: runs in Streamlit's script thread
    from inspector._dashboard import dicom_view

    from inspector.store import open_store as _open

    dicom_view.show(_open(db_url), image_id)


def test_dashboard_panel_shows_uids_modality_and_window_and_rerenders_presets(tmp_path):
    from inspector._dashboard import dicom_view
    from streamlit.testing.v1 import AppTest

    folder = tmp_path / "pacs"
    folder.mkdir()
    path = with_patient("CT_small.dcm", folder / "IM000001")
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    engine = open_store(db, auto_upgrade=True)
    source = ensure_source(engine, str(folder), "head CT")
    with open(path, "rb") as handle:
        record = dicom.inspect_file(handle, "", "brain")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert register_file(engine, source, "head CT", str(path), sha, 1, 1, dicom=record) == "new"
    image_id = image_list(db)[0]["id"]
    scored = dicom_view.frame_image(engine, image_id)
    assert scored is not None and scored[1] == dicom.Window("preset", 40.0, 80.0, name="brain")
    assert np.array_equal(np.asarray(scored[0]), np.asarray(decode(str(path), window="brain").image))

    at = AppTest.from_function(_dicom_panel, args=(db, image_id), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    shown = " ".join(m.value for m in at.markdown)
    ds = pydicom.dcmread(path)
    for value in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, "CT", "brain preset C 40 / W 80",
                  "1 of 1"):
        assert value in shown, value
    assert at.selectbox[0].value == dicom_view.AS_SCORED and "lung" in at.selectbox[0].options
    assert "brain preset C 40 / W 80" in _captions(at)
    at.selectbox[0].select("lung").run()
    assert not at.exception, at.exception
    assert "lung preset C -600 / W 1500" in _captions(at)
    at.selectbox[0].select(dicom_view.CUSTOM).run()
    at.number_input[0].set_value(100.0).run()
    assert "preset C 100 / W 80" in _captions(at)
    page = shown + _captions(at) + " ".join(str(n.value) for n in at.selectbox)
    assert PATIENT_NAME not in page and PATIENT_ID not in page and BIRTH_DATE not in page
    path.write_bytes(path.read_bytes()[:-10] + bytes(10))  # replaced after scoring: not shown as the scored one
    with pytest.raises(Exception, match="replaced since it was scored"):
        dicom_view.frame_image(engine, image_id)
    assert dicom_view.show(engine, image_list(db)[0]["id"] + 1) is False  # not a DICOM image: nothing drawn
    engine.dispose()


def test_enhanced_multi_frame_rescale_and_window_are_taken_per_frame(tmp_path):
    """Per-Frame Functional Groups (PS3.3 C.7.6.16) carry each frame's rescale and window: frame 0 is shown
    in its own window, frame 1 in another, and a shared group applies to frames without their own."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    frame = ds.PixelData
    ds.PixelData = frame * 3
    ds.NumberOfFrames = 3

    def group(center: float | None, width: float, slope: float) -> Dataset:
        item = Dataset()
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, 0, "US"
        item.PixelValueTransformationSequence = Sequence([transform])
        if center is not None:
            voi = Dataset()
            voi.WindowCenter, voi.WindowWidth = center, width
            item.FrameVOILUTSequence = Sequence([voi])
        return item

    ds.PerFrameFunctionalGroupsSequence = Sequence([group(600, 400, 1.0), group(1200, 800, 2.0), Dataset()])
    shared = Dataset()
    shared.FrameVOILUTSequence = Sequence([Dataset()])
    shared.FrameVOILUTSequence[0].WindowCenter, shared.FrameVOILUTSequence[0].WindowWidth = 300, 100
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    values = pydicom.dcmread(bundled("MR_small.dcm")).pixel_array.astype(np.float64)
    first, second, third = (decode(str(path), frame=i) for i in range(3))
    assert first.window == dicom.Window("file", 600.0, 400.0) and second.window == dicom.Window("file", 1200.0, 800.0)
    assert third.window == dicom.Window("file", 300.0, 100.0)  # the shared group
    # frame 1 doubles its values and its window: the same picture as frame 0 (to a grey level)
    assert np.abs(gray(second) - gray(first)).max() <= 1
    expected = np.clip(((values - 299.5) / 99.0 + 0.5) * 255 + 0.5, 0, 255).astype(np.int16)
    assert np.abs(gray(third) - expected).max() <= 1


def test_migration_0005_keeps_rows_as_frame_0_and_downgrades(tmp_path):
    from inspector.store.db import make_engine, upgrade, utcnow

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    assert upgrade(url, "0004") == "0004"
    engine = make_engine(url)
    old = MetaData()
    old.reflect(engine)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(old.tables["images"].insert().values(
            path="/a.png", class_name="bottle", sha256="a" * 64, size=1, mtime_ns=1, status="pending", attempts=0,
            next_attempt_at=now, discovered_at=now, updated_at=now))
    assert upgrade(url) == "0005"
    with engine.connect() as conn:
        assert conn.execute(select(images.c.path, images.c.frame)).all() == [("/a.png", 0)]
    from alembic import command

    from inspector.store.db import alembic_config

    engine.dispose()
    plain = create_engine(url)  # foreign keys off, as upgrade() runs SQLite migrations
    with plain.begin() as conn:
        config = alembic_config(url)
        config.attributes["connection"] = conn
        command.downgrade(config, "0004")
    after = MetaData()
    after.reflect(plain)
    assert "dicom_images" not in after.tables and "frame" not in after.tables["images"].c
    with plain.connect() as conn:
        assert conn.execute(select(after.tables["images"].c.path)).scalars().all() == ["/a.png"]
    plain.dispose()
