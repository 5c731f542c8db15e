"""The package as a user gets it from `pip install .` (not -e): a wheel built from a copy of the source,
installed into a fresh virtual environment (``--system-site-packages --no-deps``, so no dependency is
downloaded), then the installed `inspector` command creates the schema (`db upgrade` and automatically on
first use) and serves the dashboard from the files inside the installed package."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

from sqlalchemy import create_engine, inspect, text

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from .pgcluster import free_port
from .pipeline_helpers import FAST_ENV, wait_for

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
#: what pyproject.toml needs to build the package: the wheel holds nothing else
SOURCES = ["pyproject.toml", "README.md", "inspector", "migrations", "dashboard"]


def source_dir(package: str) -> Path:
    """The folder of a listed package, following [tool.setuptools.package-dir]."""
    mapped = PYPROJECT.get("package-dir", {})
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in mapped:
            return ROOT / mapped[prefix] / Path(*parts[n:])
    return ROOT / Path(*parts)


def test_every_subpackage_is_listed_in_pyproject():
    listed = PYPROJECT["packages"]
    missing = [str(source_dir(p).relative_to(ROOT)) for p in listed if not source_dir(p).is_dir()]
    assert not missing, f"pyproject.toml lists packages whose folder does not exist: {missing}"
    on_disk = {".".join(d.relative_to(ROOT).parts) for d in (ROOT / "inspector").rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))}
    unlisted = sorted(on_disk - set(listed))
    assert not unlisted, (f"add {unlisted} to [tool.setuptools] packages in pyproject.toml, or a non-editable "
                          "install leaves them out")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_") and k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _run(argv: list[str], cwd: Path, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, check=False, cwd=cwd, env=_clean_env(**extra), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _tables(db: Path) -> tuple[set[str], str | None]:
    engine = create_engine(f"sqlite:///{db}")
    try:
        names = set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return names, version
    finally:
        engine.dispose()


def test_non_editable_install(tmp_path):
    from inspector.store.db import head_revision

    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "venv"
    # --without-pip: the system's pip (a site package) installs into the venv it runs in
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], tmp_path)
    python, command = venv / "bin" / "python", str(venv / "bin" / "inspector")
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(src)],
         tmp_path, PIP_DISABLE_PIP_VERSION_CHECK="1")
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        tmp_path).stdout.strip())
    assert purelib != Path(sysconfig.get_path("purelib"))
    located = _run([str(python), "-c", "import inspector; print(inspector.__file__)"], tmp_path).stdout.strip()
    assert Path(located) == purelib / "inspector" / "__init__.py"  # the copy, not the checkout

    # every source file and the data files ended up in the installed package
    installed = {p.relative_to(purelib / "inspector") for p in (purelib / "inspector").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    expected = {p.relative_to(src / "inspector") for p in (src / "inspector").rglob("*") if p.is_file()}
    for folder, package in (("migrations", "_migrations"), ("dashboard", "_dashboard")):
        expected |= {package / p.relative_to(src / folder) for p in (src / folder).rglob("*") if p.is_file()}
    assert sorted(map(str, expected - installed)) == []

    # `inspector db upgrade` runs the installed Alembic scripts
    done = _run([command, "db", "upgrade", "--database", f"sqlite:///{tmp_path / 'up.sqlite'}"], tmp_path)
    head = _run([str(python), "-c", "from inspector.store.db import head_revision; print(head_revision())"],
                tmp_path).stdout.strip()
    assert head and head == head_revision()  # the installed migrations are the checkout's
    assert f"database at revision {head}" in done.stdout
    names, version = _tables(tmp_path / "up.sqlite")
    assert {"images", "results"} <= names and version == head

    # the schema is created automatically on first use
    (tmp_path / "empty").mkdir()
    _run([command, "watch", str(tmp_path / "empty"), "--class-name", "screw", "--once",
          "--database", f"sqlite:///{tmp_path / 'auto.sqlite'}"], tmp_path, **FAST_ENV)
    names, version = _tables(tmp_path / "auto.sqlite")
    assert {"images", "results"} <= names and version == head

    # `inspector dashboard` serves the app file shipped inside the installed package
    port = free_port()
    with open(tmp_path / "dashboard.log", "w") as log:
        process = subprocess.Popen([command, "dashboard", "--port", str(port), "--database",
                                    f"sqlite:///{tmp_path / 'up.sqlite'}"], cwd=tmp_path, env=_clean_env(),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        assert process.poll() is None, (tmp_path / "dashboard.log").read_text()
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok"
        except OSError:
            return False

    try:
        wait_for(healthy, 90, what="streamlit health")
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")  # `dashboard` execs streamlit
        assert str(purelib / "inspector" / "_dashboard" / "app.py").encode() in argv
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
