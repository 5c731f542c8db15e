"""Adding a detector touches its own module and one line of ``KINDS``: a detector defined in the test suite
(``tests/toy_detector.py``) runs through ``watch --once``, ``eval``, ``bench`` and the dashboard."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from inspector.imaging import open_image, to_model_input

from .pipeline_helpers import FAST_ENV, ROOT, small_png
from .toy_detector import toy_map

#: the CLI with one line added to KINDS, and nothing else
LAUNCH = ("import sys; import inspector.detectors as d; d.KINDS['toy'] = 'tests.toy_detector:Toy'; "
          "from inspector.cli import main; sys.argv[0] = 'inspector'; main()")

pytestmark = pytest.mark.slow


def cli(*args: str, cwd: Path, db: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    env.update(FAST_ENV)
    env.update({"INSPECTOR_DATABASE__URL": db, "INSPECTOR_MODEL__DETECTOR": "toy", "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def expected_score(path: str | Path) -> float:
    """The toy's image score of a file, computed here: the base class's default preprocessing at 224 px."""
    return float(toy_map(to_model_input(open_image(path), 224)[None]).mean())


def test_a_detector_added_through_kinds_alone(tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path}/toy.sqlite"
    line = tmp_path / "line1"
    line.mkdir()
    for i in range(4):
        small_png(line / f"{i}.png", seed=i)

    # watch --once: every image scored by the toy, under a version of its own
    watched = cli("watch", "line1", "-n", "bottle", "--once", cwd=tmp_path, db=db)
    assert watched.returncode == 0, watched.stderr[-3000:]
    with sqlite3.connect(tmp_path / "toy.sqlite") as conn:
        rows = conn.execute("select i.path, r.image_score, m.detector, m.name from results r join images i "
                            "on i.id = r.image_id join model_versions m on m.id = r.model_version_id").fetchall()
    assert len(rows) == 4 and {r[2] for r in rows} == {"toy"} and all(r[3].startswith("toy@") for r in rows)
    for path, score, _, _ in rows:  # the stored score is the toy's own arithmetic on the default preprocessing
        assert score == pytest.approx(expected_score(path), abs=1e-6)

    # eval: the metrics are those of the toy's scores on the dataset's labels
    made = cli("demo-data", "synthetic", "--classes", "1", cwd=tmp_path, db=db)
    assert made.returncode == 0, made.stderr[-2000:]
    evaluated = cli("eval", "--data", "synthetic", "--json", "eval.json", cwd=tmp_path, db=db)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["detector"] == "toy"
    from inspector.data import load_dataset

    records = [r for r in load_dataset(str(tmp_path / "synthetic")) if r.split == "test"]
    (name,) = {r.class_name for r in records}
    scores = [expected_score(r.image) for r in records]
    expected = roc_auc_score([r.label for r in records], scores)
    assert report["per_class"][name]["image_auroc"] == pytest.approx(expected, abs=1e-9)

    # bench: the floor and the toy's own case, with ratios
    benched = cli("bench", "--detectors", "toy", "--batch-sizes", "1", "--repeats", "1", "--output", "bench.json",
                  cwd=tmp_path, db=db)
    assert benched.returncode == 0, benched.stderr[-3000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    cases = {(r["detector"], r["case"]) for r in bench["side_by_side"]}
    assert ("toy", "toy") in cases
    assert all(np.isfinite(r["ratio_to_floor"]) and r["ratio_to_floor"] > 0 for r in bench["side_by_side"])

    # the dashboard: the review queue holds the toy's results under its version
    from inspector.store import review
    from inspector.store.db import open_store

    engine = open_store(db)
    try:
        queue = review.review_queue(engine, "bottle")
    finally:
        engine.dispose()
    assert len(queue) == 4
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("INSPECTOR_DATABASE__URL", db)
    monkeypatch.delenv("INSPECTOR_DASHBOARD__PASSWORD", raising=False)
    monkeypatch.delenv("INSPECTOR_CONFIG", raising=False)
    app = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)
    app.run()
    assert not app.exception
    shown = " ".join(str(e.value) for e in (*app.markdown, *app.caption)) + " ".join(
        str(o) for box in app.selectbox for o in box.options)
    assert "toy@" in shown
