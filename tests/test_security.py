"""Security hardening (issue 12, items 1-5): no code runs from a model file or checkpoint, the dashboard's
path guard cannot be widened, the password gate, bind addresses, and archive bombs.

Every attack here is a real crafted file: a TorchScript archive whose ``__setstate__`` writes a file, pickles
whose ``__reduce__`` would, symlinks swapped in after registration, zip and tar.gz bombs.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from inspector.backbone import BackboneError, BackboneSpec, load_backbone, read_openai_state_dict

from .pgcluster import free_port


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _jit_state(path: Path) -> dict[str, torch.Tensor]:
    """What ``torch.jit.load`` (which runs the archive's code) gives: the reference for our reader."""
    return _quiet(torch.jit.load, str(path), map_location="cpu").state_dict()


def _assert_same_state(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


# --- 1. no code execution from model files ----------------------------------------------------------------------


class _Block(nn.Module):
    """Parameters, an int buffer, a plain tensor attribute (not state) and a view into another storage."""

    def __init__(self, width: int, mask: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.scale = nn.Parameter(torch.randn(width, 3).t())  # non-contiguous strides
        self.register_buffer("steps", torch.arange(4, dtype=torch.int64))
        self.register_buffer("window", torch.randn(10)[3:8])  # storage offset 3
        self.attn_mask = mask  # OpenAI's blocks keep their mask as a plain attribute: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.attn_mask.sum() + self.scale.sum() + self.window.sum()


class _OpenAIStyle(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        mask = torch.full((3, 3), float("-inf")).triu(1)
        self.blocks = nn.ModuleList([_Block(width, mask) for _ in range(2)])
        self.proj = nn.Parameter(torch.randn(width, 4).half())
        self.head = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4)
        self.tied.weight = self.head.weight  # one storage, two keys
        self.register_buffer("input_resolution", torch.tensor(224))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.tied(self.head(x @ self.proj.float()))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive_read_without_running_equals_jit_load(tmp_path, how):
    from inspector.backbone import read_torchscript_state_dict

    torch.manual_seed(0)
    model = _OpenAIStyle().eval()
    jit = (_quiet(torch.jit.script, model) if how == "script"
           else _quiet(torch.jit.trace, model, torch.randn(2, 8)))
    path = tmp_path / "model.pt"
    _quiet(torch.jit.save, jit, str(path))
    _assert_same_state(read_torchscript_state_dict(path), _jit_state(path))


def test_open_clip_model_as_torchscript_reads_as_jit_load_did(tmp_path):
    """A whole CLIP (OpenAI key layout) saved as TorchScript, as OpenAI ships its checkpoints."""
    import open_clip

    from inspector.backbone import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    clip = _quiet(open_clip.create_model, "test-tiny").eval()
    mask = clip._buffers.pop("attn_mask")
    clip.attn_mask = mask  # a plain attribute, as in OpenAI's modules: not part of the state dict
    path = tmp_path / "ViT-tiny.pt"
    _quiet(torch.jit.save, _quiet(torch.jit.script, clip), str(path))
    reference = _jit_state(path)
    _assert_same_state(read_openai_state_dict(path), reference)
    backbone = _quiet(load_backbone, BackboneSpec(arch="test-tiny", pretrained=str(path), model_config="test-tiny",
                                                  image_size=224, feature_layers=(1, 2)))
    assert not backbone.spec.is_random


class _Evil(nn.Module):
    """A module whose ``__setstate__`` (TorchScript, run by ``torch.jit.load``) creates a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.proj = nn.Parameter(torch.zeros(2, 2))
        self.path = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj

    @torch.jit.export
    def __getstate__(self):
        return (self.proj, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]):
        self.proj = state[0]
        self.path = state[1]
        self.training = state[2]
        self.proj = state[0] + 0.0 * torch.from_file(self.path, shared=True, size=4).view(2, 2)


def test_torchscript_setstate_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ViT-L-14-336px.pt"
    _quiet(torch.jit.save, _quiet(torch.jit.script, _Evil(str(marker))), str(path))
    _quiet(torch.jit.load, str(path))  # the attack is real: torch.jit.load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(BackboneError, match="__setstate__"):
        read_openai_state_dict(path)
    for fmt in ("auto", "openai"):
        with pytest.raises(BackboneError, match="__setstate__"):
            _quiet(load_backbone, BackboneSpec(arch="test-tiny", pretrained=str(path), clip_format=fmt))
    assert not marker.exists()


class _Payload:
    """Unpickled, it opens (creates) the marker file: what a crafted ``__reduce__`` does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _torchscript_zip(path: Path, data_pkl: bytes) -> None:
    """An archive laid out as TorchScript (code/, constants.pkl) around a crafted ``data.pkl``."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n")
        z.writestr("archive/constants.pkl", pickle.dumps(()))
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")


def test_reduce_payload_in_torchscript_data_pkl_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "clip.pt"
    _torchscript_zip(path, pickle.dumps({"visual.proj": _Payload(marker)}, protocol=2))
    pickle.loads(zipfile.ZipFile(path).read("archive/data.pkl"))["visual.proj"].close()  # the payload is real
    assert marker.exists()
    marker.unlink()
    with pytest.raises(BackboneError, match="refusing"):
        read_openai_state_dict(path)
    with pytest.raises(BackboneError, match="refusing"):
        _quiet(load_backbone, BackboneSpec(arch="test-tiny", pretrained=str(path)))
    assert not marker.exists()


def test_reduce_payload_in_a_plain_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "clip.pt"
    torch.save({"visual.proj": _Payload(marker)}, path)
    for fmt in ("auto", "openai"):
        with pytest.raises(BackboneError):
            _quiet(load_backbone, BackboneSpec(arch="test-tiny", pretrained=str(path), clip_format=fmt))
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    import re

    package = Path(__file__).parents[1] / "inspector"
    calls = [(p, m.group(0)) for p in package.rglob("*.py")
             for m in re.finditer(r"torch\.load\(.*", p.read_text(encoding="utf-8"))]
    assert calls
    assert all("weights_only=True" in call for _, call in calls), calls
    assert not [p for p in package.rglob("*.py") if "torch.jit.load(" in p.read_text(encoding="utf-8")]


def test_resume_checkpoint_with_a_payload_is_refused(tmp_path):
    from inspector.detectors.bayes_pfl.train import load_checkpoint

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"head": {}, "state": _Payload(marker)}, checkpoint)
    with pytest.raises(ValueError, match="refusing"):
        load_checkpoint(checkpoint)
    assert not marker.exists()
    buffer = io.BytesIO()
    torch.save({"head": {"w": torch.ones(2)}, "state": {"epoch": 1, "history": [{"loss": 0.5}]}}, buffer)
    (tmp_path / "plain.pt").write_bytes(buffer.getvalue())
    assert load_checkpoint(tmp_path / "plain.pt")["state"]["epoch"] == 1


# --- 2. the dashboard's path guard cannot be widened ------------------------------------------------------------


@pytest.fixture()
def store(tmp_path):
    from inspector.store import open_store

    engine = open_store(f"sqlite:///{tmp_path / 'guard.sqlite'}", auto_upgrade=True)
    yield engine
    engine.dispose()


def _png(path: Path, value: int = 128) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)
    return path


def _register(engine, source_id, path: Path, error: str | None = None) -> None:
    import hashlib

    from inspector.store.queue import register_file

    data = path.read_bytes() if error is None else None
    register_file(engine, source_id, "part", str(path), hashlib.sha256(data).hexdigest() if data else None,
                  len(data) if data else None, path.stat().st_mtime_ns if data else None, error=error)


def test_scored_file_replaced_by_a_symlink_is_not_shown(store, tmp_path):
    from inspector.store.review import ImageNotAllowed, image_path_allowed, read_allowed_image

    tmp_path = tmp_path.resolve()
    image = _png(tmp_path / "scored" / "a.png")
    secret = _png(tmp_path / "outside" / "secret.png", 7)
    _register(store, None, image)
    assert image_path_allowed(store, str(image)) and read_allowed_image(store, str(image)) == image.read_bytes()
    image.unlink()
    image.symlink_to(secret)
    assert not image_path_allowed(store, str(image))
    with pytest.raises(ImageNotAllowed):
        read_allowed_image(store, str(image))


def test_scored_file_replaced_in_place_or_an_error_row_is_not_shown(store, tmp_path):
    from inspector.store.review import ImageNotAllowed, image_path_allowed, read_allowed_image

    tmp_path = tmp_path.resolve()
    image = _png(tmp_path / "scored" / "a.png")
    _register(store, None, image)
    _png(image, 3)  # other content under the same name: not the image that was scored
    with pytest.raises(ImageNotAllowed, match="changed"):
        read_allowed_image(store, str(image))
    unreadable = _png(tmp_path / "elsewhere" / "b.png")
    _register(store, None, unreadable, error="cannot read the file")  # a row with no source and no content
    assert not image_path_allowed(store, str(unreadable))
    assert not image_path_allowed(store, str(tmp_path / "scored" / ".." / "scored" / "a.png"))


def test_watched_folder_swapped_for_a_symlink_grants_nothing(store, tmp_path):
    from inspector.store.queue import ensure_source
    from inspector.store.review import ImageNotAllowed, image_path_allowed, read_allowed_image

    tmp_path = tmp_path.resolve()
    watched = tmp_path / "line1"
    image = _png(watched / "a.png")
    _register(store, ensure_source(store, str(watched), "part"), image)
    assert image_path_allowed(store, str(image)) and read_allowed_image(store, str(image))
    outside = tmp_path / "private"
    _png(outside / "a.png", 9)
    watched.rename(tmp_path / "line1.old")
    watched.symlink_to(outside)  # the stored root now resolves to the private folder
    assert not image_path_allowed(store, str(image))
    assert not image_path_allowed(store, str(outside / "a.png"))
    with pytest.raises(ImageNotAllowed):
        read_allowed_image(store, str(image))


def test_symlink_or_fifo_inside_a_watched_folder_is_not_opened(store, tmp_path):
    import os

    from inspector.store.queue import ensure_source
    from inspector.store.review import ImageNotAllowed, read_allowed_image

    tmp_path = tmp_path.resolve()
    watched = tmp_path / "line1"
    watched.mkdir()
    ensure_source(store, str(watched), "part")
    secret = _png(tmp_path / "private" / "secret.png")
    (watched / "link.png").symlink_to(secret)
    os.mkfifo(watched / "fifo.png")
    with pytest.raises(ImageNotAllowed, match="outside"):
        read_allowed_image(store, str(watched / "link.png"))
    with pytest.raises(ImageNotAllowed, match="regular file"):
        read_allowed_image(store, str(watched / "fifo.png"))  # returns at once: never blocks on the FIFO


# --- 3. password gate, reviewer names, secrets in `config show` -------------------------------------------------

APP = str(Path(__file__).parents[1] / "dashboard" / "app.py")


@pytest.fixture()
def dashboard(tmp_path, monkeypatch):
    """The real dashboard script (Streamlit's AppTest) on an empty SQLite store, with a non-ASCII password."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("INSPECTOR_DATABASE__URL", f"sqlite:///{tmp_path / 'dash.sqlite'}")
    monkeypatch.setenv("INSPECTOR_DASHBOARD__PASSWORD", "Grüße-密码")
    monkeypatch.delenv("INSPECTOR_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def test_non_ascii_attempts_are_refused_with_a_growing_delay_and_a_non_ascii_password_works(dashboard):
    import time

    timings = []
    for attempt in ("naïve-é", "再试一次", "still wrong"):
        started = time.perf_counter()
        dashboard.text_input(key="password").input(attempt).run()
        timings.append(time.perf_counter() - started)
        assert not dashboard.exception, dashboard.exception
        assert any("Wrong password" in e.value for e in dashboard.error)
        assert [t.key for t in dashboard.text_input] == ["password"]  # nothing behind the gate is shown
    assert timings[0] >= 0.25 and timings[1] >= 0.5 and timings[2] >= 1.0, timings
    dashboard.text_input(key="password").input("Grüße-密码").run()
    assert not dashboard.exception
    assert dashboard.text_input(key="reviewer") is not None


@pytest.mark.parametrize("name", ["\u200b", "\u2800\u2800", " \u200d\ufeff ", "\u3164", "\u00a0\u2003"])
def test_invisible_reviewer_names_are_refused(dashboard, name):
    dashboard.text_input(key="password").input("Grüße-密码").run()
    dashboard.text_input(key="reviewer").input(name).run()
    assert not dashboard.exception
    assert any("no visible" in w.value for w in dashboard.warning)
    dashboard.text_input(key="reviewer").input("ana\u200b").run()
    assert not any("no visible" in w.value for w in dashboard.warning)


def test_config_show_masks_secrets(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, INSPECTOR_DASHBOARD__PASSWORD="hunter2-ü",
               INSPECTOR_DATABASE__URL="postgresql+psycopg://line:s3cr3t@db.example/inspector")
    env.pop("INSPECTOR_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "inspector.cli", "config", "show"], cwd=tmp_path, env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout and "s3cr3t" not in done.stdout
    shown = json.loads(done.stdout)
    assert shown["dashboard"]["password"] == "***"
    assert shown["database"]["url"] == "postgresql+psycopg://line:***@db.example/inspector"


# --- 4. bind addresses --------------------------------------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port``, from /proc/net/tcp and tcp6 (state 0A = LISTEN)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(host)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
                found.add(str(ipaddress.ip_address(raw)))
    return found


@pytest.mark.parametrize("configured", [None, "0.0.0.0"])
def test_metrics_endpoint_binds_the_configured_address_loopback_by_default(tmp_path, configured):
    import os
    import subprocess
    import sys
    import time

    port = free_port()
    env = dict(os.environ)
    env.pop("INSPECTOR_CONFIG", None)
    if configured:
        env["INSPECTOR_WATCH__METRICS_ADDRESS"] = configured
    script = ("import time; from inspector.config import load_settings; from inspector.store import open_store; "
              "from inspector.pipeline import Metrics; s = load_settings(); "
              f"Metrics({port}, open_store('sqlite:///{tmp_path}/m.sqlite', auto_upgrade=True), "
              "s.watch.metrics_address); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while not _listening_addresses(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _listening_addresses(port) == {configured or "127.0.0.1"}
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("address, password, warned", [
    ("0.0.0.0", "", True), ("192.0.2.7", "", True), ("127.0.0.1", "", False), ("0.0.0.0", "s3cret", False)])
def test_dashboard_warns_when_serving_the_network_without_a_password(tmp_path, address, password, warned):
    import os
    import subprocess
    import sys

    env = dict(os.environ, INSPECTOR_DASHBOARD__PASSWORD=password,
               INSPECTOR_DATABASE__URL=f"sqlite:///{tmp_path / 'd.sqlite'}")
    env.pop("INSPECTOR_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "inspector.cli", "dashboard", "--address", address,
                             "--port", str(free_port())], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)
    lines = []
    try:
        while not lines or "dashboard on" not in lines[-1]:  # the warning comes first, before Streamlit starts
            lines.append(proc.stderr.readline())
            assert lines[-1], lines
    finally:
        proc.kill()
        proc.wait()
    text = "".join(lines)
    assert ("without a password" in text) == warned, text
