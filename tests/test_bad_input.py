"""Garbage in the drop folder: every file ends as an image row with a clear error or a correct result, and
the good images are all scored. Runs the real `inspector watch --once` in a subprocess on SQLite."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
from PIL import Image

from inspector.intake import Intake, WatchedFolder
from inspector.store import open_store
from inspector.worker import Worker

from .pipeline_helpers import image_list, image_rows, result_counts, run_cli, small_png


def rgb(seed: int, w: int = 60, h: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def make_garbage(folder, outside):
    good, bad = {}, {}
    (folder / "zero.png").write_bytes(b"")
    bad["zero.png"] = "not an image"
    buf = io.BytesIO()
    rgb(1, 200, 200).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad["truncated.jpg"] = "truncated"
    buf = io.BytesIO()
    rgb(2, 200, 200).save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad["truncated.png"] = "not a readable image"
    (folder / "text.png").write_text("hello, I am not a picture\n")
    bad["text.png"] = "not an image"
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 Mpx, a few KB on disk
    bad["bomb.png"] = "too many pixels"
    Image.new("L", (10000, 10000), 128).save(folder / "huge.jpg", quality=50)
    good["huge.jpg"] = (10000, 10000)
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(folder / "deep16.png")
    good["deep16.png"] = (64, 48)
    rgb(3).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    good["palette.png"] = (60, 40)
    rgb(4).convert("L").save(folder / "gray.png")
    good["gray.png"] = (60, 40)
    rgb(5).convert("CMYK").save(folder / "cmyk.jpg")
    good["cmyk.jpg"] = (60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb(6).save(folder / "rotated.jpg", exif=exif)
    good["rotated.jpg"] = (40, 60)  # stored as the image is shown
    for seed, name in enumerate(("with space.png", "ünïcødé 画像.png", "new\nline.png"), start=20):
        small_png(folder / name, seed=seed)
        good[name] = (48, 48)
    small_png(outside / "secret.png", 9)
    os.symlink(outside / "secret.png", folder / "link-outside.png")
    bad["link-outside.png"] = "symlink points outside the watched folder"
    small_png(folder / "locked.png", 10)
    os.chmod(folder / "locked.png", 0)
    bad["locked.png"] = "permission denied"
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    small_png(folder / "upload.png.part", 11)  # ignored: temporary name
    small_png(folder / ".hidden.png", 12)  # ignored: dot-file
    return good, bad


def test_garbage_never_kills_the_run_and_good_images_are_scored(tmp_path):
    folder, outside = tmp_path / "line1", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    good, bad = make_garbage(folder, outside)
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    # root ignores file permissions: drop the capabilities that let it, so 'locked.png' is really unreadable
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else None
    done = run_cli(["watch", str(folder), "--class-name", "metal nut", "--once"], db, tmp_path, prefix=prefix)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    rows = {os.path.basename(p): r for p, r in image_rows(db).items()}
    counts = {os.path.basename(p): n for p, n in result_counts(db).items()}
    assert set(rows) == set(good) | set(bad), "ignored names must not be registered, all others must"
    for name, (width, height) in good.items():
        assert rows[name]["status"] == "done", (name, rows[name]["error"])
        assert counts[name] == 1
        assert (rows[name]["width"], rows[name]["height"]) == (width, height), name
    for name, message in bad.items():
        assert rows[name]["status"] == "failed", name
        assert message in rows[name]["error"], (name, rows[name]["error"])
        assert counts[name] == 0
    # a second run finds nothing new and scores nothing twice
    again = run_cli(["watch", str(folder), "--class-name", "metal nut", "--once"], db, tmp_path, prefix=prefix)
    assert again.returncode == 0
    assert {os.path.basename(p): n for p, n in result_counts(db).items()} == counts


@pytest.fixture
def tiny_224():
    import warnings

    from inspector import load_model

    from .conftest import tiny_settings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(settings=tiny_settings(image_size=224, samples=1))


def test_file_deleted_or_replaced_between_discovery_and_decoding(tmp_path, tiny_224):
    folder = tmp_path / "line1"
    folder.mkdir()
    for seed, name in enumerate(("deleted.png", "replaced.png", "kept.png")):
        small_png(folder / name, seed=seed)
    engine = open_store(f"sqlite:///{tmp_path / 'inspector.sqlite'}", auto_upgrade=True)
    intake = Intake(engine, [WatchedFolder(folder.resolve(), "bottle")], stable_seconds=0, rescan_seconds=0)
    intake.scan()
    assert intake.tick() == 3
    (folder / "deleted.png").unlink()
    small_png(folder / "replaced.png", seed=99)  # new content under the same name
    from inspector.pipeline import register_model_version

    version = register_model_version(engine, tiny_224, [intake.folders[0].source_id])
    from inspector.store.routing import route_unrouted  # registered before the version was known: route it

    route_unrouted(engine)
    worker = Worker(engine, {version: tiny_224}, batch_size=8)
    while worker.step():
        pass
    rows = {os.path.basename(p): r for p, r in image_rows(str(engine.url)).items()}
    assert rows["deleted.png"]["status"] == "failed" and "disappeared" in rows["deleted.png"]["error"]
    assert rows["replaced.png"]["status"] == "failed" and "replaced" in rows["replaced.png"]["error"]
    assert rows["kept.png"]["status"] == "done"
    # the new content is found by the next scan and scored as its own image
    intake.scan()
    assert intake.tick() == 1
    while worker.step():
        pass
    replaced = [r for r in image_list(str(engine.url)) if r["path"].endswith("replaced.png")]
    assert sorted(r["status"] for r in replaced) == ["done", "failed"]
    worker.close()
    engine.dispose()


def test_worker_survives_a_bad_batch_in_process(tmp_path, tiny_224):
    """A batch mixing garbage and good images stores the good ones and keeps going."""
    folder = tmp_path / "line1"
    folder.mkdir()
    small_png(folder / "good.png", 1)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    engine = open_store(f"sqlite:///{tmp_path / 'inspector.sqlite'}", auto_upgrade=True)
    intake = Intake(engine, [WatchedFolder(folder.resolve(), "bottle")], stable_seconds=0, rescan_seconds=0)
    intake.scan()
    intake.tick()
    from inspector.pipeline import register_model_version

    version = register_model_version(engine, tiny_224, [intake.folders[0].source_id])
    from inspector.store.routing import route_unrouted

    route_unrouted(engine)
    worker = Worker(engine, {version: tiny_224})
    stop = threading.Event()
    worker.run(stop, until_empty=lambda: True)
    statuses = {os.path.basename(p): r["status"] for p, r in image_rows(str(engine.url)).items()}
    assert statuses == {"good.png": "done", "bad.png": "failed"}
    engine.dispose()
