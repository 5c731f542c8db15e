"""Dataset readers on generated fixtures of each layout and on the real battery-weld set; archive safety."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from inspector.data import DatasetError, content_hash, dataset_summary, load_dataset
from inspector.data.synthetic import make_synthetic

WELD = Path(__file__).parents[2] / "shared" / "data" / "battery_weld" / "Battery Weld Anomaly Detection Dataset.zip"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth") / "mvtec", classes=2, train_good=3, test_good=2,
                          test_bad=3, size=64)


def test_mvtec_layout(synth):
    records = load_dataset(synth)
    summary = dataset_summary(records)
    assert summary == {c: {"train/normal": 3, "test/normal": 2, "test/anomalous": 3, "masks": 3}
                       for c in ("synth_0", "synth_1")}
    for r in records:
        assert (r.mask is not None) == (r.label == 1)
        assert r.defect == ("good" if r.label == 0 else r.image.parent.name)
    assert load_dataset(synth, splits=("test",)) == [r for r in records if r.split == "test"]
    assert content_hash(records) == content_hash(list(reversed(records)))


def test_synthetic_is_deterministic(tmp_path):
    a = make_synthetic(tmp_path / "a", classes=1, size=32, seed=4)
    b = make_synthetic(tmp_path / "b", classes=1, size=32, seed=4)
    assert content_hash(load_dataset(a)) == content_hash(load_dataset(b))


def test_visa_and_meta_layouts(synth, tmp_path):
    records = load_dataset(synth)
    visa = tmp_path / "visa"
    shutil.copytree(synth, visa)
    (visa / "split_csv").mkdir()
    with open(visa / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        for r in records:
            writer.writerow([r.class_name, r.split, "anomaly" if r.label else "normal",
                             r.image.relative_to(synth).as_posix(), r.mask.relative_to(synth).as_posix() if r.mask else ""])
    got = load_dataset(visa)
    assert sorted((r.class_name, r.split, r.label, r.image.name) for r in got) == sorted(
        (r.class_name, r.split, r.label, r.image.name) for r in records)

    meta = tmp_path / "meta"
    shutil.copytree(synth, meta)
    index: dict = {"train": {}, "test": {}}
    for r in records:
        index[r.split].setdefault(r.class_name, []).append({
            "img_path": r.image.relative_to(synth).as_posix(),
            "mask_path": r.mask.relative_to(synth).as_posix() if r.mask else "",
            "cls_name": r.class_name, "specie_name": r.defect, "anomaly": r.label})
    (meta / "meta.json").write_text(json.dumps(index, indent=4))
    got = load_dataset(meta)
    assert sorted((r.class_name, r.split, r.label, r.defect, r.image.name) for r in got) == sorted(
        (r.class_name, r.split, r.label, r.defect, r.image.name) for r in records)


def test_clear_errors(synth, tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(synth, broken)
    (broken / "synth_1" / "test" / "scratch" / "000.png").unlink()
    with pytest.raises(DatasetError, match="a mask without an image"):
        load_dataset(broken)
    assert len(load_dataset(broken, orphan_masks="ignore")) == 2 * (3 + 2 + 3) - 1
    (broken / "synth_0" / "ground_truth" / "blob" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match="001.png: anomalous image without a mask"):
        load_dataset(broken, orphan_masks="ignore")
    empty = tmp_path / "empty"
    (empty / "cls" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="class 'cls'.*has no images"):
        load_dataset(empty)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="unknown layout"):
        load_dataset(tmp_path / "flat")


def test_real_battery_weld_archive(tmp_path):
    with pytest.raises(DatasetError, match="a mask without an image"):
        load_dataset(WELD, cache_dir=tmp_path)  # 40 masks of the set have no image (see its SOURCE.txt)
    records = load_dataset(WELD, cache_dir=tmp_path, orphan_masks="ignore")
    assert dataset_summary(records) == {"welding": {"train/normal": 37, "test/normal": 35, "test/anomalous": 93,
                                                    "masks": 93}}
    assert all(r.mask is not None and r.mask.is_file() for r in records if r.label == 1)
    assert len(list(tmp_path.iterdir())) == 1  # extracted once, reused
    load_dataset(WELD, cache_dir=tmp_path, orphan_masks="ignore")
    assert len(list(tmp_path.iterdir())) == 1


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as handle:
        handle.addfile(member, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize("kind", ["zip-dotdot", "tar-absolute", "tar-symlink", "tar-hardlink", "tar-dotdot"])
def test_unsafe_archives_are_refused(tmp_path, kind):
    archive = tmp_path / ("evil.zip" if kind.startswith("zip") else "evil.tar.gz")
    if kind == "zip-dotdot":
        with zipfile.ZipFile(archive, "w") as handle:
            handle.writestr("data/cls/train/good/a.png", b"x")
            handle.writestr("../evil.png", b"x")
    elif kind == "tar-absolute":
        info = tarfile.TarInfo("/tmp/evil.png")
        info.size = 1
        _tar_with(archive, info, b"x")
    elif kind == "tar-dotdot":
        info = tarfile.TarInfo("data/../../evil.png")
        info.size = 1
        _tar_with(archive, info, b"x")
    elif kind == "tar-symlink":
        info = tarfile.TarInfo("data/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc"
        _tar_with(archive, info)
    else:
        info = tarfile.TarInfo("data/hard")
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        _tar_with(archive, info)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="refusing|escapes"):
        load_dataset(archive, cache_dir=cache)
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()
    assert not cache.exists() or not any(p for p in cache.iterdir() if not p.name.startswith("."))
