"""Every detector behind one interface: the same watcher, store, eval, bench and registry serve each one,
and a fresh install without a trained head scores with WinCLIP (day one) and says so."""

from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from inspector.config import Settings
from inspector.detectors import KINDS, UnknownDetector, detector_class
from inspector.detectors.base import EvalProtocol, Prediction

from .conftest import tiny_detector_settings
from .pipeline_helpers import FAST_ENV, run, run_cli, write_images

pytestmark = pytest.mark.usefixtures("one_thread")

def tiny(detector: str, **model: object) -> Settings:
    return tiny_detector_settings(detector, **model)


#: the model part of FAST_ENV (tiny random backbone, one sample), for CLI runs of this module
MODEL_ENV = {k: v for k, v in FAST_ENV.items() if k.startswith(("INSPECTOR_MODEL__", "INSPECTOR_BAYES_PFL__", "INSPECTOR_MUSC__"))
             and k != "INSPECTOR_MODEL__FALLBACK"}


def load(settings: Settings, pipeline: bool = False):
    from inspector.pipeline import load_detector
    from inspector.registry import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_detector(settings) if pipeline else load_model(settings=settings)


@pytest.mark.parametrize("name", list(KINDS))
def test_each_detector_implements_the_interface(name, images):
    cls = detector_class(name)
    assert cls.name == name and isinstance(cls.trainable, bool)
    assert cls.default_backbone.image_size in (240, 518)
    model = load(tiny(name))
    assert model.name == name and model.image_size == 224 and model.device.type == "cpu"
    assert isinstance(model.eval_protocol, EvalProtocol)
    from inspector.imaging import preprocess

    pixels = preprocess(images[:2], model.image_size)
    pred = model.predict_tensors(pixels, ["bottle", "object"])
    assert isinstance(pred, Prediction) and len(pred) == 2
    assert pred.anomaly_map.shape == pred.probability_map.shape == (2, 224, 224)
    assert 0 <= float(pred.probability_map.min()) and float(pred.probability_map.max()) <= 1
    for field in (pred.image_score, pred.text_score, pred.topk_score):
        assert field.shape == (2,) and torch.isfinite(field).all()
    assert 0 <= float(pred.image_score.min()) and float(pred.image_score.max()) <= 1
    assert model.encode_floor(pixels).shape[0] == 2


def test_unknown_detector_is_a_clear_error(tmp_path):
    with pytest.raises(UnknownDetector, match="known: bayes-pfl, aa-clip, winclip"):
        detector_class("patchcore")
    result = run("watch", str(tmp_path), "-n", "x", "--detector", "patchcore", cwd=tmp_path)
    assert result.returncode == 2 and "unknown detector 'patchcore'" in result.stderr
    assert "Traceback" not in result.stderr


def test_aa_clip_official_fusion_is_min_max_over_all_pixels_of_the_class():
    """spec §7: maps min-maxed with the min and max over all pixels of all images of the class."""
    rows = [{"text": t, "topk": 0.0, "live": 0.0, "map_max": hi, "map_min": lo}
            for t, hi, lo in ((0.2, 3.0, 1.0), (0.6, 5.0, 2.0), (0.4, 4.0, 0.5))]
    peak = (np.array([3.0, 5.0, 4.0]) - 0.5) / (5.0 - 0.5)
    text = (np.array([0.2, 0.6, 0.4]) - 0.2) / 0.4
    from inspector.detectors.aa_clip.model import fuse_max, fuse_text_max

    industrial = fuse_text_max(rows)
    np.testing.assert_allclose(industrial, 0.5 * peak + 0.5 * text, atol=1e-6)
    np.testing.assert_allclose(fuse_max(rows), peak, atol=1e-6)
    one = [dict(r, map_max=min(r["map_max"], 1.0)) for r in rows]  # the official literal `max != 1` test
    np.testing.assert_allclose(fuse_max(one), [1.0, 1.0, 1.0])


def test_day_one_falls_back_to_winclip_and_says_so(caplog):
    settings = tiny("bayes-pfl")
    with caplog.at_level("WARNING", logger="inspector"):
        model = load(settings, pipeline=True)
    assert model.name == "winclip"
    assert "bayes-pfl has no trained head" in model.provenance["fallback"]
    assert model.provenance["configured_detector"] == "bayes-pfl"
    assert any("DAY ONE" in r.getMessage() for r in caplog.records)
    assert settings.model.detector == "bayes-pfl"  # the settings object is left as the user gave it
    refused = tiny("bayes-pfl", fallback="none", allow_random_weights=False, pretrained="test.pt")
    from inspector.pipeline import RandomWeightsRefused

    with pytest.raises(RandomWeightsRefused, match='fallback = "none"'):
        load(refused, pipeline=True)
    untrained = load(tiny("bayes-pfl", fallback="none"), pipeline=True)  # the old behaviour, on request
    assert untrained.name == "bayes-pfl" and "fallback" not in untrained.provenance


def test_day_one_watch_status_and_dashboard(tmp_path, monkeypatch):
    """A fresh install's watcher scores with WinCLIP; status and the dashboard's overview say why."""
    write_images(tmp_path / "line1", 3)
    db = f"sqlite:///{tmp_path}/day1.sqlite"
    env = {"INSPECTOR_DATABASE__URL": db, **MODEL_ENV}
    result = run("watch", "line1", "-n", "bottle", "--once", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DAY ONE" in result.stderr and "winclip" in result.stderr
    with sqlite3.connect(tmp_path / "day1.sqlite") as conn:
        detectors = conn.execute("select distinct m.detector from results r join model_versions m "
                                 "on m.id = r.model_version_id").fetchall()
        scored = conn.execute("select count(*) from results").fetchone()[0]
    assert detectors == [("winclip",)] and scored == 3
    status = run("status", "--json", cwd=tmp_path, env={"INSPECTOR_DATABASE__URL": db})
    data = json.loads(status.stdout)
    assert "bayes-pfl has no trained head" in data["active_model_fallback"]
    from inspector.store import review
    from inspector.store.db import open_store

    engine = open_store(db)
    try:
        info = review.overview(engine)
    finally:
        engine.dispose()
    assert info["active_detector"] == "winclip" and "scoring with winclip" in info["fallback"]
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("INSPECTOR_DATABASE__URL", db)
    monkeypatch.delenv("INSPECTOR_DASHBOARD__PASSWORD", raising=False)
    monkeypatch.delenv("INSPECTOR_CONFIG", raising=False)
    app = AppTest.from_file(str(Path(__file__).parents[1] / "dashboard" / "app.py"), default_timeout=60)
    app.run()
    assert not app.exception, app.exception
    app.switch_page("overview_page.py").run()
    assert not app.exception, app.exception
    assert any("Day one" in w.value and "winclip" in w.value for w in app.warning)


@pytest.mark.parametrize("name", ["aa-clip", "winclip", "musc"])
def test_watch_once_with_each_detector(name, tmp_path):
    write_images(tmp_path / "line", 3)
    db = f"sqlite:///{tmp_path}/w.sqlite"
    result = run_cli(["watch", str(tmp_path / "line"), "-n", "bottle", "--once", "--detector", name], db, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with sqlite3.connect(tmp_path / "w.sqlite") as conn:
        rows = conn.execute("select m.detector, r.image_score, r.anomaly_map from results r join model_versions m "
                            "on m.id = r.model_version_id").fetchall()
    assert len(rows) == 3 and {r[0] for r in rows} == {name}
    from inspector.store.maps import decode_map

    for _, score, png in rows:
        assert 0 <= score <= 1 and decode_map(png).shape == (224, 224)


def test_registry_round_trip_for_each_kind(tmp_path, images):
    """A version's manifest names its detector and backbone; the loaded version predicts the same."""
    from inspector.imaging import preprocess
    from inspector.registry import load_model, read_manifest, register_model

    for name in ("aa-clip", "winclip", "musc"):
        model = load(tiny(name))
        if name == "aa-clip":
            with torch.no_grad():
                for p in model.image_adapter.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
        folder = register_model(tmp_path, f"{name}-v1", model, {"kind": "test"})
        manifest = read_manifest(folder)
        assert manifest["detector"] == name and manifest["backbone"]["arch"] == "test-tiny"
        assert (manifest["head"] is None) == (name in ("winclip", "musc"))
        settings = tiny(name)
        settings.registry.path = str(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = load_model(f"{name}-v1", settings=settings)
        pixels = preprocess(images[:1], 224)
        a, b = model.predict_tensors(pixels, ["bottle"]), again.predict_tensors(pixels, ["bottle"])
        torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
        torch.testing.assert_close(a.image_score, b.image_score)


def test_eval_and_bench_with_each_detector(tmp_path):
    made = run("demo-data", "synthetic", "--classes", "1", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    # an untrained AA-CLIP on purpose: without a head the day-one fallback would score with WinCLIP
    env = {**MODEL_ENV, "INSPECTOR_MODEL__FALLBACK": "none"}
    for name in ("aa-clip", "winclip"):
        report_file = tmp_path / f"eval-{name}.json"
        evaluated = run("eval", "--data", "synthetic", "--detector", name, "--json", str(report_file),
                        "--allow-random-weights", cwd=tmp_path, env=env)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        report = json.loads(report_file.read_text())
        assert report["detector"] == name and 0 <= report["mean"]["pixel_auroc"] <= 1
        assert 0 <= report["mean"]["image_auroc"] <= 1
    bench = run("bench", "--backbone", "test-tiny", "--batch-sizes", "1", "--repeats", "1", "-R", "2",
                "--references", "2", "--output", "bench.json", cwd=tmp_path, env={"INSPECTOR_MODEL__DEVICE": "cpu"},
                timeout=900)
    assert bench.returncode == 0, bench.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    cases = {(r["detector"], r["case"]) for r in report["side_by_side"]}
    assert {("bayes-pfl", "exact R=2"), ("aa-clip", "aa-clip"), ("winclip", "winclip"),
            ("winclip", "winclip k=2")} <= cases
    for row in report["side_by_side"]:
        assert row["ratio_to_floor"] > 0 and row["image_size"] == 224
    assert "side by side" in bench.stdout


def test_references_cli_turns_winclip_few_shot(tmp_path):
    """`inspector references add` changes the scores of later images of that class (few-shot WinCLIP+)."""
    paths = write_images(tmp_path / "imgs", 3)
    env = {**MODEL_ENV, "INSPECTOR_MODEL__DETECTOR": "winclip"}

    def scores(db: str) -> dict[str, float]:
        result = run("score", str(paths[0]), str(paths[1]), "-n", "bottle", "--json", "--database", db,
                     cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return {Path(r["path"]).name: r["image_score"] for r in map(json.loads, result.stdout.splitlines())}

    before = scores(f"sqlite:///{tmp_path}/a.sqlite")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    refused = run("references", "add", "-n", "bottle", str(paths[2]), str(bad), cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "bad.png" in refused.stderr and "Traceback" not in refused.stderr
    assert not list((tmp_path / "references").rglob("*.png"))  # nothing half-added
    added = run("references", "add", "-n", "bottle", str(paths[0]), cwd=tmp_path, env=env)
    assert added.returncode == 0, added.stderr
    listed = run("references", "list", "--json", cwd=tmp_path, env=env)
    assert json.loads(listed.stdout) == {"bottle": 1}
    after = scores(f"sqlite:///{tmp_path}/b.sqlite")
    assert after != before
    # the reference itself now looks normal: its few-shot term is 0, so its score drops
    assert after["img 0.png"] < before["img 0.png"]


def test_retrain_aa_clip_registers_a_version_that_scores(tmp_path):
    """`retrain --detector aa-clip` runs both official stages and registers a version eval and watch use."""
    made = run("demo-data", "synthetic", "--classes", "2", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    env = MODEL_ENV
    trained = run("retrain", "--aux", "synthetic", "--detector", "aa-clip", "--text-epochs", "1", "--epochs", "1",
                  "--name", "aa-v1", "--allow-random-weights", cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    manifest = json.loads((tmp_path / "models" / "aa-v1" / "manifest.json").read_text())
    assert manifest["detector"] == "aa-clip" and manifest["head"]["format"] == "inspector-aa-clip"
    assert [h["stage"] for h in manifest["origin"]["history"]] == [1, 2]
    run_dir = tmp_path / "models" / ".runs" / "aa-v1"
    assert {"text_adapter.pth", "image_adapter_1.pth"} <= {p.name for p in run_dir.iterdir()}
    evaluated = run("eval", "--data", "synthetic", "--model", "aa-v1", "--json", "eval.json",
                    "--allow-random-weights", cwd=tmp_path, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["detector"] == "aa-clip"
    refused = run("retrain", "--aux", "synthetic", "--detector", "winclip", "--allow-random-weights",
                  cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "training-free" in refused.stderr and "Traceback" not in refused.stderr
