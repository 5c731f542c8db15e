"""Shared fixtures: a tiny random Bayes-PFL model (test-tiny backbone, 24 blocks) and sample images."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from inspector.config import Settings


def tiny_settings(**model: object) -> Settings:
    s = Settings()
    s.override("model", **{"backbone": "test-tiny", "pretrained": "random", "image_size": 518, "samples": 3,
                            "device": "cpu", "precision": "fp32", **model})  # exact: tests compare to 1e-6
    return s


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
