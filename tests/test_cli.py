"""The command line as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def run(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("INSPECTOR_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "inspector.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("verb", [[], ["score"], ["bench"], ["demo"], ["models"], ["models", "import-official"],
                                  ["models", "list"], ["models", "show"], ["config"], ["config", "show"],
                                  ["references"], ["references", "add"], ["references", "list"],
                                  ["references", "remove"], ["retrain"], ["eval"], ["watch"]])
def test_every_verb_has_help(verb, tmp_path):
    result = run(*verb, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "--help" in result.stdout


def _images(folder: Path, count: int = 2) -> list[Path]:
    from inspector.bench import synthetic_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(synthetic_images(count, size=96, seed=3)):
        paths.append(folder / f"img {i}.png")
        image.save(paths[-1])
    return paths


def test_score_refuses_random_weights_then_scores_with_flag(tmp_path):
    _images(tmp_path / "imgs")
    (tmp_path / "notes.txt").write_text("not an image")
    refused = run("score", "imgs", "-n", "metal nut", "--backbone", "test-tiny", "--pretrained", "random",
                  cwd=tmp_path)
    assert refused.returncode == 2
    assert "--allow-random-weights" in refused.stderr and "Traceback" not in refused.stderr
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run("score", "imgs", "-n", "metal nut", "--json", "--allow-random-weights", "-R", "2",
                 "--maps", "maps", cwd=tmp_path, env={"INSPECTOR_MODEL__BACKBONE": "test-tiny",
                                                     "INSPECTOR_MODEL__PRETRAINED": "random"})
    assert result.returncode == 1, result.stderr  # one file failed: non-zero, the others still scored
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {"img 0.png", "img 1.png", "broken.png"}
    assert by_name["broken.png"]["error"] and by_name["broken.png"]["image_score"] is None
    for name in ("img 0.png", "img 1.png"):
        assert 0 <= by_name[name]["image_score"] <= 1 and by_name[name]["random_weights"] is True
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["img 0_map.png", "img 1_map.png"]


def test_user_errors_are_one_line(tmp_path):
    (tmp_path / "config.toml").write_text("[model]\nsampels = 3\n")
    result = run("config", "show", cwd=tmp_path)
    assert result.returncode == 2 and "unknown key 'sampels'" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "config.toml").unlink()
    result = run("models", "show", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "no model 'nope'" in result.stderr


def test_import_official_registers_a_version_that_loads(tmp_path, tiny_model, images):
    from inspector import load_model
    from inspector.config import Settings
    from inspector.detectors.bayes_pfl.head import head_to_official_state

    clip_file = tmp_path / "clip.pt"
    # test-tiny has 64-wide heads only in OpenAI's width // 64 rule; that is what an OpenAI file implies
    torch.save(tiny_model.backbone.clip.state_dict(), clip_file)
    head_file = tmp_path / "train_visa.pth"
    torch.save({"MyModel": head_to_official_state(tiny_model.head)}, head_file)
    result = run("models", "import-official", "--clip", str(clip_file), "--head", str(head_file),
                 "--name", "visa-official", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "models" / "visa-official" / "manifest.json").read_text())
    assert manifest["detector"] == "bayes-pfl" and manifest["origin"]["stage"] == 2
    assert manifest["backbone"]["activation"] == "gelu"
    again = run("models", "import-official", "--clip", str(clip_file), "--head", str(head_file),
                "--name", "visa-official", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    listed = run("models", "list", "--json", cwd=tmp_path)
    assert [v["name"] for v in json.loads(listed.stdout)] == ["visa-official"]

    settings = Settings()
    settings.registry.path = str(tmp_path / "models")
    settings.model.device = "cpu"
    model = load_model("visa-official", settings=settings)
    for key, value in tiny_model.head.state_dict().items():
        assert torch.equal(model.head.state_dict()[key], value), key
    assert model.provenance["random_weights"] is False
    pred = model.predict(images[:1], "bottle", samples=2)
    assert pred.anomaly_map.shape == (1, 518, 518)


def test_demo_then_status_on_a_fresh_folder(tmp_path):
    """The README's quickstart: defaults only (SQLite in the working folder, generated images)."""
    result = run("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM" in result.stdout + result.stderr and "test-tiny" in result.stderr
    status = run("status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["queue_depth"] == 0 and data["by_status"] == {"done": 8}
    assert data["active_model_random_weights"] is True
    again = run("demo", cwd=tmp_path)  # the same images again: nothing is scored twice
    assert again.returncode == 0 and json.loads(run("status", "--json", cwd=tmp_path).stdout)["by_status"] == {
        "done": 8}


def test_watch_refuses_random_weights_and_missing_folders(tmp_path):
    (tmp_path / "imgs").mkdir()
    refused = run("watch", "imgs", "-n", "screw", "--once", cwd=tmp_path,
                  env={"INSPECTOR_MODEL__BACKBONE": "test-tiny", "INSPECTOR_MODEL__PRETRAINED": "random"})
    assert refused.returncode == 2 and "--allow-random-weights" in refused.stderr
    missing = run("watch", "nope", "-n", "screw", "--once", "--allow-random-weights", cwd=tmp_path)
    assert missing.returncode == 2 and "not a folder" in missing.stderr


def test_metrics_endpoint(tmp_path):
    import urllib.request

    from .pgcluster import free_port
    from .pipeline_helpers import start_cli, wait_for

    port = free_port()
    (tmp_path / "imgs").mkdir()
    daemon = start_cli(["watch", "imgs", "-n", "screw", "--metrics-port", str(port)],
                       f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)

    def scrape():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            return None

    try:
        body = wait_for(scrape, 60, what="metrics endpoint")
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0
    assert "inspector_queue_depth 0.0" in body and "inspector_images_scored_total" in body


def test_demo_data_retrain_eval_promote(tmp_path):
    """The ML engineer's loop end to end on synthetic data, test-tiny backbone."""
    env = {"INSPECTOR_MODEL__BACKBONE": "test-tiny", "INSPECTOR_MODEL__PRETRAINED": "random",
           "INSPECTOR_MODEL__IMAGE_SIZE": "224", "INSPECTOR_MODEL__SAMPLES": "1", "INSPECTOR_MODEL__DEVICE": "cpu",
           "INSPECTOR_TRAIN__VAL_SAMPLES": "1"}
    made = run("demo-data", "synthetic", "--classes", "2", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    (tmp_path / "config.toml").write_text('[datasets.synth]\npath = "synthetic"\n')
    trained = run("retrain", "--aux", "synth", "--epochs", "2", "--batch-size", "4", "--name", "synth-v1",
                  "--allow-random-weights", cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    manifest = json.loads((tmp_path / "models" / "synth-v1" / "manifest.json").read_text())
    origin = manifest["origin"]
    assert origin["kind"] == "retrain" and len(origin["history"]) == 2 and len(origin["dataset_sha256"]) == 64
    assert origin["hyperparameters"]["epochs"] == 2 and origin["random_backbone"] is True
    assert all("pixel_ap" in h for h in origin["history"])  # validated on a split of the auxiliary data
    report_file = tmp_path / "eval.json"
    evaluated = run("eval", "--data", "synthetic", "--model", "synth-v1", "--json", str(report_file),
                    "--plots", "plots", "--allow-random-weights", cwd=tmp_path, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert set(report["per_class"]) == {"synth_0", "synth_1"}
    assert 0 <= report["mean"]["pixel_aupro"] <= 1 and 0 <= report["mean"]["image_auroc"] <= 1
    from PIL import Image

    for name in ("roc.png", "pr.png"):
        with Image.open(tmp_path / "plots" / name) as plot:
            assert plot.size == (420, 420) and len(plot.getcolors(10000)) > 3
    promoted = run("models", "promote", "synth-v1", "--by", "qa-lead", cwd=tmp_path)
    assert promoted.returncode == 0 and "qa-lead" in promoted.stdout
    listed = run("models", "history", "--json", cwd=tmp_path)
    assert [(p["model"], p["created_by"]) for p in json.loads(listed.stdout)] == [("synth-v1", "qa-lead")]
    bad = run("retrain", "--aux", "nowhere", "--allow-random-weights", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "neither a path nor a dataset named" in bad.stderr
