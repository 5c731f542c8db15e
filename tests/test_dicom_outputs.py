"""DICOM beyond intake (#18): the frame and UIDs in outbound events (a real mosquitto broker and a webhook
receiver), never patient data; a multi-frame file read and hashed once for all its frames. The DICOM files
are pydicom's bundled test files (``tests/test_dicom.py`` says which).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pydicom
import pytest

from inspector.store import open_store

from .dicom_helpers import (
    PATIENT_ID,
    PATIENT_NAME,
    UIDS,
    bundled,
    craft,
    mixed_dicom_folder,
    uids_of,
    with_patient,
)
from .pipeline_helpers import Broker, image_list, mqtt_subscriber, run_cli, small_png, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")

# -------------------------------------------------------------------------------------------------
# events


class _Hook(http.server.BaseHTTPRequestHandler):
    got: ClassVar[list] = []

    def do_POST(self):
        _Hook.got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@dataclass
class Sinks:
    mqtt: list  # (topic, event) as the broker delivered them
    webhook: list  # events as the webhook received them
    env: dict[str, str]  # the [outputs] settings that send to both


@pytest.fixture
def sinks(tmp_path):
    """A real mosquitto with a subscriber on inspector/#, and a webhook receiver, for one test."""
    broker = Broker(tmp_path)
    broker.start()
    received: list = []
    client = mqtt_subscriber(broker.port, received)
    _Hook.got = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_for(lambda: client.is_connected(), 20, 0.1, "the subscriber")
        yield Sinks(received, _Hook.got, {
            "INSPECTOR_OUTPUTS__MQTT_URL": f"mqtt://127.0.0.1:{broker.port}",
            "INSPECTOR_OUTPUTS__WEBHOOK_URL": f"http://127.0.0.1:{server.server_address[1]}/events"})
    finally:
        client.loop_stop()
        broker.stop()
        server.shutdown()


def test_events_carry_frame_and_uids_of_dicom_rows_only(tmp_path, db_url, sinks, monkeypatch):
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    folder = mixed_dicom_folder(tmp_path / "pacs")
    db = db_url  # the events are written with the result: on SQLite and on Postgres
    done = run_cli(["watch", str(folder), "--class-name", "scan", "--once"], db, tmp_path, env=sinks.env)
    assert done.returncode == 0, done.stderr[-3000:]
    wait_for(lambda: len(sinks.mqtt) >= 4, 20, 0.1, "4 mqtt messages")
    for events in ([e for _, e in sinks.mqtt], sinks.webhook):
        by_name: dict[str, list[dict]] = {}
        for event in events:
            by_name.setdefault(Path(event["path"]).name, []).append(event)
        rgb = sorted(by_name["rgb.dcm"], key=lambda e: e["frame"])
        assert [(e["frame"], e["frames"]) for e in rgb] == [(0, 2), (1, 2)]
        assert {tuple(e[k] for k in UIDS) for e in rgb} == {uids_of("SC_rgb_rle_2frame.dcm")}
        (ct,) = by_name["IM000001"]
        assert (ct["frame"], ct["frames"], *(ct[k] for k in UIDS)) == (0, 1, *uids_of("CT_small.dcm"))
        (photo,) = by_name["photo.png"]
        assert not {"frame", "frames", *UIDS} & set(photo) and photo["decision"] in ("pass", "fail", "review")
        text = json.dumps(events)
        assert PATIENT_NAME not in text and "Zyxwvut" not in text and PATIENT_ID not in text


# -------------------------------------------------------------------------------------------------
# a multi-frame file is read and hashed once


def test_a_multi_frame_file_is_hashed_once_and_read_once_per_batch(tmp_path, monkeypatch):
    import warnings

    from inspector import intake, load_model, worker
    from inspector.pipeline import register_model_version
    from inspector.store.routing import route_unrouted

    from .conftest import tiny_settings

    folder = tmp_path / "line"
    folder.mkdir()
    shutil.copy(bundled("rtdose.dcm"), folder / "dose.dcm")  # 15 frames
    opened: list[str] = []
    hashed: list[int] = []
    real_open, real_stream, real_sha = intake.open_regular, intake.stream_sha256, worker.sha256_of

    def counting_open(path):
        opened.append(path)
        return real_open(path)

    def counting_stream(handle, *args):
        hashed.append(1)
        return real_stream(handle, *args)

    monkeypatch.setattr(intake, "open_regular", counting_open)
    monkeypatch.setattr(intake, "stream_sha256", counting_stream)
    engine = open_store(f"sqlite:///{tmp_path / 'inspector.sqlite'}", auto_upgrade=True)
    reader = intake.Intake(engine, [intake.WatchedFolder(folder.resolve(), "dose")], stable_seconds=0,
                           rescan_seconds=0)
    reader.scan()
    assert reader.tick() == 1
    assert (len(opened), len(hashed)) == (1, 1)  # intake: one open, header and hash from the same handle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = load_model(settings=tiny_settings(image_size=224, samples=1))
    version = register_model_version(engine, detector, [reader.folders[0].source_id])
    route_unrouted(engine)
    reads: list[str] = []
    checks: list[bytes] = []

    def counting_read(path):
        reads.append(path)
        return real_open(path)

    def counting_sha(data):
        checks.append(data)
        return real_sha(data)

    monkeypatch.setattr(worker, "open_regular", counting_read)
    monkeypatch.setattr(worker, "sha256_of", counting_sha)
    scorer = worker.Worker(engine, {version: detector}, batch_size=4)
    batches = 0
    while scorer.step():
        batches += 1
    scorer.close()
    assert batches == 4 and scorer.stored == 15  # 4 + 4 + 4 + 3 frames
    assert len(checks) == 1  # hashed once for its 15 frames
    assert len(reads) == batches  # one read per batch, not one per frame
    # a file rewritten between batches is checked again, and its remaining frames are not scored
    craft("rtdose.dcm", folder / "dose2.dcm", SOPInstanceUID="1.2.826.0.1.3680043.8.498.2")  # other content
    reader.scan()
    assert reader.tick() == 1
    route_unrouted(engine)
    scorer = worker.Worker(engine, {version: detector}, batch_size=4)
    assert scorer.step() == 4
    data = bytearray((folder / "dose2.dcm").read_bytes())
    data[-1] ^= 0xFF  # same size, other content, a later mtime
    (folder / "dose2.dcm").write_bytes(bytes(data))
    while scorer.step():
        pass
    scorer.close()
    rows = [r for r in image_list(f"sqlite:///{tmp_path / 'inspector.sqlite'}") if r["path"].endswith("dose2.dcm")]
    assert [r["status"] for r in sorted(rows, key=lambda r: r["frame"])] == ["done"] * 4 + ["failed"] * 11
    assert all("replaced after it was discovered" in r["error"] for r in rows if r["status"] == "failed")
    engine.dispose()


def test_hide_paths_keeps_a_patient_named_folder_out_of_the_events(tmp_path, sinks, monkeypatch):
    """A PACS export named after the patient, with hide_paths = true: its MQTT and webhook events carry no
    path (the hash and the UIDs identify the image) and its folder-sink copies are named by result id; a
    folder without the option sends its paths as before."""
    from .test_dicom import _write_config

    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    patient = "DOE^JOHN_19230517"
    hidden, plain = tmp_path / patient / "CT_HEAD", tmp_path / "line"
    hidden.mkdir(parents=True)
    plain.mkdir()
    with_patient("CT_small.dcm", hidden / "IM0001")
    shutil.copy(bundled("MR_small.dcm"), hidden / "DOE_JOHN.dcm")  # a file named after the patient
    small_png(plain / "part.png", 3)
    _write_config(tmp_path, [{"path": str(hidden), "class_name": "head CT", "hide_paths": True},
                             {"path": str(plain), "class_name": "part"}])
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    done = run_cli(["watch", "--once"], db, tmp_path, env={**sinks.env,
                                                             "INSPECTOR_OUTPUTS__FOLDER_ROOT": str(tmp_path / "out")})
    assert done.returncode == 0, done.stderr[-3000:]
    wait_for(lambda: len(sinks.mqtt) >= 3, 20, 0.1, "3 mqtt messages")
    for events in ([e for _, e in sinks.mqtt], sinks.webhook):
        assert len(events) == 3
        secret = [e for e in events if e["class_name"] == "head CT"]
        (shown,) = [e for e in events if e["class_name"] == "part"]
        assert shown["path"] == str((plain / "part.png").resolve()) and "path_hidden" not in shown
        assert len(secret) == 2 and all(e["path"] is None and e["path_hidden"] is True for e in secret)
        assert {e["sop_uid"] for e in secret} == {uids_of("CT_small.dcm")[2], uids_of("MR_small.dcm")[2]}
        assert all(len(e["sha256"]) == 64 for e in secret)
        text = json.dumps(secret)
        assert "DOE" not in text and "JOHN" not in text and "19230517" not in text and PATIENT_NAME not in text
    copies = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert len(copies) == 3 and sum(c.endswith("_part.png") for c in copies) == 1, copies
    assert not any("DOE" in c or "JOHN" in c or "IM0001" in c for c in copies), copies
    assert sum(c.endswith(".dcm") for c in copies) == 1  # named <result id>.dcm: the suffix is kept
    from inspector.delivery import _known_suffix

    assert _known_suffix(Path("DOE.JOHN")) == "" and _known_suffix(Path("a/IM1.DCM")) == ".dcm"
    stored = {r["path"] for r in image_list(db)}
    assert str((hidden / "IM0001").resolve()) in stored  # the database keeps the path: workers read by it


def test_a_batch_lets_go_of_a_files_bytes_once_its_frames_have_them(tmp_path):
    from inspector.store.queue import Claimed
    from inspector.worker import BatchFiles, CheckedFiles

    path = tmp_path / "dose.dcm"
    shutil.copy(bundled("rtdose.dcm"), path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    frames = [Claimed(i, str(path), "dose", sha, 1, frame=i) for i in range(3)]
    files = BatchFiles(frames, CheckedFiles())
    first, _ = files.read(str(path), sha)
    assert first == path.read_bytes() and files._files  # kept for the two frames still to come
    assert files.read(str(path), sha)[0] is first and files.read(str(path), sha)[0] is first  # one read
    assert not files._files
    data, failure = BatchFiles([Claimed(9, str(path), "dose", "0" * 64, 1)]).read(str(path), "0" * 64)
    assert data is None and "replaced after it was discovered" in failure["error"]


def test_folder_sink_in_move_mode_never_moves_a_frame_of_a_multi_frame_file(tmp_path):
    from inspector.config import OutputSettings
    from inspector.delivery import FolderSink

    sink = FolderSink(OutputSettings(folder_root=str(tmp_path / "out"), folder_mode="move"))
    dose, single = tmp_path / "dose.dcm", tmp_path / "ct.dcm"
    shutil.copy(bundled("rtdose.dcm"), dose)
    shutil.copy(bundled("CT_small.dcm"), single)
    for i, decision in enumerate(["pass", "fail"]):  # two frames, two decisions
        sink.send({"id": 10 + i, "path": str(dose), "decision": decision, "line": "ct", "frame": i, "frames": 15})
    sink.send({"id": 20, "path": str(single), "decision": "pass", "line": "ct", "frame": 0, "frames": 1})
    assert dose.read_bytes() == Path(bundled("rtdose.dcm")).read_bytes()  # still there for its other frames
    assert (tmp_path / "out" / "OK" / "ct" / "10_dose.dcm").read_bytes() == dose.read_bytes()
    assert (tmp_path / "out" / "NG" / "ct" / "11_dose.dcm").is_file()
    assert not single.exists() and (tmp_path / "out" / "OK" / "ct" / "20_ct.dcm").is_file()  # a single frame: moved
