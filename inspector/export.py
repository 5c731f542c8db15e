"""``inspector export MODEL --format onnx|openvino OUT``: a model version's scoring graphs, for edge PCs.

What is exported is what the detector declares in ``Detector.scoring_graphs()``: the encoder calls of its
scoring path, each traced from the very method that scores in torch, in fp32 on the CPU:

* Bayes-PFL: ``vision`` (pixels -> g and the feature-layer tokens) and ``text`` (sampled prompt embeddings
  and their EOT positions -> text embeddings). The Monte-Carlo noise is not in the graph: it is drawn in
  torch from the seeds (the image content, the class), turned into prompt vectors by the head, and enters the
  text graph as its input, so the exported model makes the same draws as the torch one, for any R.
* AA-CLIP: ``vision`` (the tower with its residual adapters -> the feature-layer tokens).
* WinCLIP: ``vision`` (tokens, f^I, f^P) and ``windows`` (window sequences -> their embeddings).
* MuSc: ``vision`` (g and the tap-layer tokens).

The head, the text anchors of the training-free text paths (computed once per class), the caches and the
post-processing stay in torch (``inspector.exported`` runs the graphs inside the same detector).

ONNX comes from ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``: the dynamo exporter
needs onnxscript, another dependency), opset 17, dynamic batch (and sequence) axes. OpenVINO IR is
converted from that ONNX file by ``openvino.convert_model`` and saved uncompressed (``compress_to_fp16=False``:
the default would round the weights to fp16). Every graph is run once in its runtime on its tracing
example before the export is written, and the largest difference from torch is kept in the manifest.
The folder is written to a temporary sibling and renamed into place; an existing ``OUT`` is never replaced.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .backbone import CLIP_MEAN, CLIP_STD
from .exported import FORMAT, FORMAT_VERSION, MANIFEST, ExportError, _Session, graph_identity, require
from .hashing import file_sha256

log = logging.getLogger(__name__)
FORMATS = ("onnx", "openvino")
OPSET = 17


class _Traced(nn.Module):
    """A scoring-graph method as a module ``torch.onnx.export`` can trace (outputs as a tuple)."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model = model  # registered, so its weights are traced as the graph's initializers
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fn(*inputs))


def _dtype(tensor: torch.Tensor) -> str:
    if tensor.dtype in (torch.int64, torch.int32):
        return "int64"
    return "float32"


def normalisation(model: Any) -> dict[str, Any]:
    """What the vision graph's input must be: the detector's ``to_input`` (every detector here ends it with
    the CLIP mean/std, after its own resize to S x S)."""
    return {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "resize": f"{type(model).__name__}.to_input",
            "layout": "NCHW, RGB, float32"}


def export_detector(model: Any, out: str | os.PathLike, fmt: str = "onnx", *, version: Mapping[str, Any] | None = None,
                    opset: int = OPSET, progress: Callable[[str], None] | None = None) -> Path:
    """Write ``model``'s scoring graphs to the new folder ``out`` in ``fmt``; ``version``: the model version
    they are for (``name``, ``identity``; None: an anonymous export, e.g. the bench's). Returns ``out``."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'")
    require("onnx")
    require("onnxruntime" if fmt == "onnx" else "openvino")
    from .hashing import digest_of

    graphs = model.scoring_graphs()
    if not graphs:
        raise ExportError(f"{model.name} declares no scoring graphs (Detector.scoring_graphs): it cannot be exported")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists; an export is never written over another: choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    saved = (model.precision, model.exported, model.device)
    try:
        model.precision, model.exported = "fp32", None
        model.to("cpu")
        entries, check = {}, {}
        for name, graph in graphs.items():
            if progress:
                progress(f"tracing {name}")
            example = tuple(graph.example())
            onnx_path = staging / f"{name}.onnx"
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's warnings about Python-side shape checks
                torch.onnx.export(_Traced(model, graph.fn), example, str(onnx_path), input_names=list(graph.inputs),
                                  output_names=list(graph.outputs), dynamic_axes={k: dict(v) for k, v in graph.dynamic.items()},
                                  opset_version=opset, dynamo=False, do_constant_folding=True)
                expected = [t.float().numpy() for t in graph.fn(*example)]
            if fmt == "openvino":
                import openvino as ov

                xml = staging / f"{name}.xml"
                ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
                onnx_path.unlink()
                files, main = [xml.name, xml.with_suffix(".bin").name], xml.name
                runtime = "openvino"
            else:
                files, main = [onnx_path.name], onnx_path.name
                runtime = "onnxruntime"
            feed = {n: t.numpy() for n, t in zip(graph.inputs, example)}
            got = _Session(runtime, staging / main, list(graph.outputs), max(1, torch.get_num_threads()))(feed)
            check[name] = {o: float(np.abs(a - b).max()) if a.size else 0.0
                           for o, a, b in zip(graph.outputs, got, expected)}
            entries[name] = {"file": main, "files": {f: file_sha256(staging / f) for f in files},
                             "inputs": [{"name": n, "dtype": _dtype(t), "example_shape": list(t.shape)}
                                        for n, t in zip(graph.inputs, example)],
                             "outputs": list(graph.outputs),
                             "dynamic_axes": {k: {str(a): s for a, s in v.items()} for k, v in graph.dynamic.items()}}
        identity = graph_identity(version["identity"]) if version else None
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "model": {"name": version.get("name") if version else None,
                      "digest": version.get("digest") if version else None,
                      "identity": identity, "graph_digest": digest_of(identity) if identity is not None else None},
            "detector": model.name, "input_size": model.image_size, "normalisation": normalisation(model),
            "export_format": fmt, "opset": opset, "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
            "precision": "fp32", "torch": torch.__version__, "runtime_versions": _versions(fmt),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "graphs": entries, "check": {"what": "max |exported - torch| on the tracing example", **check},
        }
        import json

        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        model.precision, model.exported = saved[0], saved[1]
        model.to(saved[2])
    log.info("exported %s graphs (%s) to %s", model.name, ", ".join(graphs), out)
    return out


def _versions(fmt: str) -> dict[str, str]:
    import onnx

    found = {"onnx": onnx.__version__}
    if fmt == "onnx":
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
    else:
        import openvino

        found["openvino"] = openvino.__version__
    return found


def export_model(settings: Any, name_or_path: str | None, fmt: str, out: str | os.PathLike,
                 class_name: str | None = None, progress: Callable[[str], None] | None = None) -> tuple[Path, Any]:
    """``inspector export``: the registered version ``name_or_path`` (a name or a version folder), or, with
    none, the active one (the ``[model]`` settings' version, else the one promoted in the database for
    ``class_name`` or the site). Returns (the export folder, the recipe)."""
    import copy

    from .pipeline import resolve_recipe
    from .versions import build, recipe_from_registry

    torch_settings = copy.deepcopy(settings)
    torch_settings.override("model", runtime="torch", device="cpu")
    if name_or_path:
        recipe = recipe_from_registry(torch_settings, name_or_path)
    else:
        engine = None
        url = settings.database.url
        if url and not (url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists()):
            from .store.db import open_store

            engine = open_store(url)
        try:
            recipe = resolve_recipe(torch_settings, engine, class_name)
        finally:
            if engine is not None:
                engine.dispose()
    if recipe.fallback:
        raise ExportError(f"no trained model to export: {recipe.fallback}")
    model = build(recipe, torch_settings, device="cpu")
    folder = export_detector(model, out, fmt, version={"name": recipe.name, "digest": recipe.digest,
                                                       "identity": recipe.identity}, progress=progress)
    return folder, recipe
