"""MuSc's live mode through the real CLI (issue #16): ``inspector watch`` with ``[model] detector = "musc"`` on
test-tiny (random weights, 224 px, CPU) in subprocesses, on SQLite and Postgres.

One line, in four runs: ``watch --once`` (warm-up decisions, the pool cap), reviews written to the store,
``watch --once`` again (the rejected image leaves the pool, an accepted one comes back), then a daemon killed
with SIGKILL and a restart (stored scores unchanged, the pool read back from ``pool_dir``, nothing rescored).
The pools are read from their files (``inspector/detectors/musc/persist.py``), hashes computed as the
worker does (``to_model_input`` of the decoded file). Also ``eval --score live`` and ``bench`` of MuSc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sqlalchemy import create_engine, select

from inspector.detectors.musc import content_hash
from inspector.imaging import open_image, to_model_input
from inspector.store import images, results

from .pipeline_helpers import ROOT, kill9, run_cli, start_cli, wait_for

SIZE = 224
POOL = 4


def _env(tmp_path: Path) -> dict[str, str]:
    return {"INSPECTOR_MODEL__DETECTOR": "musc", "INSPECTOR_MODEL__BATCH_SIZE": "1",
            "INSPECTOR_MUSC__POOL_SIZE": str(POOL), "INSPECTOR_MUSC__POOL_DIR": str(tmp_path / "pools"),
            "INSPECTOR_MUSC__REFERENCES": "", "INSPECTOR_DECISIONS__PROVISIONAL_AFTER": "4"}


def _parts(folder: Path, first: int, count: int) -> list[Path]:
    """Images of one product: a shared texture plus per-image noise."""
    folder.mkdir(exist_ok=True)
    base = np.random.default_rng(0).integers(0, 200, size=(64, 64, 3))
    paths = []
    for i in range(first, first + count):
        noise = np.random.default_rng(100 + i).integers(0, 56, size=(64, 64, 3))
        paths.append(folder / f"part_{i:02d}.png")
        Image.fromarray((base + noise).astype(np.uint8)).save(paths[-1])
    return paths


def _digest(path: Path) -> str:
    return content_hash(to_model_input(open_image(path), SIZE))


def _stored(db_url: str) -> list[dict]:
    """Results in the order they were stored: path, image id, scores, decision, map bytes."""
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(select(images.c.path, images.c.id.label("image_id"), results.c.image_score,
                                   results.c.topk_score, results.c.decision, results.c.anomaly_map)
                            .join(results, results.c.image_id == images.c.id).order_by(results.c.id)).mappings()
        out = [dict(r) for r in rows]
    engine.dispose()
    return out


def _pool(tmp_path: Path) -> dict:
    """The stored pool of the line's class: hashes oldest first, accepted hashes, feature files."""
    indexes = list((tmp_path / "pools").glob("*/*/index.pt"))
    assert len(indexes) == 1, indexes  # one model version, one class
    index = torch.load(indexes[0], weights_only=True)
    order = sorted(range(len(index["hashes"])), key=index["ages"].__getitem__)
    files = sorted(p.stem for p in indexes[0].parent.iterdir() if p.name != "index.pt")
    return {"hashes": [index["hashes"][i] for i in order], "accepted": sorted(index["accepted"]), "files": files}


def _watch(args: list[str], db_url: str, tmp_path: Path):
    done = run_cli(["watch", str(tmp_path / "line1"), "-n", "screw", *args], db_url, tmp_path, timeout=600,
                   env=_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_live_pool_through_watch(db_url, tmp_path):
    from inspector.store import open_store
    from inspector.store.pool_reviews import pool_reviews_since
    from inspector.store.review import record_review, undo_reviews

    first = _parts(tmp_path / "line1", 0, 6)
    done = _watch(["--once"], db_url, tmp_path)
    rows = _stored(db_url)
    assert len(rows) == 6
    order = [Path(r["path"]).name for r in rows]
    # warm-up: the first image had nothing to be compared with (score 1, flagged); the store decides
    # "review" until provisional_after (4) results exist, then by the provisional threshold
    assert rows[0]["image_score"] == 1.0 and all(r["image_score"] < 1.0 for r in rows[1:])
    assert "warm-up" in done.stderr
    assert [r["decision"] for r in rows[:4]] == ["review"] * 4
    assert {r["decision"] for r in rows[4:]} <= {"pass", "fail"}
    # the cap: the pool holds the 4 most recent images, one feature file each
    digest = {p.name: _digest(p) for p in first}
    pool = _pool(tmp_path)
    assert pool["hashes"] == [digest[name] for name in order[-POOL:]]
    assert pool["files"] == sorted(pool["hashes"]) and pool["accepted"] == []

    # reviews: one pooled image rejected, one evicted image accepted (after the reviewer first said defect),
    # and one undone acceptance (it counts for neither)
    engine = open_store(db_url)
    ids = {Path(r["path"]).name: r["image_id"] for r in rows}
    rejected, accepted, undone = order[-1], order[0], order[1]
    record_review(engine, ids[rejected], "defect", "ana")
    record_review(engine, ids[accepted], "defect", "ana")
    record_review(engine, ids[accepted], "normal", "ana")
    undo_reviews(engine, [record_review(engine, ids[undone], "normal", "ana")], "ana")
    defects, normals, newest = pool_reviews_since(engine)
    assert [Path(d.path).name for d in defects] == [rejected]
    assert [Path(n.path).name for n in normals] == [accepted]
    assert pool_reviews_since(engine, newest) == ([], [], newest)
    engine.dispose()

    second = _parts(tmp_path / "line1", 6, 2)
    _watch(["--once"], db_url, tmp_path)
    rows2 = _stored(db_url)
    assert rows2[:6] == rows  # nothing rescored, no stored score changed
    assert len(rows2) == 8 and all(r["image_score"] < 1.0 for r in rows2[6:])  # the pool came back
    digest.update({p.name: _digest(p) for p in second})
    pool = _pool(tmp_path)
    # rejected: out; accepted: back in (it had been evicted), kept while the two new images replaced the
    # oldest unaccepted ones
    assert digest[rejected] not in pool["hashes"] and pool["accepted"] == [digest[accepted]]
    later = [Path(r["path"]).name for r in rows2[6:]]
    assert pool["hashes"] == [digest[order[4]], digest[accepted], *(digest[n] for n in later)]
    assert len(pool["hashes"]) == POOL and pool["files"] == sorted(pool["hashes"])

    # a daemon killed with SIGKILL mid-line, then restarted
    _parts(tmp_path / "line1", 8, 6)
    daemon = start_cli(["watch", str(tmp_path / "line1"), "-n", "screw"], db_url, tmp_path, **_env(tmp_path))
    try:
        wait_for(lambda: len(_stored(db_url)) >= 9, 300, interval=0.2, what="a result of the daemon")
    finally:
        kill9(daemon)
    before = _stored(db_url)
    kept = _pool(tmp_path)
    # the index names only feature files that exist (a kill during a write may leave a temporary file or
    # a feature file no index names yet: the next save deletes them)
    assert set(kept["hashes"]) <= set(kept["files"])
    done = _watch(["--once", "--verbose"], db_url, tmp_path)
    after = _stored(db_url)
    assert after[:len(before)] == before  # stored scores, decisions and maps unchanged by the restart
    assert len(after) == 14 and len({r["path"] for r in after}) == 14  # each image scored once
    assert f"MuSc pool of {len(kept['hashes'])} image(s) restored" in done.stderr
    assert "warm-up" not in done.stderr and all(r["image_score"] < 1.0 for r in after[len(before):])
    pool = _pool(tmp_path)
    assert len(pool["hashes"]) == POOL and digest[rejected] not in pool["hashes"]
    assert pool["accepted"] == [digest[accepted]] and digest[accepted] in pool["hashes"]
    assert pool["files"] == sorted(pool["hashes"])


# ------------------------------------------------------------------------------------------------------
# eval --score live and bench, through the CLI


def _tiny_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "INSPECTOR_MODEL__DEVICE": "cpu",
                "INSPECTOR_MODEL__PRECISION": "fp32", "INSPECTOR_MUSC__POOL_DIR": str(tmp_path / "pools"),
                "INSPECTOR_MUSC__REFERENCES": ""})
    return env


def test_cli_eval_live_mode(tmp_path):
    from inspector.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "synthetic", classes=2, train_good=0, test_good=3, test_bad=3, size=64)
    env = {**_tiny_env(tmp_path), "INSPECTOR_MODEL__BACKBONE": "test-tiny", "INSPECTOR_MODEL__PRETRAINED": "random",
           "INSPECTOR_MODEL__IMAGE_SIZE": "112"}
    done = subprocess.run([sys.executable, "-m", "inspector.cli", "eval", "--data", "synthetic", "--detector", "musc",
                           "--score", "live", "--json", "live.json", "--allow-random-weights"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "live.json").read_text())
    assert report["detector"] == "musc" and report["image_score"] == "live"
    assert set(report["per_class"]) == {"synth_0", "synth_1"} and 0 <= report["mean"]["image_auroc"] <= 1
    assert "live image score" in done.stdout
    assert not (tmp_path / "pools").exists()  # the live mode of eval starts from empty pools in memory


def test_cli_bench_musc_pools_and_cost_model(tmp_path):
    done = subprocess.run([sys.executable, "-m", "inspector.cli", "bench", "--detectors", "musc", "--backbone",
                           "test-tiny", "--batch-sizes", "1", "--repeats", "1", "--references", "0", "--output",
                           str(tmp_path / "bench.json")], cwd=tmp_path, env=_tiny_env(tmp_path), capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    (report,) = json.loads((tmp_path / "bench.json").read_text())["detectors"]
    cases = {c["name"]: c for c in report["cases"]}
    for n in (10, 50, 100, 200):  # the pool sizes, each a row of the table with its ratio to the floor
        case = cases[f"musc N={n}"]
        assert case["ratio_to_floor"] > 0 and f"musc N={n}" in out
        assert f"{case['ratio_to_floor']:.2f}" in out
    assert cases["musc N=200"]["ms_per_image"] > cases["musc N=10"]["ms_per_image"]  # MSM grows with N
    facts = report["detector_report"]
    per_image = 12 * 256 * 64 * 4 + 64 * 4  # 12 LNAMD maps of 16 x 16 patches x width 64, fp32, + the embedding
    assert facts["bytes_per_pooled_image"] == per_image and facts["pool_size"] == 50
    assert f"{per_image / 1e6:.2f} MB per pooled image here (float32), at most pool_size = 50" in out
    full = facts["full_size"]
    assert round(full["msm_gflop_per_image"]["200"] / 199) == 46 and full["bytes_per_pooled_image_fp16"] == 33644544
    assert "N = 10: 0.42 TFLOP/image, 0.4x the backbone" in out and "N = 200: 9.18 TFLOP/image, 9.1x" in out
    assert "33.6 MB fp16 / 67.3 MB fp32 per pooled image" in out
    assert not (tmp_path / "pools").exists()  # the bench's pools are its own, in memory
