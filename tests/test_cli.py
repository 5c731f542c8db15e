"""The command line as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .pgcluster import free_port
from .pipeline_helpers import ROOT, run, write_images


@pytest.mark.parametrize("verb", [[], ["score"], ["bench"], ["demo"], ["models"], ["models", "import-official"],
                                  ["models", "list"], ["models", "show"], ["config"], ["config", "show"],
                                  ["references"], ["references", "add"], ["references", "list"],
                                  ["references", "remove"], ["retrain"], ["eval"], ["watch"], ["export"]])
def test_every_verb_has_help(verb, tmp_path):
    result = run(*verb, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "--help" in result.stdout


def test_score_refuses_random_weights_then_scores_with_flag(tmp_path):
    write_images(tmp_path / "imgs")
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
           "INSPECTOR_MODEL__IMAGE_SIZE": "224", "INSPECTOR_BAYES_PFL__SAMPLES": "1", "INSPECTOR_MODEL__DEVICE": "cpu",
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


# --- issue 13: help texts, start-up, the offline first run, score's maps and table, eval's progress -------------

ALL_VERBS = [[], ["score"], ["bench"], ["watch"], ["worker"], ["status"], ["demo"], ["retrain"], ["eval"],
             ["demo-data"], ["dashboard"], ["models"], ["models", "import-official"], ["models", "promote"],
             ["models", "shadow"], ["models", "history"], ["models", "list"], ["models", "show"], ["config"],
             ["config", "show"], ["db"], ["db", "upgrade"], ["references"], ["references", "add"],
             ["references", "list"], ["references", "remove"], ["export"]]


def test_help_shows_settings_in_brackets_and_no_type_noise(tmp_path):
    """`[model] detector` and friends are printed (not eaten as rich markup); flags carry no `<bool>`,
    positionals no `<list[Path]>` nor `{paths}...`; the defaults of None-valued options are named."""
    env = {"COLUMNS": "200"}
    texts = {}
    for verb in ALL_VERBS:
        result = run(*verb, "--help", cwd=tmp_path, env=env, timeout=60)
        assert result.returncode == 0, (verb, result.stderr)
        text = texts[" ".join(verb)] = result.stdout
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        assert "<bool>" not in text and "<list[" not in text and "{" not in usage, (verb, text)
    assert "[model] detector, bayes-pfl" in texts["score"] and "[model] batch_size, 8" in texts["score"]
    assert "[bayes_pfl] samples, 10" in texts["score"] and "[model] name" in texts["score"]
    assert "Usage: inspector score [OPTIONS] PATHS..." in texts["score"]
    assert "[datasets.NAME]" in texts["retrain"] and "[train] epochs, 30" in texts["retrain"]
    assert "[train] batch_size, 32" in texts["retrain"]
    assert "[[sources]]" in texts["watch"] and "[FOLDERS...]" in texts["watch"]
    for verb in ("watch", "worker"):
        assert "--backbone" in texts[verb] and "--pretrained" in texts[verb] and "[model] pretrained" in texts[verb]
    for setting in ("[bench] batch_sizes, 1,2", "[bench] repeats, 2", "[bayes_pfl] samples, 10", "[bench] output"):
        assert setting in texts["bench"], setting
    assert "[database] url" in texts["status"] and "[dashboard] port, 8501" in texts["dashboard"]


@pytest.mark.parametrize("verb", [["--help"], ["config", "show"], ["score", "--help"]])
def test_start_up_does_not_import_torch(tmp_path, verb):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full_env.pop("INSPECTOR_CONFIG", None)
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "inspector.cli", *verb], cwd=tmp_path,
                            env=full_env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert "typer" in imported and not imported & {"torch", "open_clip", "numpy", "sqlalchemy"}, sorted(imported)


def test_status_answers_without_loading_model_code(tmp_path):
    """`inspector status` reads the database only: no torch or model code (it took 2.4-3.7 s to start)."""
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full_env.pop("INSPECTOR_CONFIG", None)
    made = subprocess.run([sys.executable, "-m", "inspector.cli", "db", "upgrade", "--database", db], cwd=tmp_path,
                          env=full_env, capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr[-2000:]
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "inspector.cli", "status", "--database", db],
                            cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "queue depth" in result.stdout, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert "sqlalchemy" in imported and not imported & {"torch", "open_clip", "inspector.worker"}, sorted(imported)


def test_lazy_package_names_still_import():
    import inspector

    assert inspector.load_model.__name__ == "load_model" and inspector.WinCLIP.__name__ == "WinCLIP"
    assert {"BayesPFL", "AACLIP", "load_model"} <= set(dir(inspector))
    with pytest.raises(AttributeError):
        inspector.no_such_name  # noqa: B018


@pytest.mark.parametrize("offline_env", [{"HF_HUB_OFFLINE": "1"},
                                         {"HF_ENDPOINT": "http://127.0.0.1:{port}"}])
def test_offline_first_watch_fails_at_once_with_the_way_out(tmp_path, offline_env):
    """No cached weights and no network: one line naming the setting, its variable and the random-weights
    way to try, right away (not a minute of download retries)."""
    import time

    (tmp_path / "imgs").mkdir()
    write_images(tmp_path / "imgs", 1)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "", **offline_env}
    env = {k: v.format(port=free_port()) for k, v in env.items()}
    start = time.monotonic()
    result = run("watch", "imgs", "-n", "screw", "--once", cwd=tmp_path, env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in ("no network", "[model] pretrained", "INSPECTOR_MODEL__PRETRAINED",
                   "--pretrained random --backbone test-tiny --allow-random-weights"):
        assert needle in lines[0], needle
    assert "Retrying" not in result.stderr and elapsed < 45, elapsed  # was ~75 s of retries
    verbose = run("watch", "imgs", "-n", "screw", "--once", "--verbose", cwd=tmp_path, env=env, timeout=120)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "BackboneError" in verbose.stderr
    tried = run("watch", "imgs", "-n", "screw", "--once", "--pretrained", "random", "--backbone", "test-tiny",
                "--allow-random-weights", cwd=tmp_path, env=env, timeout=300)
    assert tried.returncode == 0 and "stored 1 results" in tried.stderr, tried.stderr[-3000:]


def test_cached_pretrained_is_used_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from inspector.backbone import BackboneError, _cached_pretrained

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"not cached here, and there is no network \(HF_HUB_OFFLINE"):
        _cached_pretrained("ViT-B-16-plus-240", "laion400m_e31")
    repo = tmp_path / "models--timm--vit_base_patch16_plus_clip_240.laion400m_e31"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    weights = repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"weights")
    assert _cached_pretrained("ViT-B-16-plus-240", "laion400m_e31") == str(weights)
    assert _cached_pretrained("test-tiny", "nope") == ""  # no such tag: nothing to download, nothing said


def test_verbose_after_the_verb(tmp_path):
    (tmp_path / "config.toml").write_text("[model]\nsampels = 3\n")
    quiet = run("config", "show", cwd=tmp_path)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    for args in (["config", "show", "--verbose"], ["config", "show", "-v"], ["--verbose", "config", "show"]):
        loud = run(*args, cwd=tmp_path)
        assert loud.returncode != 0 and "Traceback" in loud.stderr and "sampels" in loud.stderr, args


def test_errors_name_flags_not_keywords(tmp_path):
    from PIL import Image

    root = tmp_path / "ds" / "bottle"
    for folder in ("train/good", "test/good", "test/broken", "ground_truth/broken"):
        (root / folder).mkdir(parents=True)
    for name in ("train/good/000.png", "test/good/000.png", "test/broken/000.png"):
        Image.new("RGB", (32, 32)).save(root / name)
    for name in ("000_mask.png", "007_mask.png"):  # 007 has no image
        Image.new("L", (32, 32)).save(root / "ground_truth" / "broken" / name)
    result = run("eval", "--data", "ds", cwd=tmp_path)
    assert result.returncode == 2 and "--orphan-masks ignore" in result.stderr, result.stderr
    assert "orphan_masks=" not in result.stderr


def test_score_maps_are_unique_recursive_table_keeps_paths(tmp_path):
    """MVTec-style good/000.png and crack/000.png: one map each, named by the path under the common folder;
    a.png and a.jpg side by side get a hash; the table shows whole relative paths without a terminal."""
    from PIL import Image

    for folder, colour in (("good", 40), ("crack", 200)):
        (tmp_path / "part" / folder).mkdir(parents=True)
        Image.new("RGB", (64, 64), (colour, 90, 90)).save(tmp_path / "part" / folder / "000.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "part" / "good" / "000.jpg")
    env = {"INSPECTOR_MODEL__BACKBONE": "test-tiny", "INSPECTOR_MODEL__PRETRAINED": "random",
           "INSPECTOR_MODEL__IMAGE_SIZE": "224", "INSPECTOR_MODEL__DEVICE": "cpu"}
    flat = run("score", "part", "-n", "screw", "--allow-random-weights", cwd=tmp_path, env=env)
    assert flat.returncode == 2 and "--recursive" in flat.stderr  # no images directly in part/
    result = run("score", "part", "--recursive", "-n", "screw", "--allow-random-weights", "--maps", "maps",
                 cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert len(names) == 3 and "crack_000_map.png" in names, names
    assert sum(n.startswith("good_000-") for n in names) == 2, names
    for shown in ("crack/000.png", "good/000.png", "good/000.jpg"):
        assert shown in result.stdout, result.stdout
    assert str(tmp_path / "part") in result.stdout.replace("\n", "")  # the common folder, in the title
    assert "DAY ONE" in result.stderr  # bayes-pfl has no head: winclip scored, and the terminal says so
    again = run("score", "part", "-r", "-n", "screw", "--allow-random-weights", "--maps", "maps", "--json",
                cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3 and all("has no trained head" in r["fallback"] for r in rows)
    assert sorted(Path(r["map"]).name for r in rows) == names
    assert "3 map(s)" in again.stderr and "replaced" in again.stderr  # never silently


def test_eval_progress_lines_without_a_terminal():
    from inspector.evaluation import ProgressLines

    now = [0.0]
    lines: list[str] = []
    progress = ProgressLines(100, lines.append, clock=lambda: now[0])
    for _ in range(25):  # 4 images a step, 1 s each
        now[0] += 1
        progress(4)
    assert lines[0] == "scoring 12/100 images (12%), 3 s" and lines[-1] == "scoring 100/100 images (100%), 25 s"
    assert len(lines) == 9
    slow = ProgressLines(1000, lines.append, clock=lambda: now[0])
    lines.clear()
    now[0] += 31  # 30 s without reaching 10 %: a line anyway
    slow(1)
    assert lines == ["scoring 1/1000 images (0%), 31 s"]
