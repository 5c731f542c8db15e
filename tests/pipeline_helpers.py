"""Helpers for the pipeline tests: run the real CLI in a subprocess, make images, read the database."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, func, select, text

from inspector.store import images, results

from .pgcluster import free_port

ROOT = Path(__file__).parents[1]

#: Fast settings for pipeline tests: tiny random backbone at 224 px, one sample, short timers.
FAST_ENV = {
    "INSPECTOR_MODEL__BACKBONE": "test-tiny",
    "INSPECTOR_MODEL__PRETRAINED": "random",
    "INSPECTOR_MODEL__IMAGE_SIZE": "224",
    "INSPECTOR_BAYES_PFL__SAMPLES": "1",
    "INSPECTOR_MODEL__DEVICE": "cpu",
    "INSPECTOR_MODEL__PRECISION": "fp32",  # "auto" is bf16 on CPUs with native bf16; tests compare exactly
    "INSPECTOR_MODEL__BATCH_SIZE": "8",
    "INSPECTOR_MODEL__ALLOW_RANDOM_WEIGHTS": "true",
    # these tests exercise the pipeline with an untrained Bayes-PFL; the day-one fallback has its own tests
    "INSPECTOR_MODEL__FALLBACK": "none",
    "INSPECTOR_WATCH__STABLE_SECONDS": "0.5",
    "INSPECTOR_WATCH__RESCAN_SECONDS": "2",
    "INSPECTOR_WATCH__LEASE_SECONDS": "4",
    "INSPECTOR_WATCH__IDLE_SECONDS": "0.2",
    "INSPECTOR_WATCH__DECODE_THREADS": "2",
    "INSPECTOR_MUSC__POOL_DIR": "",  # MuSc's rolling pools in memory: tests write nothing to the home cache
}


def cli_env(db_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    env.update(FAST_ENV)
    env.update({"INSPECTOR_DATABASE__URL": db_url, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def start_cli(args: list[str], db_url: str, cwd: Path, prefix: list[str] | None = None, **extra: str):
    with open(cwd / f"cli-{time.monotonic_ns()}.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([*(prefix or []), sys.executable, "-m", "inspector.cli", *args], cwd=cwd,
                                env=cli_env(db_url, **extra), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def run_cli(args: list[str], db_url: str, cwd: Path, timeout: float = 300, prefix: list[str] | None = None,
            env: dict[str, str] | None = None):
    return subprocess.run([*(prefix or []), sys.executable, "-m", "inspector.cli", *args], cwd=cwd,
                          env=cli_env(db_url, **(env or {})), capture_output=True, text=True, timeout=timeout,
                          check=False)


def kill9(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def small_png(path: Path, seed: int, size: int = 48) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, format="PNG")


def drop_atomically(path: Path, seed: int) -> None:
    """What a well-behaved camera does: write a temporary name, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    small_png(tmp, seed)
    tmp.rename(path)


def result_counts(db_url: str) -> dict[str, int]:
    """path -> number of results."""
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(select(images.c.path, func.count(results.c.id)).join(
            results, results.c.image_id == images.c.id, isouter=True).group_by(images.c.path)).all()
    engine.dispose()
    return {r[0]: r[1] for r in rows}


def table_rows(db_url: str, table) -> list[dict]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(table)).mappings()]
    engine.dispose()
    return rows


def image_rows(db_url: str) -> dict[str, dict]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(select(images).order_by(images.c.id)).mappings().all()
    engine.dispose()
    return {r["path"]: dict(r) for r in rows}


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def db_ping(db_url: str) -> bool:
    try:
        engine = create_engine(db_url)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001
        return False


def image_list(db_url: str) -> list[dict]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(select(images).order_by(images.c.id)).mappings().all()
    engine.dispose()
    return [dict(r) for r in rows]


def schema_ready(db_url: str) -> bool:
    try:
        image_list(db_url)
        return True
    except Exception:  # noqa: BLE001 - not created yet
        return False


def scored_database(root: Path, count: int, seed: int, size: int = 64, class_name: str = "screw") -> str:
    """A SQLite database filled by a real `inspector watch --once` over ``count`` generated images."""
    folder = root / "line1"
    folder.mkdir()
    for i in range(count):
        small_png(folder / f"part_{i}.png", seed + i, size=size)
    db = f"sqlite:///{root / 'inspector.sqlite'}"
    done = run_cli(["watch", str(folder), "--class-name", class_name, "--once"], db, root)
    assert done.returncode == 0, done.stderr[-2000:]
    return db


def run(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("INSPECTOR_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "inspector.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def write_images(folder: Path, count: int = 2) -> list[Path]:
    from inspector.bench import synthetic_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(synthetic_images(count, size=96, seed=3)):
        paths.append(folder / f"img {i}.png")
        image.save(paths[-1])
    return paths


class Broker:
    """A real mosquitto on a free local port."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.conf = tmp_path / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.process = None

    def start(self):
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for(self._up, 20, 0.1, "mosquitto")

    def _up(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self):
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def mqtt_subscriber(port: int, received: list):
    """A paho client on the local broker that appends (topic, JSON payload) of every inspector/# message."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: received.append((m.topic, json.loads(m.payload)))
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("inspector/#", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client
