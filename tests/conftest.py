"""Shared fixtures: a tiny random Bayes-PFL model (test-tiny backbone, 24 blocks) and sample images."""

from __future__ import annotations

import copy
import inspect
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from inspector.config import Settings


def tiny_settings(samples: int = 3, **model: object) -> Settings:
    s = Settings()
    s.override("bayes_pfl", samples=samples)
    s.override("model", **{"backbone": "test-tiny", "pretrained": "random", "image_size": 518,
                            "device": "cpu", "precision": "fp32", **model})  # exact: tests compare to 1e-6
    return s


def tiny_detector_settings(detector: str, samples: int = 1, **model: object) -> Settings:
    """Settings of any detector on test-tiny at 224 px (random weights accepted), MuSc's pools in memory."""
    s = tiny_settings(samples=samples, **{"image_size": 224, "allow_random_weights": True, "detector": detector,
                                          **model})
    s.override("musc", pool_dir="")  # tests write nothing to the home cache
    return s


#: MuSc's tests run the backbone at this side (a multiple of test-tiny's patch 14)
MUSC_SIZE = 112


def tiny_clip(image_size: int = 70):
    """A test-tiny open_clip model with seeded random weights, fp32, in eval mode."""
    import open_clip

    from inspector.backbone import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model("test-tiny", pretrained=None, force_image_size=image_size).float().eval()


def musc_backbone(clip, antialias: bool = False):
    """A copy of ``clip`` as MuSc's backbone at ``MUSC_SIZE`` (position embedding resized without antialias,
    as the official code does, unless ``antialias``)."""
    from inspector.backbone import BackboneSpec, ClipBackbone

    return ClipBackbone(copy.deepcopy(clip), BackboneSpec(arch="test-tiny", pretrained="random",
                                                          image_size=MUSC_SIZE, pos_embed_antialias=antialias))


def randomize_head(head: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move a head away from its near-constant initialisation so differences are visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.startswith("log_tau"):
                continue
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models make hundreds of small calls: on a busy 2-core machine one thread avoids OpenMP's
    busy-waiting barriers (10-20x faster than two). ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model():
    from inspector import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(settings=tiny_settings())
    randomize_head(model.head)
    model.clear_caches()
    return model


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(3):
        h, w = 200 + 37 * i, 260 - 20 * i
        base = rng.uniform(0, 255, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        out.append(img)
    return out


@pytest.fixture(scope="session")
def pg_cluster():
    """A real PostgreSQL server for the whole test session (throwaway cluster in a temp folder)."""
    from .pgcluster import PgCluster

    cluster = PgCluster()
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture
def pg_url(pg_cluster):
    """A fresh, empty database in the session's cluster."""
    if not pg_cluster.is_running():
        pg_cluster.start()
    return pg_cluster.create_database()
@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """The same test on SQLite and on the session's throwaway Postgres."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    return request.getfixturevalue("pg_url")




# ------------------------------------------------------------------------------------------------------
# two tiers: `pytest -m "not slow"` is the fast, in-process tier; `-m slow` the real processes and services.
# Both run in CI (scripts/test.sh runs everything). A test is slow when it uses a slow fixture, runs on the
# Postgres parameter, or calls a helper that starts a process (the CLI, the watcher, a server, a browser).

SLOW_FIXTURES = {"pg_cluster", "pg_url", "browser", "dashboard", "receiver", "scored_db"}
SLOW_CALLS = re.compile(r"(?<![.\w])(run|run_cli|start_cli|cli|scored_database|kill9|AppTest|open_app)\(|"
                        r"subprocess\.|AppTest\.")


def _starts_processes(item: pytest.Item) -> bool:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "postgres" in map(str, callspec.params.values()):
        return True
    try:
        source = inspect.getsource(item.obj)
    except (OSError, TypeError, AttributeError):
        return False
    return bool(SLOW_CALLS.search(source))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "slow" not in item.keywords and _starts_processes(item):
            item.add_marker(pytest.mark.slow)
    # tests marked `cuda` compare a GPU with the CPU: collected where torch sees a GPU (scripts/gpu-check.sh),
    # deselected (not skipped: nothing of theirs can run) on a machine without one
    import torch

    if not torch.cuda.is_available():
        gpu = [item for item in items if "cuda" in item.keywords]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if "cuda" not in item.keywords]
