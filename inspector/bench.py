"""``inspector bench``: speed and memory of the scoring engine, as ratios to a floor measured in the same run.

Each detector is timed on the same synthetic images (resized to its own input size), over the configured
batch sizes, on the current device:

* ``floor``        its backbone alone (one vision forward, global embedding only): nothing can be faster
* the detector     ``aa-clip``, ``winclip`` (zero-shot, and ``winclip k=K`` few-shot on K references), or for
                   Bayes-PFL ``exact R=1``, ``exact R=10`` (the paper's R) and ``class-cache R=10`` (text
                   embeddings from a class prototype, computed once per class); a detector with a
                   ``bench_plan(pixels, class_names)`` method times its own cases instead (MuSc: the batch
                   against pools of N - 1 earlier images, ``musc`` at its configured pool and ``musc N=..``),
                   and its ``bench_report()`` goes into the report as ``detector_report``
* ``backbone (R)``, ``<main case> (R)``  with ``runtimes`` (``--runtimes onnxruntime,openvino``): the vision
                   graph alone and the main case with the encoder calls in the exported runtime R (the model
                   exported to a temporary folder first, fp32; the head in torch), with their ratio to the torch
                   fp32 floor, and ``runtime_comparison``: their agreement with torch fp32 on the same images
* ``pipeline``     `watch --once` end to end on PNG files (640 px) at the largest batch size: intake, hashing,
                   decoding, scoring, map encoding and SQLite writes, with the same loaded model; its ratio
                   to the detector case at that batch size is the pipeline's overhead

Timings start from preprocessed pixels on the device (decoding is I/O and the same for every case), take
the median of ``repeats`` runs after one warm-up, and synchronise CUDA. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA (weights included) and the process's peak resident set
size on CPU (weights and libraries included, sampled every 2 ms while the case runs). The class-cache agreement with the exact path is the Spearman correlation of
image scores and the largest absolute map difference over the bench images. With random weights these
describe the arithmetic, not accuracy.

Precision (``[model] precision``, ``inspector.runtime``): the cases above run in the precision the
setting resolves to on this device (``precision`` in the report; "auto" is bf16 on CUDA and on CPUs with
native bf16, fp32 elsewhere). The floor and the detector's main case are also timed in the other one of
fp32 / bf16 (named "floor (fp32)", "exact R=10 (bf16)", ...), so ``precision_comparison`` gives the bf16
speed-up over fp32 measured in the same run, and the agreement of bf16 with fp32 on the same images
(``agreement_images`` of them, each run from the same fresh state): Spearman of image scores, max and mean
absolute difference of the probability maps (what is stored and thresholded), max difference of the
detector's own map and of image scores, the dtypes of the bf16 outputs, and how many pass/fail decisions
flip at a threshold. A bench has no class threshold: the threshold is a quantile (the median by default)
of the fp32 image scores, and the report says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import runtime
from .detectors.base import Detector, Prediction
from .metrics import spearman


def synthetic_images(count: int, size: int = 640, seed: int = 0) -> list[Image.Image]:
    """Smooth random textures with a bright blob: cheap, deterministic, not constant."""
    rng = np.random.default_rng(seed)
    images = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(count):
        base = rng.uniform(60, 180, size=3)
        waves = np.sin(2 * np.pi * (rng.uniform(1, 6) * xx + rng.uniform(1, 6) * yy))[..., None] * 25
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.03, 0.1)
        blob = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)[..., None] * 60
        noise = rng.normal(0, 6, size=(size, size, 3))
        images.append(Image.fromarray(np.clip(base + waves + blob + noise, 0, 255).astype(np.uint8)))
    return images


class _PeakRSS:
    """Peak resident set size (bytes) of this process while the context is open, from /proc (Linux)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * self._page
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> _PeakRSS:  # noqa: PYI034 - typing.Self needs Python 3.11
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Case:
    name: str
    batch_size: int
    ms_per_image: float
    images_per_s: float
    peak_memory_mb: float
    ratio_to_floor: float | None = None
    precision: str = ""
    ratio_to_fp32_floor: float | None = None


def _time(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> tuple[float, float]:
    """(median seconds, peak memory MB) of ``fn`` after ``warmup`` untimed calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with _PeakRSS() as rss:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = rss.peak / 2**20
    return statistics.median(times), peak


def run_bench(model: Detector, batch_sizes: list[int], repeats: int, samples: int,
              progress: Callable[[str], None] | None = None, references: int = 0,
              compare_precision: bool = True, agreement_images: int = 8,
              threshold_quantile: float = 0.5, parity_device: str | None = None,
              runtimes: Sequence[str] = ()) -> dict[str, Any]:
    """Time ``model`` (any detector); ``samples`` is Bayes-PFL's R; ``references``: WinCLIP's few-shot
    case on that many synthetic normal references (0: zero-shot only). ``compare_precision``: also time the
    floor and the main case in the other of fp32 / bf16 and measure their agreement on
    ``agreement_images`` images (decisions at the ``threshold_quantile`` quantile of the fp32 scores).
    ``parity_device``: also compare the exact path in fp32 with the same model on that device (``"cpu"`` on a
    GPU machine: CUDA-vs-CPU parity). ``runtimes``: also time the floor and the main case with the encoder
    calls in these exported runtimes ("onnxruntime", "openvino"; the model exported to a temporary folder
    first) and compare them with torch fp32 (``runtime_comparison``)."""
    with contextlib.ExitStack() as stack:
        graphs = _exported_graphs(model, runtimes, stack, progress)
        return _run_bench(model, batch_sizes, repeats, samples, progress, references, compare_precision,
                          agreement_images, threshold_quantile, parity_device, graphs)


def _run_bench(model: Detector, batch_sizes: list[int], repeats: int, samples: int,
               progress: Callable[[str], None] | None, references: int, compare_precision: bool,
               agreement_images: int, threshold_quantile: float, parity_device: str | None,
               graphs: dict[str, Any]) -> dict[str, Any]:
    device = model.device
    setting = getattr(model, "precision", None)
    resolved = runtime.resolve(setting, device) if setting is not None else "fp32"
    compare = compare_precision and setting is not None and device.type in ("cpu", "cuda")
    low = resolved if resolved in ("bf16", "fp16") else "bf16"
    other = low if resolved == "fp32" else "fp32"
    count = max(max(batch_sizes), 4)
    pixels_all = torch.stack([model.to_input(im) for im in synthetic_images(max(count, agreement_images))]).to(device)
    class_name = "bench part"
    cases: list[Case] = []
    main_case = model.bench_main_case(samples)

    def time_case(label: str, fn: Callable[[], Any], n: int, precision: str = resolved) -> None:
        if progress:
            progress(f"{model.name}: {label}, batch {n}")
        # the first case of a process also pays for the allocator's first growth: warm it up twice
        seconds, peak = _time(fn, repeats, device, warmup=2 if not cases else 1)
        cases.append(Case(label, n, seconds * 1000 / n, n / seconds, peak, precision=precision))

    for n in batch_sizes:
        pixels = pixels_all[:n]
        names = [class_name] * n
        plan = [("floor", partial(model.encode_floor, pixels))]
        plan += model.bench_plan(pixels, names, samples, references)
        for label, fn in plan:
            time_case(label, fn, n)
            if compare and label in ("floor", main_case):  # the same call in the other precision
                with _precision(model, other):
                    time_case(f"{label} ({other})", fn, n, precision=other)
        main = dict(plan)[main_case]
        for name, exported in graphs.items():  # the same calls with the encoders in an exported runtime
            with _using(model, exported):
                time_case(f"backbone ({name})", partial(vision_graph, model, pixels), n, precision="fp32")
                time_case(f"{main_case} ({name})", main, n, precision="fp32")
    floors = {c.batch_size: c.ms_per_image for c in cases if c.name == "floor"}
    fp32_floors = {c.batch_size: c.ms_per_image for c in cases
                   if c.name.startswith("floor") and c.precision == "fp32"}
    for c in cases:
        c.ratio_to_floor = c.ms_per_image / floors[c.batch_size]
        if c.batch_size in fp32_floors:
            c.ratio_to_fp32_floor = c.ms_per_image / fp32_floors[c.batch_size]

    options = model.sample_options(samples)
    names = [class_name] * pixels_all.shape[0]
    # the fp32 prediction both comparisons below measure against, made once
    reference = fp32_reference(model, pixels_all, names, **options) if compare or graphs else None
    comparison = None
    if compare:
        if progress:
            progress(f"{model.name}: fp32 vs {low} agreement on {pixels_all.shape[0]} images")
        comparison = {
            "reference": "fp32", "low": low,
            "speedup": _speedups(cases, low),
            "agreement": precision_agreement(model, pixels_all, names, low, quantile=threshold_quantile,
                                             reference=reference, **options),
        }
    runtime_comparison = {}
    if graphs:
        for name, exported in graphs.items():
            if progress:
                progress(f"{model.name}: {name} vs torch fp32 agreement on {pixels_all.shape[0]} images")
            with _using(model, exported):
                got = _fresh_predict(model, pixels_all, names, **options).cpu()
            runtime_comparison[name] = {
                "images": int(pixels_all.shape[0]), "export_format": exported.manifest["export_format"],
                "versions": exported.manifest["runtime_versions"],
                "speed": [{"case": c.name, "batch_size": c.batch_size, "ms_per_image": c.ms_per_image,
                           "ratio_to_fp32_floor": c.ratio_to_fp32_floor}
                          for c in cases if c.name.endswith(f"({name})")],
                "agreement": prediction_agreement(reference, got, threshold_quantile, reference="torch fp32")}
    parity = None
    if parity_device is not None:
        if progress:
            progress(f"{model.name}: {device} vs {parity_device} parity (fp32) on {agreement_images} images")
        parity = device_agreement(model, pixels_all[:agreement_images], [class_name] * agreement_images,
                                  parity_device, quantile=threshold_quantile, **options)
    with model.eval_session():  # a detector with state (MuSc's stored pools) keeps the bench's images to itself
        pipeline, latency = pipeline_case(model, max(batch_sizes), count=max(6 * max(batch_sizes), 24))
    exact = next(c for c in cases if c.name == main_case and c.batch_size == max(batch_sizes))
    pipeline.ratio_to_floor = pipeline.ms_per_image / floors[pipeline.batch_size]
    pipeline.precision = resolved
    cases.append(pipeline)
    return {
        "detector": model.name,
        "main_case": main_case,
        "pipeline_overhead": pipeline.ms_per_image / exact.ms_per_image - 1.0,
        "decision_latency": latency,
        "device": device_name(device),
        "precision": resolved,
        "precision_setting": setting,
        "cpu_bf16": runtime.cpu_bf16().as_dict() if device.type == "cpu" else None,
        "backbone": model.provenance.get("backbone"),
        "random_weights": bool(model.provenance.get("random_weights", True)),
        "image_size": model.image_size,
        "samples": samples,
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cases": [c.__dict__ for c in cases],
        "precision_comparison": comparison,
        "device_parity": parity,
        "runtime_comparison": runtime_comparison or None,
        "detector_report": model.bench_report(pixels_all[:count], [class_name] * count, samples),
    }


def _exported_graphs(model: Detector, runtimes: Sequence[str], stack: contextlib.ExitStack,
                     progress: Callable[[str], None] | None) -> dict[str, Any]:
    """runtime -> the model's graphs exported to a temporary folder (one export per format) and opened in it."""
    if not runtimes:
        return {}
    import tempfile

    from .export import export_detector
    from .exported import RUNTIMES, ExportError, attach, detach

    unknown = [r for r in runtimes if r not in RUNTIMES[1:]]
    if unknown:
        raise ExportError(f"--runtimes: unknown {', '.join(unknown)} (known: {', '.join(RUNTIMES[1:])})")
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="inspector-bench-export-")))
    graphs, setting = {}, model.precision
    for name in runtimes:
        fmt = "onnx" if name == "onnxruntime" else "openvino"
        if not (folder / fmt).exists():
            if progress:
                progress(f"{model.name}: exporting the scoring graphs ({fmt})")
            export_detector(model, folder / fmt, fmt)
        graphs[name] = attach(model, folder / fmt, name).exported
        detach(model)
        model.precision = setting
    return graphs


def vision_graph(model: Detector, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The vision graph alone, as scoring calls it (without autograd: an exported graph serves only such
    calls, so with autograd on this would time torch instead)."""
    with torch.inference_mode():
        return model.encode_graph("vision", pixels)


@contextlib.contextmanager
def _using(model: Detector, exported: Any):
    """``model`` with its encoder calls in ``exported`` (and fp32 beside them), as it was afterwards."""
    saved = model.exported
    model.exported = exported
    try:
        with _precision(model, "fp32"):
            yield model
    finally:
        model.exported = saved


def _speedups(cases: list[Case], low: str) -> list[dict[str, Any]]:
    """fp32 ms/image over ``low`` ms/image for each case timed in both, per batch size."""
    by_key: dict[tuple[str, int], dict[str, float]] = {}
    for c in cases:
        base = c.name.removesuffix(f" ({c.precision})")
        by_key.setdefault((base, c.batch_size), {})[c.precision] = c.ms_per_image
    return [{"case": name, "batch_size": n, "fp32_ms_per_image": t["fp32"], f"{low}_ms_per_image": t[low],
             "speedup": t["fp32"] / t[low]}
            for (name, n), t in by_key.items() if "fp32" in t and low in t]


def _fresh_predict(model: Detector, pixels: torch.Tensor, names: list[str], **options: Any) -> Prediction:
    """One prediction from the state a fresh model has: caches cleared, and nothing learned from the call
    (``Detector.isolated``: MuSc scores each image against the other images of the call only)."""
    model.clear_caches()
    try:
        with model.isolated():
            return model.predict_tensors(pixels, names, **options)
    finally:
        model.clear_caches()


def precision_agreement(model: Detector, pixels: torch.Tensor, names: list[str], low: str = "bf16",
                        quantile: float = 0.5, threshold: float | None = None, reference: Prediction | None = None,
                        **options: Any) -> dict[str, Any]:
    """The agreement of ``model`` in ``low`` precision with itself in fp32 on the same images
    (``reference``: that fp32 prediction when the caller has it, ``fp32_reference``).

    Decisions (score > threshold) are compared at ``threshold`` when given (a class threshold), else at the
    ``quantile`` quantile of the fp32 image scores (the median by default), which is recorded."""
    if reference is None:
        reference = fp32_reference(model, pixels, names, **options)
    with _precision(model, low):
        got = _fresh_predict(model, pixels, names, **options)
    dtypes = {f: str(getattr(got, f).dtype).removeprefix("torch.")
              for f in ("anomaly_map", "probability_map", "image_score", "text_score", "topk_score")}
    return {"images": int(pixels.shape[0]), "precision": low,
            **prediction_agreement(reference, got.cpu(), quantile, threshold, reference="fp32"),
            "output_dtypes": dtypes}


@contextlib.contextmanager
def _precision(model: Detector, precision: str):
    """``model`` computing in ``precision``, back in its own afterwards."""
    saved = model.precision
    model.precision = precision
    try:
        yield model
    finally:
        model.precision = saved


def fp32_reference(model: Detector, pixels: torch.Tensor, names: list[str], **options: Any) -> Prediction:
    """The exact path in fp32 on the model's device (in torch, unless an export is attached), on the CPU:
    what the precision, runtime and device comparisons measure against."""
    with _precision(model, "fp32"):
        return _fresh_predict(model, pixels, names, **options).cpu()


def device_agreement(model: Detector, pixels: torch.Tensor, names: list[str], other: str | torch.device = "cpu",
                     quantile: float = 0.5, **options: Any) -> dict[str, Any]:
    """The exact path in fp32 on the model's device against the same model moved to ``other`` (CUDA vs CPU
    parity: same weights, same images, same options); the model is back on its device afterwards."""
    home, other = model.device, torch.device(other)
    ref = fp32_reference(model, pixels.to(home), names, **options)
    try:
        model.to(other)
        got = fp32_reference(model, pixels.to(other), names, **options)
    finally:
        model.to(home)
    return {"images": int(pixels.shape[0]), "devices": [str(home), str(other)], "precision": "fp32",
            **prediction_agreement(ref, got, quantile, reference=str(home))}


def prediction_agreement(ref: Prediction, got: Prediction, quantile: float = 0.5, threshold: float | None = None,
                         reference: str = "fp32") -> dict[str, Any]:
    """How far ``got`` is from ``ref`` (both on the CPU, the same images): Spearman of the image scores, map
    and score differences, and the pass/fail decisions that flip at ``threshold`` (a class threshold) or, when
    none is given, at the ``quantile`` quantile of the reference's image scores."""
    if threshold is None:
        cut = float(torch.quantile(ref.image_score.double(), quantile))
        source = (f"quantile {quantile:g} of the {reference} image scores (no class threshold in a bench): "
                  "decisions next to it are the likeliest to flip")
    else:
        cut, source = float(threshold), "given"
    prob = (ref.probability_map - got.probability_map).abs()
    return {
        "spearman_image_score": spearman(ref.image_score, got.image_score),
        "max_abs_map_diff": float(prob.max()),
        "mean_abs_map_diff": float(prob.mean()),
        "max_abs_anomaly_map_diff": float((ref.anomaly_map - got.anomaly_map).abs().max()),
        "max_abs_image_score_diff": float((ref.image_score - got.image_score).abs().max()),
        "threshold": cut,
        "threshold_source": source,
        "decision_flips": int(((ref.image_score > cut) != (got.image_score > cut)).sum()),
    }


def precision_summary(report: dict[str, Any]) -> list[str]:
    """Human lines for a report's ``precision_comparison`` (empty when it has none)."""
    c = report.get("precision_comparison")
    if not c:
        return []
    low, a = c["low"], c["agreement"]
    lines = [f"{low} speed-up over fp32, {s['case']} batch {s['batch_size']}: {s['speedup']:.2f}x "
             f"({s['fp32_ms_per_image']:.1f} -> {s[f'{low}_ms_per_image']:.1f} ms/image)" for s in c["speedup"]]
    lines.append(f"{low} vs fp32 on {a['images']} images: Spearman {a['spearman_image_score']:.4f}, map diff max "
                 f"{a['max_abs_map_diff']:.2e} mean {a['mean_abs_map_diff']:.2e}, image-score diff max "
                 f"{a['max_abs_image_score_diff']:.2e}, {a['decision_flips']} decision(s) flip at "
                 f"{a['threshold']:.4f} ({a['threshold_source']})")
    return lines


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def side_by_side(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (detector case, batch size) from several ``run_bench`` reports made on the same images:
    ms/image, the detector's own backbone floor, and the ratio to it."""
    rows = []
    for report in reports:
        floors = {c["batch_size"]: c["ms_per_image"] for c in report["cases"] if c["name"] == "floor"}
        for c in report["cases"]:
            if c["name"].startswith(("floor", "pipeline")) or c["name"] == "exact R=1":
                continue
            rows.append({"detector": report["detector"], "case": c["name"], "backbone": report["backbone"],
                         "image_size": report["image_size"], "batch_size": c["batch_size"],
                         "ms_per_image": c["ms_per_image"], "floor_ms_per_image": floors[c["batch_size"]],
                         "ratio_to_floor": c["ms_per_image"] / floors[c["batch_size"]],
                         "peak_memory_mb": c["peak_memory_mb"], "precision": c.get("precision", "")})
    return rows


@contextlib.contextmanager
def _local_broker(folder: Path):
    """A mosquitto broker on a free loopback port for the run (None when the machine has none)."""
    import shutil
    import socket
    import subprocess

    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    try:
        import paho.mqtt.client  # noqa: F401 - the optional [mqtt] extra
    except ImportError:
        binary = None
    if binary is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _percentiles(values: list[float]) -> dict[str, float | int]:
    data = np.asarray(values, dtype=np.float64)
    return {"events": int(data.size), **{f"p{q}_ms": float(np.percentile(data, q)) for q in (50, 95, 99)}}


def pipeline_case(model: Detector, batch_size: int, count: int) -> tuple[Case, dict[str, Any]]:
    """Time `watch --once` on ``count`` PNG files with the already-loaded ``model`` as configured (its own
    options, e.g. Bayes-PFL's R, as the line would score; no load time), deciding
    each result and delivering its event to a real local MQTT broker when the machine has mosquitto:
    returns the case and the file-stable -> decision-delivered latency (p50, p95, p99)."""
    import datetime as dt
    import tempfile
    import threading

    from sqlalchemy import select

    from .config import OutputSettings
    from .delivery import Dispatcher
    from .intake import Intake, WatchedFolder
    from .pipeline import register_model_version
    from .store.db import open_store
    from .store.decisions import DecisionPolicy
    from .store.queue import pending_count
    from .store.schema import images, results
    from .worker import Worker

    with tempfile.TemporaryDirectory(prefix="inspector-bench-") as tmp:
        folder = Path(tmp) / "line"
        folder.mkdir()
        for i, image in enumerate(synthetic_images(count, size=640, seed=100)):
            image.save(folder / f"img_{i:04d}.png")
        engine = open_store(f"sqlite:///{tmp}/bench.sqlite", auto_upgrade=True)
        latency: dict[str, Any] = {"skipped": "no mosquitto (or paho-mqtt) on this machine"}
        try:
            with _local_broker(Path(tmp)) as port, _PeakRSS() as rss:
                received: dict[int, dt.datetime] = {}
                stop = threading.Event()
                dispatcher = subscriber = None
                if port is not None:
                    import paho.mqtt.client as mqtt

                    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
                    subscriber.on_message = lambda c, u, m: received.setdefault(
                        json.loads(m.payload)["id"], dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))
                    subscriber.connect("127.0.0.1", port)
                    subscriber.subscribe("inspector/#", qos=1)
                    subscriber.loop_start()
                start = time.perf_counter()
                intake = Intake(engine, [WatchedFolder(folder, "bench part")], stable_seconds=0, rescan_seconds=0)
                version = register_model_version(engine, model, [intake.folders[0].source_id])
                policy = DecisionPolicy(provisional_after=1, sinks=("mqtt",) if port else ())
                if port is not None:
                    dispatcher = Dispatcher(engine, OutputSettings(mqtt_url=f"mqtt://127.0.0.1:{port}"),
                                            [intake.folders[0].source_id], interval=0.01)
                    threading.Thread(target=dispatcher.run, args=(stop,), daemon=True).start()
                intake.scan()
                intake.tick()
                worker = Worker(engine, {version: model}, batch_size=batch_size, policy=policy)
                worker.run(threading.Event(), until_empty=lambda: pending_count(engine) == 0, idle_seconds=0.05)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                if port is not None:
                    deadline = time.monotonic() + 30
                    while len(received) < count and time.monotonic() < deadline:
                        time.sleep(0.02)
                    stop.set()
                    subscriber.loop_stop()
                    with engine.connect() as conn:
                        found = {r.id: r.discovered_at for r in conn.execute(
                            select(results.c.id, images.c.discovered_at).join(images, images.c.id == results.c.image_id))}
                    latency = _percentiles([(received[i] - found[i]).total_seconds() * 1000
                                            for i in received if i in found])
                    latency["broker"] = "mosquitto on 127.0.0.1 (QoS 1)"
            if worker.stored != count:
                raise RuntimeError(f"pipeline bench stored {worker.stored} of {count} images")
        finally:
            engine.dispose()
    case = Case("pipeline (watch --once)", batch_size, seconds * 1000 / count, count / seconds, rss.peak / 2**20)
    return case, latency
