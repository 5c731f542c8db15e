"""Exported runtimes (#17): `inspector export` graphs scored by onnxruntime and OpenVINO agree with torch.

Every detector on the tiny random backbone (test-tiny at 224 px), heads moved off their initialisation so the
maps are not flat; the torch model and the exported one score the same pixels from the same state.
"""

from __future__ import annotations

import copy
import json
import shutil
import sqlite3
import warnings

import pytest
import torch
from typer.testing import CliRunner

from inspector.bench import synthetic_images
from inspector.export import export_detector
from inspector.exported import ExportedGraphs, ExportError, attach, graph_identity
from inspector.registry import register_model
from inspector.versions import load_model, recipe_from_settings

from .conftest import randomize_head, tiny_detector_settings
from .pipeline_helpers import FAST_ENV, write_images

pytestmark = pytest.mark.usefixtures("one_thread")
DETECTORS = ("bayes-pfl", "aa-clip", "winclip", "musc")
#: runtime -> the export format it is tested on (OpenVINO on its own IR, onnxruntime on ONNX)
RUNTIMES = {"onnxruntime": "onnx", "openvino": "openvino"}
NAMES = ["bottle", "bottle", "screw", "screw"]


def _moved(model):
    """Learnable parts away from their initialisation (Bayes-PFL's head, AA-CLIP's adapters)."""
    if model.name == "bayes-pfl":
        randomize_head(model.head)
    elif model.name == "aa-clip":
        randomize_head(model.image_adapter, scale=0.5)
    model.clear_caches()
    return model


def _load(settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(settings=settings)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """detector -> (torch model, settings, recipe, {format: export folder})."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name in DETECTORS:
        settings = tiny_detector_settings(name, samples=2)
        model = _moved(_load(settings))
        recipe = recipe_from_settings(settings)
        version = {"name": recipe.name, "digest": recipe.digest, "identity": recipe.identity}
        folders = {fmt: export_detector(model, root / f"{name}-{fmt}", fmt, version=version)
                   for fmt in ("onnx", "openvino")}
        out[name] = (model, settings, recipe, folders)
    return out


def _pixels(model):
    return torch.stack([model.to_input(im) for im in synthetic_images(4, size=160, seed=11)])


def _score(model, pixels):
    if model.name == "winclip":  # few-shot too: the references go through the graphs as well
        model.set_references("bottle", torch.roll(pixels[:2], 5, dims=-1))
    with model.isolated():
        return model.predict_tensors(pixels, NAMES).cpu()


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
@pytest.mark.parametrize("name", DETECTORS)
def test_exported_graphs_score_like_torch_fp32(exports, name, runtime, monkeypatch):
    model, _settings, recipe, folders = exports[name]
    pixels = _pixels(model)
    reference = _score(copy.deepcopy(model), pixels)
    exported = attach(copy.deepcopy(model), folders[RUNTIMES[runtime]], runtime, recipe.identity)
    calls: dict[str, int] = {}
    run = ExportedGraphs.run

    def counted(self, graph, *inputs):
        calls[graph] = calls.get(graph, 0) + 1
        return run(self, graph, *inputs)

    monkeypatch.setattr(ExportedGraphs, "run", counted)
    got = _score(exported, pixels)
    assert set(calls) == set(model.scoring_graphs())  # every encoder call went through the exported session
    assert exported.provenance["runtime"] == runtime and "runtime" not in reference.provenance
    assert reference.anomaly_map.std() > 0 and reference.image_score.std() > 0  # not a flat comparison
    assert (reference.anomaly_map - got.anomaly_map).abs().max() <= 1e-4
    assert (reference.probability_map - got.probability_map).abs().max() <= 1e-4
    for field in ("image_score", "text_score", "topk_score"):
        assert (getattr(reference, field) - getattr(got, field)).abs().max() <= 1e-5, field


def test_bench_backbone_case_times_the_exported_vision_graph(exports, monkeypatch):
    """The bench's `backbone (R)` row runs the exported session even though the bench times with autograd on
    (an exported graph serves only calls without gradients: without inference mode it would time torch)."""
    from inspector.bench import vision_graph

    model, _settings, recipe, folders = exports["bayes-pfl"]
    exported = attach(copy.deepcopy(model), folders["onnx"], "onnxruntime", recipe.identity)
    calls = []
    run = ExportedGraphs.run
    monkeypatch.setattr(ExportedGraphs, "run", lambda self, graph, *inputs: calls.append(graph) or run(self, graph, *inputs))
    assert torch.is_grad_enabled()
    vision_graph(exported, _pixels(model)[:1])
    assert calls == ["vision"]


def test_bayes_pfl_noise_is_an_input_not_baked_in(exports):
    """Other R and other draws than at export time: the same numbers as torch (the noise enters the text graph
    through its prompts), and different draws give different scores."""
    model, _settings, recipe, folders = exports["bayes-pfl"]
    pixels = _pixels(model)[:2]
    exported = attach(copy.deepcopy(model), folders["onnx"], "onnxruntime", recipe.identity)
    width = model.config.text_width
    outs = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        noise = {"isd": torch.randn(2, 5, width, generator=gen), "iad_normal": torch.randn(5, width, generator=gen),
                 "iad_abnormal": torch.randn(5, width, generator=gen)}
        ref = model.predict_tensors(pixels, ["bottle"] * 2, samples=5, noise=noise)
        got = exported.predict_tensors(pixels, ["bottle"] * 2, samples=5, noise=noise)
        assert (ref.anomaly_map - got.anomaly_map).abs().max() <= 1e-4
        assert (ref.image_score - got.image_score).abs().max() <= 1e-5
        outs.append(got.image_score)
    assert (outs[0] - outs[1]).abs().max() > 1e-6


def test_manifest_says_what_the_graphs_are(exports):
    _model, _settings, recipe, folders = exports["bayes-pfl"]
    manifest = json.loads((folders["onnx"] / "export.json").read_text())
    assert manifest["model"]["name"] == recipe.name and manifest["model"]["digest"] == recipe.digest
    assert manifest["model"]["identity"] == graph_identity(recipe.identity)
    assert manifest["input_size"] == 224 and manifest["opset"] == 17 and manifest["precision"] == "fp32"
    assert manifest["normalisation"]["mean"][0] == pytest.approx(0.48145466)
    assert manifest["graphs"]["vision"]["outputs"] == ["g", "tap_6", "tap_12", "tap_18", "tap_24"]
    assert manifest["graphs"]["text"]["outputs"] == ["text"]
    assert set(manifest["graphs"]["vision"]["files"]) == {"vision.onnx"}
    ov = json.loads((folders["openvino"] / "export.json").read_text())
    assert set(ov["graphs"]["text"]["files"]) == {"text.xml", "text.bin"}
    assert max(v for g in ("vision", "text") for v in manifest["check"][g].values()) < 1e-4


def test_mismatched_or_tampered_exports_are_refused(exports, tmp_path, monkeypatch):
    model, _settings, recipe, folders = exports["bayes-pfl"]
    other_model, _s, other_recipe, other_folders = exports["aa-clip"]
    with pytest.raises(ExportError, match="exported from a bayes-pfl model, not aa-clip"):
        attach(copy.deepcopy(other_model), folders["onnx"], "onnxruntime", other_recipe.identity)
    # another version of the same detector (another R): refused, naming what differs
    changed = tiny_detector_settings("bayes-pfl", samples=3)
    with pytest.raises(ExportError, match=r"options\.samples \(2 in the export, 3 here\)"):
        attach(copy.deepcopy(model), folders["onnx"], "onnxruntime", recipe_from_settings(changed).identity)
    # an IR export is not for onnxruntime
    with pytest.raises(ExportError, match="openvino export, which .* \"onnxruntime\" cannot read"):
        attach(copy.deepcopy(model), folders["openvino"], "onnxruntime", recipe.identity)
    # an edited graph file
    tampered = tmp_path / "tampered"
    shutil.copytree(folders["onnx"], tampered)
    data = bytearray((tampered / "vision.onnx").read_bytes())
    data[-100] ^= 0xFF
    (tampered / "vision.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="vision.onnx changed since it was exported"):
        attach(copy.deepcopy(model), tampered, "onnxruntime", recipe.identity)
    # a missing file, an edited manifest (unknown version of the format), a folder that is no export
    shutil.copytree(folders["openvino"], tmp_path / "partial")
    (tmp_path / "partial" / "text.bin").unlink()
    with pytest.raises(ExportError, match="graph file text.bin is missing"):
        attach(copy.deepcopy(model), tmp_path / "partial", "openvino", recipe.identity)
    shutil.copytree(folders["onnx"], tmp_path / "future")
    manifest = json.loads((tmp_path / "future" / "export.json").read_text())
    (tmp_path / "future" / "export.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ExportError, match="format version 99"):
        attach(copy.deepcopy(model), tmp_path / "future", "onnxruntime", recipe.identity)
    manifest["graphs"]["vision"]["file"] = "elsewhere.onnx"  # a graph file outside the hashed ones
    (tmp_path / "future" / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="names a file .elsewhere.onnx. it has no SHA-256 for"):
        attach(copy.deepcopy(model), tmp_path / "future", "onnxruntime", recipe.identity)
    with pytest.raises(ExportError, match="no export for this model version"):
        attach(copy.deepcopy(model), tmp_path / "nothing-here", "onnxruntime", recipe.identity)
    # a folder of exports: the one written for this version is found
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    shutil.copytree(other_folders["onnx"], shelf / "a")
    shutil.copytree(folders["onnx"], shelf / "b")
    found = attach(copy.deepcopy(model), shelf, "onnxruntime", recipe.identity)
    assert found.exported.folder == shelf / "b"
    # never written over another export
    with pytest.raises(ExportError, match="never written over another"):
        export_detector(model, folders["onnx"], "onnx")
    # a runtime that is not installed: the pip line that installs it
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    with pytest.raises(ExportError, match=r"onnxruntime is not installed: pip install 'inspector\[onnx\]'"):
        attach(copy.deepcopy(model), folders["onnx"], "onnxruntime", recipe.identity)


def test_runtime_settings_are_checked():
    from inspector.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="'tensorrt' is not one of torch, onnxruntime, openvino"):
        load_settings(environ={"INSPECTOR_MODEL__RUNTIME": "tensorrt"})
    s = tiny_detector_settings("bayes-pfl", runtime="onnxruntime", precision="bf16")
    with pytest.raises(ConfigError, match="precision must be \"fp32\" or \"auto\""):
        recipe_from_settings(s)
    s = tiny_detector_settings("bayes-pfl", runtime="onnxruntime", precision="auto")
    identity = recipe_from_settings(s).identity
    assert identity["runtime"] == "onnxruntime" and identity["options"]["precision"] == "fp32"
    assert "runtime" not in recipe_from_settings(tiny_detector_settings("bayes-pfl")).identity
    with pytest.raises(ExportError, match="needs \\[model\\] export"):
        _load(s)


def test_export_verb_and_runtime_route_watch_once(tmp_path, monkeypatch):
    """`inspector export` on a registered version, then `watch --once` with [model] runtime scores every image
    through the exported graphs, into a version whose identity names the runtime, with torch's numbers."""
    from inspector.cli import app
    from inspector.registry import read_manifest

    settings = tiny_detector_settings("bayes-pfl")
    model = _moved(_load(settings))
    register_model(tmp_path / "models", "pfl-v1", model, {"kind": "test"})
    paths = write_images(tmp_path / "line", 3)
    monkeypatch.chdir(tmp_path)
    for key, value in {**FAST_ENV, "INSPECTOR_REGISTRY__PATH": str(tmp_path / "models"),
                       "INSPECTOR_DATABASE__URL": f"sqlite:///{tmp_path}/w.sqlite"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("INSPECTOR_CONFIG", raising=False)
    monkeypatch.setattr("inspector.pipeline.install_signal_handlers", lambda stop: None)
    runner = CliRunner()
    done = runner.invoke(app, ["export", "pfl-v1", "--format", "onnx", str(tmp_path / "edge")])
    assert done.exit_code == 0, done.output
    assert "exported pfl-v1" in done.output and 'runtime = "onnxruntime"' in done.output
    assert read_manifest(tmp_path / "models" / "pfl-v1")["name"] == "pfl-v1"
    again = runner.invoke(app, ["export", "pfl-v1", "--format", "onnx", str(tmp_path / "edge")])
    assert again.exit_code != 0 and "never written over another" in again.output
    monkeypatch.setenv("INSPECTOR_MODEL__NAME", "pfl-v1")  # 'active': the version the settings name
    active = runner.invoke(app, ["export", "active", "-f", "openvino", str(tmp_path / "edge-ov")])
    assert active.exit_code == 0, active.output
    manifest = json.loads((tmp_path / "edge-ov" / "export.json").read_text())
    assert manifest["model"]["name"] == "pfl-v1" and manifest["export_format"] == "openvino"
    monkeypatch.delenv("INSPECTOR_MODEL__NAME")

    calls = []
    run = ExportedGraphs.run
    monkeypatch.setattr(ExportedGraphs, "run", lambda self, g, *x: calls.append(g) or run(self, g, *x))
    monkeypatch.setenv("INSPECTOR_MODEL__RUNTIME", "onnxruntime")
    monkeypatch.setenv("INSPECTOR_MODEL__EXPORT", str(tmp_path / "edge"))
    watched = runner.invoke(app, ["watch", str(tmp_path / "line"), "-n", "screw", "--model", "pfl-v1", "--once"])
    assert watched.exit_code == 0, watched.output
    assert "stored 3 results" in watched.output
    assert {"vision", "text"} <= set(calls)
    with sqlite3.connect(tmp_path / "w.sqlite") as conn:
        rows = conn.execute("select i.path, r.image_score, m.manifest from results r join images i on "
                            "i.id = r.image_id join model_versions m on m.id = r.model_version_id").fetchall()
    assert len(rows) == 3
    assert {json.loads(m)["identity"]["runtime"] for _, _, m in rows} == {"onnxruntime"}
    torch_model = load_model("pfl-v1", settings=_registry_settings(tmp_path))
    expected = torch_model.predict(paths, "screw").image_score
    by_path = {path: score for path, score, _ in rows}
    for path, score in zip(paths, expected.tolist()):
        assert abs(by_path[str(path.resolve())] - score) <= 1e-5


def _registry_settings(tmp_path):
    s = tiny_detector_settings("bayes-pfl")
    s.registry.path = str(tmp_path / "models")
    return s


def test_bench_times_each_runtime_against_the_torch_fp32_floor(tmp_path, monkeypatch):
    from inspector.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INSPECTOR_CONFIG", raising=False)
    monkeypatch.setenv("INSPECTOR_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("INSPECTOR_MODEL__PRECISION", "fp32")
    done = CliRunner().invoke(app, ["bench", "--detectors", "bayes-pfl", "--backbone", "test-tiny", "--image-size",
                                    "224", "--batch-sizes", "1", "--repeats", "1", "--samples", "2",
                                    "--runtimes", "onnxruntime,openvino", "--output", str(tmp_path / "b.json")])
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "b.json").read_text())["detectors"][0]
    cases = {c["name"]: c for c in report["cases"]}
    for runtime, fmt in RUNTIMES.items():
        for name in (f"exact R=2 ({runtime})", f"backbone ({runtime})"):
            assert cases[name]["ms_per_image"] > 0 and cases[name]["ratio_to_fp32_floor"] > 0
            assert cases[name]["ratio_to_fp32_floor"] == pytest.approx(
                cases[name]["ms_per_image"] / cases["floor"]["ms_per_image"])
        compared = report["runtime_comparison"][runtime]
        assert compared["export_format"] == fmt and compared["images"] == 8
        assert compared["agreement"]["max_abs_map_diff"] <= 1e-4
        assert compared["agreement"]["max_abs_image_score_diff"] <= 1e-5
        assert f"{runtime} ({fmt} export) vs torch fp32 on 8 images" in done.output
    plain = [c["name"] for c in report["cases"] if "(" not in c["name"] or c["name"].endswith("(bf16)")]
    assert "floor" in plain and "exact R=2" in plain
