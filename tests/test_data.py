"""Dataset readers on generated fixtures of each layout and on the real battery-weld set; archive safety."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from inspector.data import DatasetError, content_hash, dataset_summary, load_dataset
from inspector.data.synthetic import make_synthetic

# the real battery-weld set, shipped with the tests (1.7 MB; LICENSE and SOURCE.txt next to it)
WELD = Path(__file__).parent / "data" / "battery_weld" / "Battery Weld Anomaly Detection Dataset.zip"


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


# --- synthetic data -------------------------------------------------------------------------------------


def test_synthetic_layout_and_exact_masks(tmp_path):
    import numpy as np
    from PIL import Image

    root = make_synthetic(tmp_path / "s", classes=4, train_good=2, test_good=1, test_bad=4, size=48, seed=1)
    records = load_dataset(root)
    assert sorted({r.class_name for r in records}) == ["synth_0", "synth_1", "synth_2", "synth_3"]
    assert {r.defect for r in records if r.label} == {"scratch", "blob", "hole", "spot"}
    for r in records:
        with Image.open(r.image) as image:
            assert image.size == (48, 48) and image.mode == "RGB"
        if r.mask is not None:
            assert r.mask.name == f"{r.image.stem}_mask.png"
            mask = np.array(Image.open(r.mask))
            assert mask.shape == (48, 48) and set(np.unique(mask)) == {0, 255}
    other = make_synthetic(tmp_path / "t", classes=4, train_good=2, test_good=1, test_bad=4, size=48, seed=2)
    assert content_hash(load_dataset(other)) != content_hash(records)


def test_synthetic_defect_changes_exactly_the_mask():
    import numpy as np

    from inspector.data.synthetic import DEFECTS, class_style, render_defective

    for index in range(3):
        for defect in DEFECTS:
            clean, defective, mask = render_defective(class_style(index, 0), np.random.default_rng(index), 40, defect)
            changed = (clean != defective).any(axis=-1)
            assert changed.any() and np.array_equal(changed, mask == 255)


# --- MVTec reader details --------------------------------------------------------------------------------


def test_mvtec_same_name_masks_hidden_files_and_require_masks(synth, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth, root)
    for mask in (root / "synth_0" / "ground_truth").rglob("*_mask.png"):
        mask.rename(mask.with_name(mask.name.replace("_mask", "")))  # battery-weld style: <stem>.png
    (root / "synth_0" / "test" / "scratch" / ".DS_Store").write_bytes(b"x")
    (root / "synth_0" / "test" / "scratch" / "._000.png").write_bytes(b"x")
    (root / "__MACOSX").mkdir()
    (root / "README.txt").write_text("not a class")
    records = load_dataset(root)
    assert len(records) == 2 * (3 + 2 + 3)
    assert all(r.mask.name == r.image.name for r in records if r.label and r.class_name == "synth_0")
    assert all(r.mask is None for r in records if r.label == 0)

    (root / "synth_1" / "ground_truth" / "hole" / "002_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"synth_1/test/hole/002\.png: anomalous image without a mask"):
        load_dataset(root)
    relaxed = load_dataset(root, require_masks=False)
    (missing,) = [r for r in relaxed if r.mask is None and r.label == 1]
    assert missing.image.name == "002.png" and missing.defect == "hole"


def test_mvtec_empty_class_folder_and_orphan_message(synth, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth, root)
    (root / "bare").mkdir()
    with pytest.raises(DatasetError, match="class 'bare'.*has no images"):
        load_dataset(root)
    (root / "bare").rmdir()
    orphan = root / "synth_0" / "ground_truth" / "blob" / "777_mask.png"
    shutil.copy(root / "synth_0" / "ground_truth" / "blob" / "001_mask.png", orphan)
    with pytest.raises(DatasetError, match="777_mask.png: a mask without an image") as info:
        load_dataset(root)
    assert "orphan_masks='ignore'" in str(info.value)
    assert len(load_dataset(root, orphan_masks="ignore")) == 2 * (3 + 2 + 3)


# --- VisA and meta.json details --------------------------------------------------------------------------


def _visa(synth: Path, root: Path, rows: list[list[str]]) -> Path:
    shutil.copytree(synth, root)
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["object", "split", "label", "image", "mask"], *rows])
    return root


def test_visa_errors(synth, tmp_path):
    good, bad = "synth_0/train/good/000.png", "synth_0/test/blob/001.png"
    mask = "synth_0/ground_truth/blob/001_mask.png"
    records = load_dataset(_visa(synth, tmp_path / "ok", [["synth_0", "train", "normal", good, ""],
                                                          ["synth_0", "test", "anomaly", bad, mask]]))
    assert [(r.label, r.defect, r.mask is not None) for r in records] == [(0, "good", False), (1, "anomaly", True)]
    no_mask = _visa(synth, tmp_path / "no_mask", [["synth_0", "test", "anomaly", bad, ""]])
    with pytest.raises(DatasetError, match=r"blob/001\.png: anomalous image without a mask"):
        load_dataset(no_mask)
    assert load_dataset(no_mask, require_masks=False)[0].mask is None
    orphan = _visa(synth, tmp_path / "orphan", [["synth_0", "test", "anomaly", "synth_0/test/blob/999.png", mask]])
    with pytest.raises(DatasetError, match=r"001_mask\.png: a mask without an image"):
        load_dataset(orphan)
    label = _visa(synth, tmp_path / "label", [["synth_0", "test", "broken", bad, mask]])
    with pytest.raises(DatasetError, match="label must be 'normal' or 'anomaly'"):
        load_dataset(label)
    header = tmp_path / "header"
    header.mkdir()
    (header / "split_csv").mkdir()
    (header / "split_csv" / "1cls.csv").write_text("object,split,image\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) label, mask"):
        load_dataset(header)


def _entry(path: str, mask: str, label: int, defect: str, cls: str = "synth_0") -> dict:
    return {"img_path": path, "mask_path": mask, "cls_name": cls, "specie_name": defect, "anomaly": label}


def test_meta_variants_and_errors(synth, tmp_path):
    good, bad = "synth_0/train/good/000.png", "synth_0/test/blob/001.png"
    mask = "synth_0/ground_truth/blob/001_mask.png"
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    index = root / "meta_synth.json"  # the Bayes-PFL naming, with dataset_name
    entries = {"train": {}, "test": {"synth_0": [dict(_entry(good, "", 0, "good"), dataset_name="synth"),
                                                 dict(_entry(bad, mask, 1, "blob"), dataset_name="synth")]}}
    index.write_text(json.dumps(entries))
    records = load_dataset(root)
    assert [(r.split, r.label, r.defect, r.mask) for r in records] == [("test", 1, "blob", root / mask),
                                                                        ("test", 0, "good", None)]
    assert load_dataset(index) == records  # the index file itself is accepted too

    (root / "meta_other.json").write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match="several indexes"):
        load_dataset(root)
    (root / "meta_other.json").unlink()

    def fails(data: dict, pattern: str) -> None:
        index.write_text(json.dumps(data))
        with pytest.raises(DatasetError, match=pattern):
            load_dataset(root)

    fails({"test": {"synth_0": [_entry(bad, "", 1, "blob")]}}, r"001\.png: anomalous image without a mask")
    fails({"test": {"synth_0": [_entry(good, "", 0, "good")], "synth_9": []}}, "class 'synth_9' has no images")
    fails({"test": {"synth_0": [_entry("synth_0/test/blob/404.png", mask, 1, "blob")]}},
          r"001_mask\.png: a mask without an image")
    fails({"test": {"synth_0": [_entry(good, "", 2, "good")]}}, "'anomaly' must be 0 or 1")
    fails({"val": {}}, "unknown split 'val'")
    fails({"test": {"synth_0": [_entry(good, "", 0, "good"), _entry(good, "", 0, "good")]}}, "listed twice")
    index.write_text("{not json")
    with pytest.raises(DatasetError, match="not a readable JSON"):
        load_dataset(root)


# --- load_dataset arguments, summaries and hashes ------------------------------------------------------------


def test_arguments_summary_and_hash(synth, tmp_path):
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset(synth, splits=("validation",))
    with pytest.raises(DatasetError, match="orphan_masks must be"):
        load_dataset(synth, orphan_masks="maybe")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="expected a folder, a meta.json or an archive"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match="unknown layout. Supported: meta.json.*VisA.*MVTec AD"):
        load_dataset(tmp_path)

    records = load_dataset(synth)
    assert records == sorted(records, key=lambda r: (r.class_name, r.split != "train", r.defect, str(r.image)))
    summary = dataset_summary(records)
    assert list(summary) == ["synth_0", "synth_1"] and json.loads(json.dumps(summary)) == summary

    moved = tmp_path / "moved"
    shutil.copytree(synth, moved)
    assert content_hash(load_dataset(moved)) == content_hash(records)  # location does not matter
    image = moved / "synth_0" / "train" / "good" / "000.png"
    image.write_bytes(image.read_bytes() + b"\0")
    assert content_hash(load_dataset(moved)) != content_hash(records)  # one byte does
    relabelled = [r if r.label else dataclasses.replace(r, label=1) for r in records]
    assert content_hash(relabelled) != content_hash(records)  # and so do labels


# --- archives ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz"])
def test_archives_nested_root_cached_and_atomic(synth, tmp_path, suffix):
    archive = tmp_path / f"data{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as handle:
            for file in sorted(synth.rglob("*")):
                handle.write(file, Path("outer", "inner", file.relative_to(synth)).as_posix())
    else:
        mode = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz", ".tar.xz": "w:xz"}[suffix]
        with tarfile.open(archive, mode) as handle:
            handle.add(synth, arcname="outer/inner")
    cache = tmp_path / "cache"
    records = load_dataset(archive, cache_dir=cache)
    assert content_hash(records) == content_hash(load_dataset(synth))
    (entry,) = list(cache.iterdir())  # one finished folder, no temporary left behind
    assert len(entry.name) == 16 and all(entry in r.image.parents for r in records)
    assert records[0].image.parents[3].name == "inner"  # descended through the single-folder wrappers
    stamp = entry.stat().st_mtime_ns
    assert load_dataset(archive, cache_dir=cache) == records and entry.stat().st_mtime_ns == stamp


def test_archive_refusals_zip_symlink_absolute_and_devices(tmp_path):
    cases = {}
    link = zipfile.ZipInfo("data/link")
    link.external_attr = (0o120777 << 16)
    cases["symlink.zip"] = [(link, "/etc/passwd")]
    cases["absolute.zip"] = [(zipfile.ZipInfo("/abs/evil.png"), "x")]
    cases["drive.zip"] = [(zipfile.ZipInfo("C:/evil.png"), "x")]
    for name, members in cases.items():
        with zipfile.ZipFile(tmp_path / name, "w") as handle:
            handle.writestr("data/cls/train/good/a.png", b"x")
            for info, data in members:
                handle.writestr(info, data)
    for kind, tar_type in (("chr", tarfile.CHRTYPE), ("fifo", tarfile.FIFOTYPE)):
        info = tarfile.TarInfo(f"data/{kind}")
        info.type = tar_type
        _tar_with(tmp_path / f"{kind}.tar.gz", info)
        cases[f"{kind}.tar.gz"] = []
    for name in cases:
        cache = tmp_path / f"cache-{name}"
        with pytest.raises(DatasetError, match="refusing"):
            load_dataset(tmp_path / name, cache_dir=cache)
        assert not any(cache.iterdir())  # nothing kept, not even a partial extraction
    assert not Path("/abs/evil.png").exists()
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DatasetError, match="cannot extract"):
        load_dataset(damaged, cache_dir=tmp_path / "cache-damaged")


# --- the real battery-weld set -------------------------------------------------------------------------------


def test_battery_weld_orphans_named_and_pairs_by_name(tmp_path):
    with pytest.raises(DatasetError, match=r"welding/ground_truth/defective/.*\.png: a mask without an image "
                                           r"\(and 39 more\)"):
        load_dataset(WELD, cache_dir=tmp_path)
    records = load_dataset(WELD, cache_dir=tmp_path, orphan_masks="ignore", splits=("test",))
    defective = [r for r in records if r.label == 1]
    assert len(defective) == 93 and {r.defect for r in defective} == {"defective"}
    assert all(r.mask.name == r.image.name and r.mask.parent.name == "defective" for r in defective)
    assert {r.split for r in records} == {"test"} and len(records) == 35 + 93
