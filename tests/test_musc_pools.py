"""MuSc beyond the closed-pool function (issue #16): the package export, batch mode in eval (each class's test
split one pool with RsCIN) and live mode in file order, rolling pools that come back after a restart, the
pool drift check, and the approximate (subsampled) nearest-patch search with its bench agreement.

test-tiny built at 70 px and run at 112 px, random weights (tests/test_musc.py): the scores mean nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import torch

from inspector.config import Settings
from inspector.detectors.musc import K_LIST_VISA, MuSc, dataset_k_list
from inspector.detectors.musc.ops import rscin

from .conftest import MUSC_SIZE as SIZE
from .conftest import musc_backbone as _backbone
from .conftest import tiny_clip as _clip

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    return _clip()


@pytest.fixture(scope="module")
def backbone(clip):
    return _backbone(clip)


def _stream(count: int, seed: int, square: bool = False) -> torch.Tensor:
    """Images of one product: a shared smooth texture and per-image noise; ``square``: the same bright
    square at the same place in every image (one systematic defect)."""
    base_gen = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.randn(1, 3, 14, 14, generator=base_gen), size=SIZE,
                                           mode="bilinear")
    gen = torch.Generator().manual_seed(seed)
    x = base + 0.5 * torch.randn(count, 3, SIZE, SIZE, generator=gen)
    if square:
        x[:, :, 28:84, 28:84] = 3.0
    return x


# ------------------------------------------------------------------------------------------------------
# export


def test_musc_is_exported_lazily():
    import inspector

    assert inspector.MuSc is MuSc and "MuSc" in inspector.__all__
    code = "import sys, inspector, inspector.cli; assert 'torch' not in sys.modules; from inspector import MuSc"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------------------------
# eval: batch mode and live mode


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from inspector.data import load_dataset
    from inspector.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path_factory.mktemp("synth"), classes=2, train_good=0, test_good=4, test_bad=5,
                          size=64)
    return [r for r in load_dataset(root) if r.split == "test"]


def _class_pixels(records, name):
    from inspector.imaging import open_image, to_model_input

    return torch.stack([to_model_input(open_image(r.image), SIZE) for r in records if r.class_name == name])


def test_eval_batch_mode_is_score_pool_with_rscin(backbone, dataset):
    from inspector.evaluation import evaluate_rows, score_dataset

    model = MuSc(backbone)
    rows = score_dataset(model, dataset, batch_size=4)
    assert [r["path"] for r in rows] == [str(r.image) for r in dataset]  # record order kept
    for name in ("synth_0", "synth_1"):
        pixels = _class_pixels(dataset, name)
        direct = model.score_pool(pixels, k_list=(1, 2, 3))
        expected = rscin(direct.map_max, direct.embeddings, (1, 2, 3))
        got = [r for r in rows if r["class_name"] == name]
        assert len(got) == 9
        assert torch.equal(torch.tensor([r["live"] for r in got], dtype=torch.float32), expected)
        for r, m in zip(got, direct.anomaly_map, strict=True):
            assert float((torch.from_numpy(r["map"]).double() - m).abs().max()) < 1e-6
    report = evaluate_rows(rows, model.eval_protocol, "official")
    assert set(report["per_class"]) == {"synth_0", "synth_1"} and 0 <= report["mean"]["image_auroc"] <= 1
    assert model.pool_count("synth_0") == 0  # batch mode pools nothing


def test_eval_k_list_as_the_official_code_picks_it(backbone):
    assert dataset_k_list(["pcb1", "candle"]) == K_LIST_VISA
    assert dataset_k_list(["pcb1", "bottle"]) == dataset_k_list(["synth_0"]) == (1, 2, 3)
    model = MuSc(backbone)
    pixels = _stream(10, 5)
    pred = model.score_closed_pool(pixels, "pcb1", ["pcb1", "pcb2"])
    direct = model.score_pool(pixels, k_list=K_LIST_VISA)
    assert pred.provenance["k_list"] == [1, 8, 9] and torch.equal(pred.image_score, direct.official_score)
    small = model.score_closed_pool(pixels[:6], "pcb1", ["pcb1"])  # k clamped to the pool
    assert small.provenance["k_list"] == [1, 6, 6]
    pinned = MuSc(backbone, eval_k_list=(1, 2))
    assert pinned.score_closed_pool(pixels, "pcb1", ["pcb1"]).provenance["k_list"] == [1, 2]


def test_eval_live_mode_in_file_order(backbone, dataset, tmp_path):
    from inspector.evaluation import score_dataset

    model = MuSc(backbone, pool_size=6, pool_dir=tmp_path / "pools")
    model.predict_tensors(_stream(2, 1), ["synth_0"] * 2)  # a line's pool: eval must neither use nor change it
    before = model.pool_hashes("synth_0")
    rows = score_dataset(model, dataset, batch_size=4, score="live")
    fresh = MuSc(backbone, pool_size=6)
    for start in range(0, len(dataset), 4):
        chunk = dataset[start:start + 4]
        from inspector.imaging import open_image, to_model_input

        pixels = torch.stack([to_model_input(open_image(r.image), SIZE) for r in chunk])
        pred = fresh.predict_tensors(pixels, [r.class_name for r in chunk])
        assert [r["live"] for r in rows[start:start + 4]] == pred.image_score.tolist()
    assert model.pool_hashes("synth_0") == before and model.pool_count("synth_1") == 0
    assert sorted(p.name for p in (tmp_path / "pools").iterdir()) == [model.files.class_dir("synth_0").name]


def test_cli_eval_batch_mode(tmp_path):
    from inspector.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "synthetic", classes=1, train_good=0, test_good=3, test_bad=3, size=64)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "INSPECTOR_MODEL__BACKBONE": "test-tiny",
           "INSPECTOR_MODEL__PRETRAINED": "random", "INSPECTOR_MODEL__IMAGE_SIZE": "112",
           "INSPECTOR_MODEL__DEVICE": "cpu", "INSPECTOR_MUSC__POOL_DIR": str(tmp_path / "pools")}
    env.pop("INSPECTOR_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "inspector.cli", "eval", "--data", "synthetic", "--detector", "musc",
                           "--json", "eval.json", "--allow-random-weights"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["detector"] == "musc" and set(report["per_class"]) == {"synth_0"}
    assert 0 <= report["mean"]["image_auroc"] <= 1 and 0 <= report["mean"]["pixel_auroc"] <= 1
    assert not (tmp_path / "pools").exists()  # eval never writes a line's pools


# ------------------------------------------------------------------------------------------------------
# restart


def test_pool_comes_back_after_a_restart(backbone, tmp_path):
    pixels = _stream(9, 2)
    old = MuSc(backbone, pool_size=5, pool_dir=tmp_path)
    first = old.predict_tensors(pixels[:3], ["metal nut"] * 3)
    old.predict_tensors(pixels[3:7], ["metal nut"] * 4)  # 7 > cap 5: the ring buffer wrapped
    pool = old._pools["metal nut"]
    assert pool.count == 5 and pool.oldest_first() != list(range(5))  # a newcomer took the oldest's slot
    folder = old.files.class_dir("metal nut")
    (folder / ".tmp-killed.pt").write_bytes(b"half a file")  # what a SIGKILL during a write leaves
    new = MuSc(backbone, pool_size=5, pool_dir=tmp_path)  # a restarted worker, same settings
    assert new.pool_hashes("metal nut") == old.pool_hashes("metal nut")
    restored = new._pools["metal nut"]
    assert restored.ages == pool.ages and restored.hashes == pool.hashes
    assert torch.equal(restored.features[:5], pool.features[:5])
    assert torch.equal(restored.embeddings[:5], pool.embeddings[:5])
    a = old.predict_tensors(pixels[7:8], ["metal nut"])
    b = new.predict_tensors(pixels[7:8], ["metal nut"])
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.image_score, b.image_score)
    assert torch.equal(first.image_score, first.image_score.clone())  # nothing rescored: scores are final
    # the next save removed the leftover and the evicted images' files; 5 feature files and the index
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{h}.pt" for h in new.pool_hashes("metal nut")]
                                                              + ["index.pt"])
    capped = MuSc(backbone, pool_size=3, pool_dir=tmp_path)  # the cap applies to a stored pool too
    assert capped.pool_hashes("metal nut") == new.pool_hashes("metal nut")[-3:]
    moved = MuSc(backbone, pool_size=5, pool_dir=tmp_path).to("cpu")  # as the CLI loads a model
    assert moved.pool_hashes("metal nut") == new.pool_hashes("metal nut")  # still read from pool_dir
    new.to("cpu")
    assert new.pool_hashes("metal nut") == moved.pool_hashes("metal nut")  # a move keeps the pools


def test_stored_pools_are_data_only(backbone, tmp_path, caplog):
    model = MuSc(backbone, pool_size=4, pool_dir=tmp_path)
    model.predict_tensors(_stream(2, 3), ["a"] * 2)
    index = model.files.class_dir("a") / "index.pt"
    torch.save({"format": 1, "class_name": "a", "payload": PurePosixPath("x")}, index)  # an object
    with caplog.at_level(logging.WARNING):
        again = MuSc(backbone, pool_size=4, pool_dir=tmp_path)
        assert again.pool_count("a") == 0
    assert "cannot read" in caplog.text


def test_pool_folder_is_keyed_by_the_version_identity(backbone, tmp_path):
    def built(**musc):
        s = Settings()
        s.override("musc", pool_dir=str(tmp_path), references="", **musc)
        return MuSc.from_settings(backbone, None, s.musc, provenance={})

    a, b, c = built(), built(), built(approx="subsample", patch_budget=16)
    assert a.files.folder == b.files.folder and a.files.folder.parent == tmp_path
    assert c.files.folder != a.files.folder and (c.approx, c.patch_budget) == ("subsample", 16)
    options = MuSc.scoring_options(Settings().musc, "fp32")
    assert {"approx", "patch_budget", "drift_window", "drift_share", "drift_quantile"} <= set(options)
    s = Settings()
    s.override("musc", pool_dir="")
    assert MuSc.from_settings(backbone, None, s.musc, provenance={}).files is None


# ------------------------------------------------------------------------------------------------------
# drift


def test_a_pool_filling_with_one_defect_is_flagged_and_not_learned(backbone, caplog):
    normals, odd = _stream(10, 11), _stream(10, 12, square=True)

    def run(window: int) -> tuple[MuSc, list]:
        model = MuSc(backbone, pool_size=40, drift_window=window, drift_share=0.5)
        for i in range(10):
            model.predict_tensors(normals[i:i + 1], ["bolt"])
        return model, [model.predict_tensors(odd[i:i + 1], ["bolt"]) for i in range(10)]

    with caplog.at_level(logging.WARNING):
        guarded, preds = run(4)
    drift = [p.provenance["pool_drift"]["bolt"] for p in preds]
    assert any(d["drifting"] for d in drift) and "POOL DRIFT" in caplog.text
    assert drift[-1]["drifting"] and drift[-1]["joined"] is False
    joined = sum(d["joined"] for d in drift)
    assert guarded.pool_count("bolt") == 10 + joined < 20  # the defects stopped joining
    unguarded, plain = run(0)
    assert unguarded.pool_count("bolt") == 20 and plain[-1].provenance["pool_drift"]["bolt"]["state"] == "off"
    # without the check the defect is learned (its score falls); with it the last defect still scores high
    late = lambda ps: sum(float(p.image_score) for p in ps[-5:]) / 5
    assert late(plain) < late(preds) - 0.01
    assert guarded.pool_count("bolt") <= 12  # flagged within two defects here


# ------------------------------------------------------------------------------------------------------
# approximate nearest-patch search


def test_subsampled_search(backbone, tmp_path):
    pixels = _stream(8, 4)
    exact = MuSc(backbone)
    fast = MuSc(backbone, approx="subsample", patch_budget=16)
    assert fast.bytes_per_pooled_image() < exact.bytes_per_pooled_image() / 3
    a, b = exact.score_pool(pixels), fast.score_pool(pixels)
    assert bool((b.anomaly_map >= a.anomaly_map - 1e-6).all())  # fewer patches: nearest distances only grow
    assert float((b.anomaly_map - a.anomaly_map).abs().max()) > 1e-4
    assert torch.equal(fast.patch_subset("ab" * 12), fast.patch_subset("ab" * 12))
    live = MuSc(backbone, approx="subsample", patch_budget=16, pool_dir=tmp_path)
    live.predict_tensors(pixels[:3], ["x"] * 3)
    assert tuple(live._pools["x"].features.shape[1:]) == (12, 16, 64)
    again = MuSc(backbone, approx="subsample", patch_budget=16, pool_dir=tmp_path)
    assert torch.equal(again.predict_tensors(pixels[3:4], ["x"]).anomaly_map,
                       live.predict_tensors(pixels[3:4], ["x"]).anomaly_map)
    with pytest.raises(ValueError, match="approx"):
        MuSc(backbone, approx="coreset")


def test_bench_reports_the_subsample_agreement(backbone):
    live = MuSc(backbone, pool_size=4, patch_budget=16)
    live.bench_pools = (8,)
    cases = dict(live.bench_plan(_stream(2, 6), ["bench"] * 2))
    assert list(cases) == ["musc", "musc N=8", "musc N=8 subsample 16"]
    pred = cases["musc N=8 subsample 16"]()
    assert pred.provenance["approx"] == "subsample" and live.approx == "none"
    report = live.bench_report()
    agreement = report["approx_agreement"]
    assert agreement["images"] == 7 and agreement["patch_budget"] == 16 and agreement["patches"] == 64
    assert -1 <= agreement["spearman_image_score"] <= 1 and agreement["max_abs_map_diff"] > 0
    assert agreement["mean_signed_image_score_diff"] >= 0
    assert report["full_size"]["msm_gflop_per_image_subsample"][200] < report["full_size"]["msm_gflop_per_image"][200]


# ------------------------------------------------------------------------------------------------------
# reviewer verdicts: rejected images leave the pool, accepted ones are preferred


def _pngs(folder: Path, count: int, seed: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(48, 48, 3))
    paths = []
    for i in range(count):
        paths.append(folder / f"part_{i}.png")
        Image.fromarray((base + rng.integers(0, 56, size=(48, 48, 3))).astype(np.uint8)).save(paths[-1])
    return paths


def test_accepted_normals_are_evicted_last_and_readmitted(backbone, tmp_path):
    from inspector.detectors.musc import content_hash

    paths = _pngs(tmp_path / "line", 7, 21)
    model = MuSc(backbone, pool_size=3, pool_dir=tmp_path / "pools")
    pixels = model.preprocess(paths)
    h = [content_hash(p) for p in pixels]
    review = lambda i: ("c", str(paths[i]), f"sha-{i}")  # (class, path, content key) as store.pool_reviews
    model.predict_tensors(pixels[:3], ["c"] * 3)
    assert model.pool_hashes("c") == h[:3]
    assert model.on_reviews([], normals=[review(0)]) == 0 and model.pool_accepted("c") == [h[0]]
    for i in (3, 4, 5):  # each newcomer replaces the oldest image no reviewer accepted, never h0
        model.predict_tensors(pixels[i:i + 1], ["c"])
    assert model.pool_hashes("c") == [h[0], h[4], h[5]]  # a plain ring buffer would hold h3, h4, h5
    # an accepted image that had left the pool is admitted again (unscored), replacing the oldest unaccepted
    model.on_reviews([], normals=[review(1)])
    assert model.pool_hashes("c") == [h[0], h[5], h[1]] and model.pool_accepted("c") == [h[0], h[1]]
    # rejected: out; a reviewer who changes their mind about an accepted image takes it out too
    assert model.on_reviews([review(5), review(0)]) == 2
    assert model.pool_hashes("c") == [h[1]] and model.pool_accepted("c") == [h[1]]
    # a restarted worker has the same pool and marks, and is sent every review again: it reads no image
    again = MuSc(backbone, pool_size=3, pool_dir=tmp_path / "pools")
    assert again.pool_hashes("c") == [h[1]] and again.pool_accepted("c") == [h[1]]

    def no_reading(images):
        raise AssertionError(f"read {images} again")

    again.preprocess = no_reading
    assert again.on_reviews([review(5), review(0)], normals=[review(1)]) == 0
    assert again.pool_hashes("c") == [h[1]]
    # a pool of accepted images only: the newest image still gets in, in place of the oldest accepted one
    full = MuSc(backbone, pool_size=2)
    assert full.on_reviews([review(3)], normals=[review(0)]) == 0 and full.pool_count("c") == 0  # no pool yet
    full.predict_tensors(pixels[3:4], ["c"])
    full.on_reviews([], normals=[review(0), review(1), review(2)])  # the newest pool_size are admitted
    assert full.pool_hashes("c") == [h[1], h[2]] and full.pool_accepted("c") == [h[1], h[2]]
    full.predict_tensors(pixels[6:7], ["c"])
    assert full.pool_hashes("c") == [h[2], h[6]] and full.pool_accepted("c") == [h[2]]


def test_accepted_normals_join_while_the_class_drifts(backbone, tmp_path):
    """A drifting class keeps its new images out of the pool, but a reviewer-accepted one is admitted."""
    from inspector.detectors.musc import content_hash

    paths = _pngs(tmp_path / "line", 2, 5)
    model = MuSc(backbone, pool_size=10, drift_window=2, drift_share=0.5)
    normals, odd = _stream(6, 31), _stream(4, 32, square=True)
    for i in range(6):
        model.predict_tensors(normals[i:i + 1], ["d"])
    preds = [model.predict_tensors(odd[i:i + 1], ["d"]) for i in range(4)]
    assert preds[-1].provenance["pool_drift"]["d"]["drifting"]
    count = model.pool_count("d")
    model.on_reviews([], normals=[("d", str(paths[0]), "k0")])
    assert model.pool_count("d") == count + 1
    assert model.pool_accepted("d") == [content_hash(model.preprocess(paths[:1])[0])]


def test_an_index_of_the_first_layout_is_read(backbone, tmp_path):
    """Pools written before join ages existed (a ring ``start``, no accepted or reviewed lists) still load."""
    model = MuSc(backbone, pool_size=3, pool_dir=tmp_path)
    model.predict_tensors(_stream(4, 41)[:3], ["e"] * 3)
    model.predict_tensors(_stream(4, 41)[3:], ["e"])  # wraps: the newest image is in slot 0
    index_path = model.files.class_dir("e") / "index.pt"
    index = torch.load(index_path, weights_only=True)
    start = index["ages"].index(min(index["ages"]))
    old = {k: v for k, v in index.items() if k not in ("ages", "accepted", "reviewed")}
    torch.save({**old, "start": start}, index_path)
    again = MuSc(backbone, pool_size=3, pool_dir=tmp_path)
    assert again.pool_hashes("e") == model.pool_hashes("e") and again.pool_accepted("e") == []
