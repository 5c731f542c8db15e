"""Scoring with exported graphs: ``[model] runtime = "onnxruntime" | "openvino"`` (``inspector export`` writes them).

An export folder holds one graph per encoder call of a detector's scoring path (``Detector.scoring_graphs``:
the vision tower with the taps the detector reads, Bayes-PFL's text tower, WinCLIP's window tower) and a
manifest, ``export.json``:

    format, version      "inspector-export", 1
    model                the model version: name, digest and identity of what the graphs compute (the
                         version identity without its runtime, role and precision: the graphs are fp32)
    detector, input_size the detector kind and the square input side S of the vision graph
    normalisation        the preprocessing the pixels must have had (the detector's ``to_input``: mean, std)
    export_format, opset "onnx" (``<graph>.onnx``) or "openvino" (``<graph>.xml`` + ``.bin``), ONNX opset
    graphs               per graph: files with their SHA-256, input names and dtypes, output names
    check                the largest difference of each graph's outputs from torch on its tracing example

``attach(model, folder, runtime, identity)`` checks all of it against the loaded detector and the version it
is meant to score (a mismatch or an edited file is refused with an ``ExportError`` that says what differs),
opens one session per graph and sets ``model.exported``: from then on ``Detector.encode_graph`` runs the
exported graphs, and the detector's head, caches and post-processing run in torch as before.

Sessions run fp32 on the CPU: onnxruntime's CPU provider, OpenVINO's CPU plugin with
``INFERENCE_PRECISION_HINT = f32`` (OpenVINO would otherwise compute in bf16 on CPUs that have it), each
with ``torch.get_num_threads()`` threads. onnxruntime reads ONNX exports; OpenVINO reads both formats.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InspectorError
from .hashing import file_sha256

MANIFEST = "export.json"
FORMAT = "inspector-export"
FORMAT_VERSION = 1
RUNTIMES = ("torch", "onnxruntime", "openvino")
#: export format -> the runtimes that read it
READERS = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",)}
#: runtime -> (module it needs, the extra that installs it)
EXTRAS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino"), "onnx": ("onnx", "onnx")}
_DTYPES = {"float32": np.float32, "int64": np.int64}


class ExportError(InspectorError, ValueError):
    """An export that cannot be written, found or used for this model; the message says what and why."""


def require(module: str) -> None:
    """Refuse, with the pip line that fixes it, when an optional runtime is not installed."""
    name, extra = EXTRAS.get(module, (module, module))
    if importlib.util.find_spec(name) is None:
        raise ExportError(f"{module} is not installed: pip install 'inspector[{extra}]'")


def scoring_precision(model_settings: Any) -> str:
    """The precision a detector computes in under ``[model] runtime``: the setting itself with torch; with an
    exported runtime "fp32" (the graphs are fp32, and so is the head beside them), which "auto" means there
    and which bf16/fp16 contradict."""
    runtime, precision = model_settings.runtime, model_settings.precision
    if runtime == "torch":
        return precision
    if precision not in ("auto", "fp32"):
        from .config import ConfigError

        raise ConfigError(f"[model] runtime = \"{runtime}\" runs the exported fp32 graphs: [model] precision must be "
                          f"\"fp32\" or \"auto\", not \"{precision}\"")
    return "fp32"


def graph_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """What an export is checked against: a version identity without what does not change the graphs' numbers
    (the runtime that runs them, the role, the precision setting: exports are fp32)."""
    out = {k: v for k, v in identity.items() if k not in ("runtime", "role")}
    if isinstance(out.get("options"), Mapping):
        out["options"] = {k: v for k, v in out["options"].items() if k != "precision"}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{folder} is not an export (no {MANIFEST}; write one with `inspector export`)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable export manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not an inspector export manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ExportError(f"{path}: export format version {manifest.get('version')!r}; this inspector reads "
                          f"{FORMAT_VERSION} (export the model again)")
    return manifest


def find_export(path: str | os.PathLike, digest: str | None = None) -> Path:
    """The export folder ``[model] export`` names: the folder itself, or, for a folder of exports (one per
    version), the one whose manifest is for the version ``digest`` (its graph identity's digest)."""
    folder = Path(path).expanduser()
    if (folder / MANIFEST).is_file() or digest is None:
        return folder
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            if (child / MANIFEST).is_file():
                try:
                    if read_manifest(child)["model"]["graph_digest"] == digest:
                        return child
                except (ExportError, KeyError, TypeError):
                    continue
    raise ExportError(f"no export for this model version in {folder} (write one with `inspector export MODEL "
                      f"--format onnx {folder}/NAME`)")


def _differences(want: Mapping[str, Any], got: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(want) | set(got)):
        a, b = want.get(key), got.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key} ({b!r} in the export, {a!r} here)")
    return keys


def check_manifest(manifest: dict[str, Any], folder: Path, model: Any, runtime: str,
                   identity: Mapping[str, Any] | None) -> None:
    """Refuse an export that does not belong to ``model`` (and, given, the version ``identity``), that
    ``runtime`` cannot read, or whose files changed since it was written."""
    where = folder / MANIFEST
    fmt = manifest.get("export_format")
    if fmt not in READERS:
        raise ExportError(f"{where}: unknown export format {fmt!r}")
    if runtime not in READERS[fmt]:
        raise ExportError(f"{folder} is an {fmt} export, which [model] runtime = \"{runtime}\" cannot read "
                          f"(it reads: {', '.join(f for f, r in READERS.items() if runtime in r)})")
    if manifest.get("detector") != model.name:
        raise ExportError(f"{folder} was exported from a {manifest.get('detector')} model, not {model.name}")
    if identity is not None:
        want = graph_identity(identity)
        got = manifest.get("model", {}).get("identity") or {}
        if want != got:
            diff = _differences(want, got)
            raise ExportError(f"{folder} was exported from model version {manifest['model'].get('name')}, not this "
                              f"one: it differs in {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}. "
                              "Export this version again (`inspector export`)")
    if manifest.get("input_size") != model.image_size:
        raise ExportError(f"{folder}: graphs for {manifest.get('input_size')} px inputs, the model takes "
                          f"{model.image_size} px")
    graphs = model.scoring_graphs()
    entries = manifest.get("graphs") or {}
    if set(entries) != set(graphs):
        raise ExportError(f"{folder}: graphs {sorted(entries)}, the {model.name} scoring path needs {sorted(graphs)}")
    for name, graph in graphs.items():
        entry = entries[name]
        if tuple(i["name"] for i in entry.get("inputs", ())) != graph.inputs or \
                tuple(entry.get("outputs", ())) != graph.outputs:
            raise ExportError(f"{folder}: graph '{name}' has inputs {[i['name'] for i in entry.get('inputs', ())]} "
                              f"and outputs {entry.get('outputs')}, the model needs {list(graph.inputs)} and "
                              f"{list(graph.outputs)}")
        if entry.get("file") not in entry.get("files", {}):
            raise ExportError(f"{where}: graph '{name}' names a file ({entry.get('file')}) it has no SHA-256 for")
        for file, digest in entry.get("files", {}).items():
            path = folder / file
            if Path(file).name != file or not path.is_file():
                raise ExportError(f"{folder}: graph file {file} is missing")
            if file_sha256(path) != digest:
                raise ExportError(f"{path} changed since it was exported (SHA-256 differs from {MANIFEST}); "
                                  "refusing to score with it: export the model again")


class _Session:
    """One graph in one runtime: numpy in, numpy out, in the manifest's output order."""

    def __init__(self, runtime: str, path: Path, outputs: list[str], threads: int):
        self.runtime, self.outputs = runtime, outputs
        if runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        else:
            import openvino as ov

            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
                "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
            self.request = self.compiled.create_infer_request()
            self.ports = [self.compiled.output(name) for name in outputs]

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.runtime == "onnxruntime":
            return self.session.run(self.outputs, feed)
        results = self.request.infer(feed)
        return [np.array(results[port], copy=True) for port in self.ports]


class ExportedGraphs:
    """The sessions of one export folder; ``run(name, *tensors)`` is what ``Detector.encode_graph`` calls."""

    def __init__(self, folder: Path, runtime: str, manifest: dict[str, Any], device: torch.device):
        self.folder, self.runtime, self.manifest, self.device = folder, runtime, manifest, device
        threads = max(1, torch.get_num_threads())
        self.inputs = {name: [(i["name"], _DTYPES[i["dtype"]]) for i in entry["inputs"]]
                       for name, entry in manifest["graphs"].items()}
        self.sessions = {name: _Session(runtime, folder / entry["file"], list(entry["outputs"]), threads)
                         for name, entry in manifest["graphs"].items()}

    def run(self, name: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        spec = self.inputs[name]
        if len(tensors) != len(spec):
            raise ValueError(f"graph '{name}' takes {len(spec)} inputs, got {len(tensors)}")
        feed = {key: np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False))
                for (key, dtype), t in zip(spec, tensors)}
        return tuple(torch.from_numpy(out).to(self.device) for out in self.sessions[name](feed))

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "export": str(self.folder), "format": self.manifest["export_format"],
                "graph_digest": self.manifest["model"].get("graph_digest")}


def attach(model: Any, path: str | os.PathLike, runtime: str, identity: Mapping[str, Any] | None = None) -> Any:
    """Score ``model`` through the export at ``path`` (an export folder, or a folder of them) in ``runtime``;
    ``identity``: the version identity the export must have been written for (None: not checked, for an
    export of this very object, as ``inspector bench`` makes). Returns the model."""
    if runtime not in RUNTIMES[1:]:
        raise ExportError(f"runtime must be one of {', '.join(RUNTIMES[1:])}, not '{runtime}'")
    require(runtime)
    if not str(path).strip():
        raise ExportError(f"[model] runtime = \"{runtime}\" needs [model] export: the folder `inspector export` wrote")
    from .hashing import digest_of

    folder = find_export(path, digest_of(graph_identity(identity)) if identity is not None else None)
    manifest = read_manifest(folder)
    check_manifest(manifest, folder, model, runtime, identity)
    if model.precision != "fp32":
        model.precision = "fp32"
    model.exported = ExportedGraphs(folder, runtime, manifest, model.device)
    model.provenance["runtime"] = runtime
    model.provenance["export"] = str(folder)
    return model


def detach(model: Any) -> Any:
    """Back to torch for the encoder calls."""
    model.exported = None
    model.provenance.pop("runtime", None)
    model.provenance.pop("export", None)
    return model
