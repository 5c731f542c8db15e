"""Frozen CLIP feature extractor shared by every detector.

Built on open_clip's ``CLIP`` modules, with a forward of our own so that we get, in one pass:

* ``global_embedding`` g: LN_post(CLS after the last block) @ W_proj, **not** L2-normalised, ``[N, D]``
* ``patch_tokens`` F_l: the raw residual stream after each block in ``feature_layers`` (1-indexed),
  CLS removed, no LN_post and no projection, each ``[N, G*G, W]``

and a text tower that takes token *embeddings* (so detectors can insert learned prompt vectors) and
reads each sequence at its own last position under the causal mask.

Symbols: N images, W vision width, E text width, D joint embedding width, G grid side (image_size //
patch), L sequence length.

Weights come from an open_clip pretrained tag (downloaded where there is internet), a local OpenAI
checkpoint (TorchScript archive or plain state dict; architecture read from the tensors, heads = width
// 64, and the fp16 rounding that OpenAI's own loader applies), an open_clip checkpoint file, or
``random`` (tests only: loud warning, recorded with every score).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import logging
import math
import pickle
import re
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InspectorError

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EOT_TOKEN = 49407
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


class BackboneError(InspectorError, RuntimeError):
    """The backbone could not be built from what the user gave (bad path, unknown name, bad file)."""


def register_model_configs() -> None:
    """Make our extra open_clip architectures (``test-tiny``) known to open_clip, once."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class BackboneSpec:
    """Where the weights come from; stored in model manifests and with every score."""

    arch: str = "ViT-L-14-336"
    pretrained: str = "openai"
    clip_format: str = "auto"
    activation: str = "gelu"
    image_size: int = 518
    feature_layers: tuple[int, ...] = (6, 12, 18, 24)
    #: optional open_clip-style JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``) for an OpenAI checkpoint
    #: whose architecture the tensors do not say in full (e.g. attention heads not 64 wide)
    model_config: str = ""
    #: resize the position embedding to the input grid with the antialiased bicubic kernel (open_clip,
    #: Bayes-PFL, AA-CLIP) or, False, with plain bicubic (what the official MuSc loader ends up doing)
    pos_embed_antialias: bool = True

    @property
    def is_random(self) -> bool:
        return self.pretrained == "random"


# --------------------------------------------------------------------------------------------------
# loading


def _openai_fp16_keys(key: str) -> bool:
    """Tensors that OpenAI's loader (and the official Bayes-PFL loader) round through fp16 before use."""
    return (
        key == "visual.conv1.weight" or key in ("text_projection", "visual.proj") or key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias", ".attn.out_proj.weight", ".attn.out_proj.bias", ".mlp.c_fc.weight", ".mlp.c_fc.bias", ".mlp.c_proj.weight", ".mlp.c_proj.bias"))
    )


def read_openai_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an OpenAI CLIP checkpoint: a TorchScript archive (read as data, never run) or a plain state dict."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"CLIP checkpoint not found: {path}")
    state = read_torchscript_state_dict(path) if is_torchscript_archive(path) else _load_plain(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "visual.proj" not in state:
        raise BackboneError(f"{path}: not an OpenAI ViT CLIP state dict (no 'visual.proj')")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_plain(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, no code from the file."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported (?:global|operand)[^\n]*", str(exc))
        detail = found.group(0) if found else str(exc).splitlines()[0]
        raise BackboneError(f"{path}: refusing to load a checkpoint that holds more than tensors ({detail})") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise BackboneError(f"{path}: neither a TorchScript archive nor a state dict ({exc})") from None


# --------------------------------------------------------------------------------------------------
# TorchScript archives, read as data
#
# A TorchScript file (what OpenAI ships) is a zip: ``<root>/data.pkl`` pickles the module tree, each tensor's
# bytes are a record ``<root>/data/<key>``, and ``<root>/code/`` holds the modules' TorchScript source.
# ``torch.jit.load`` compiles and runs that source (a ``__setstate__`` runs at load, and can write files).
# We never run it: the pickle is read by an unpickler that builds nothing but tensors, plain containers and
# inert placeholders, and the source is only *parsed* (``ast``) for each class's ``__parameters__`` and
# ``__buffers__``, to name the state dict exactly as the module's ``state_dict()`` after ``torch.jit.load`` does.

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _ScriptClass:
    """What the serialized source says of one TorchScript class (parsed, never executed)."""

    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    is_module: bool
    runs_on_load: bool  # defines __setstate__, which torch.jit.load would run


class _ScriptObject:
    """An unpickled TorchScript object as inert data: its class's qualified name and its attributes."""

    qualname = ""

    def __init__(self) -> None:
        self.attributes: Any = None

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD: keep the state, run nothing
        self.attributes = state


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a TorchScript zip (a ``data.pkl`` next to ``code/`` or ``constants.pkl``)."""
    return _archive_root(path) is not None


def _archive_root(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    for name in names:
        root = name[: -len("data.pkl")]
        if name.endswith("data.pkl") and root.count("/") == 1 and root.endswith("/") and (
                root + "constants.pkl" in names or any(n.startswith(root + "code/") for n in names)):
            return root
    return None


def _script_classes(archive: zipfile.ZipFile, root: str, path: Path) -> dict[str, _ScriptClass]:
    """Every class defined in ``<root>/code/``: qualified name -> parameters, buffers, kind."""
    classes = {}
    for name in archive.namelist():
        if not (name.startswith(root + "code/") and name.endswith(".py")):
            continue
        qualifier = name[len(root + "code/"): -len(".py")].replace("/", ".")
        try:
            tree = ast.parse(archive.read(name).decode("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            raise BackboneError(f"{path}: unreadable TorchScript source {name} ({exc})") from None
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes[f"{qualifier}.{node.name}"] = _parse_script_class(node)
    return classes


def _parse_script_class(node: ast.ClassDef) -> _ScriptClass:
    names: dict[str, tuple[str, ...]] = {"__parameters__": (), "__buffers__": ()}
    for item in node.body:
        if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name) \
                and item.targets[0].id in names:
            value = ast.literal_eval(item.value)
            names[item.targets[0].id] = tuple(str(v) for v in value)
    return _ScriptClass(
        parameters=names["__parameters__"], buffers=names["__buffers__"],
        is_module=any(isinstance(b, ast.Name) and b.id == "Module" for b in node.bases),
        runs_on_load=any(isinstance(f, ast.FunctionDef) and f.name == "__setstate__" for f in node.body))


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2``'s job, on checked arguments: a strided view of a storage."""
    ints = (lambda v: isinstance(v, tuple) and all(isinstance(i, int) and i >= 0 for i in v))
    if not (isinstance(storage, torch.Tensor) and isinstance(offset, int) and ints(size) and ints(stride)):
        raise pickle.UnpicklingError("malformed tensor record")
    return storage.as_strided(size, stride, offset)  # raises if the view runs past the storage


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, _type: value,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class _WeightsUnpickler(pickle.Unpickler):
    """Builds tensors (from the archive's records), dicts, lists, tuples, numbers, strings and inert
    ``_ScriptObject`` placeholders; every other global the pickle names is refused."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.root = archive, root
        self.storages: dict[str, torch.Tensor] = {}
        self.placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.placeholders:
                self.placeholders[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.placeholders[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only tensors are read from a model file")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"refusing persistent id {pid!r:.80}: not a tensor storage")
        _, dtype, key, _location, numel = pid
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.root}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage record data/{key} is missing") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) != numel * itemsize:
                raise pickle.UnpicklingError(f"storage data/{key} holds {len(raw)} bytes, not {numel} x {itemsize}")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self.storages[key] = flat
        return self.storages[key]


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive, equal to ``state_dict()`` of the module ``torch.jit.load`` would
    give, without running any of the archive's code. An archive with a ``__setstate__`` (code that runs at load) is refused."""
    path = Path(path)
    root = _archive_root(path)
    if root is None:
        raise BackboneError(f"{path}: not a TorchScript archive")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        if root + "byteorder" in names and archive.read(root + "byteorder").decode().strip() != sys.byteorder:
            raise BackboneError(f"{path}: tensors stored {archive.read(root + 'byteorder').decode()}-endian")
        classes = _script_classes(archive, root, path)
        hooks = sorted(q for q, c in classes.items() if c.runs_on_load)
        if hooks:
            raise BackboneError(f"{path}: the TorchScript archive defines __setstate__ ({', '.join(hooks)}), code "
                                "that would run when loaded; refusing (only plain weights are read)")
        try:
            tree = _WeightsUnpickler(archive.read(root + "data.pkl"), archive, root).load()
        except pickle.UnpicklingError as exc:
            raise BackboneError(f"{path}: refusing to read this TorchScript archive ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - any malformed pickle is the same user error
            raise BackboneError(f"{path}: unreadable TorchScript archive ({type(exc).__name__}: {exc})") from None
    if not isinstance(tree, _ScriptObject):
        raise BackboneError(f"{path}: the TorchScript archive does not hold a module")
    state: dict[str, torch.Tensor] = {}
    _collect_state(tree, classes, "", state, path)
    return state


def _collect_state(obj: _ScriptObject, classes: dict[str, _ScriptClass], prefix: str,
                   state: dict[str, torch.Tensor], path: Path) -> None:
    """Parameters, then buffers, then sub-modules in attribute order: ``nn.Module.state_dict``'s order."""
    info = classes.get(obj.qualname)
    if info is None or not isinstance(obj.attributes, dict):
        raise BackboneError(f"{path}: the TorchScript archive has no plain definition of {obj.qualname}")
    attributes = obj.attributes
    for names in (info.parameters, info.buffers):
        for name, value in attributes.items():
            if name in names and isinstance(value, torch.Tensor):
                state[prefix + name] = value
    for name, value in attributes.items():
        if isinstance(value, _ScriptObject) and classes.get(value.qualname, info).is_module:
            _collect_state(value, classes, f"{prefix}{name}.", state, path)


def build_openai_clip(state: dict[str, torch.Tensor], activation: str = "gelu",
                      model_config: str | Path | dict | None = None, image_size: int | None = None) -> nn.Module:
    """Build an open_clip ``CLIP`` from an OpenAI-layout state dict.

    Mirrors OpenAI's loader: the linear/attention/projection weights are rounded through fp16 (a no-op for
    the fp16 files OpenAI ships) before the model is used in fp32. The architecture is read from the
    tensors with heads = width // 64 in both towers, or, with ``model_config`` (an open_clip-style JSON
    file or dict), taken from that config, as the official AA-CLIP loader does.
    """
    from open_clip.model import build_model_from_openai_state_dict

    state = {k: (v.half().float() if _openai_fp16_keys(k) else v.float()) if v.is_floating_point() else v
             for k, v in state.items()}
    if model_config:
        return build_clip_from_config(state, model_config, activation, image_size)
    model = build_model_from_openai_state_dict(dict(state), quick_gelu=activation == "quick_gelu", cast_dtype=None)
    return model.float().eval()


def read_model_config(model_config: str | Path | dict) -> dict:
    """An open_clip model config: a dict, a JSON file, or the name of a config open_clip knows."""
    import json

    if isinstance(model_config, dict):
        return dict(model_config)
    path = Path(model_config).expanduser()
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BackboneError(f"{path}: not a readable JSON model config ({exc})") from None
    from open_clip.factory import get_model_config

    register_model_configs()
    config = get_model_config(str(model_config))
    if config is None:
        raise BackboneError(f"model config '{model_config}' is neither a JSON file nor an open_clip architecture")
    return dict(config)


def build_clip_from_config(state: dict[str, torch.Tensor], model_config: str | Path | dict,
                           activation: str = "gelu", image_size: int | None = None) -> nn.Module:
    """An open_clip ``CLIP(**config)`` loaded strictly with an OpenAI-layout ``state`` (already fp32).

    ``image_size`` replaces the config's vision input size (as the official AA-CLIP loader sets 518), and
    the position embedding is resized once, from the checkpoint's grid to that one. Unused OpenAI keys
    (``input_resolution``, ``context_length``, ``vocab_size``) are dropped, as OpenAI's loader does.
    """
    from open_clip.model import CLIP

    config = read_model_config(model_config)
    if image_size:
        config["vision_cfg"] = {**config.get("vision_cfg", {}), "image_size": image_size}
    config.pop("custom_text", None)
    config["quick_gelu"] = activation == "quick_gelu"
    model = CLIP(**config)
    state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    pos = state.get("visual.positional_embedding")
    wanted = model.visual.positional_embedding.shape[0]
    if pos is not None and pos.shape[0] != wanted:
        state["visual.positional_embedding"] = resize_position_embedding(pos, round(math.sqrt(wanted - 1)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(f"the checkpoint does not fit the model config: {str(exc).splitlines()[0]}") from None
    return model.float().eval()


def _is_open_clip_file(path: Path) -> bool:
    if is_torchscript_archive(path):
        return False
    state = _load_plain(path)
    if isinstance(state, dict) and "state_dict" in state:
        return True
    return isinstance(state, dict) and any(k.startswith("module.") for k in state)


def create_clip(spec: BackboneSpec) -> nn.Module:
    """The open_clip ``CLIP`` named by ``spec`` (weights not yet adapted to ``spec.image_size``)."""
    import open_clip

    register_model_configs()
    source = spec.pretrained
    if source == "random":
        if spec.arch not in open_clip.list_models():
            raise BackboneError(f"unknown backbone architecture '{spec.arch}'")
        warnings.warn(
            f"RANDOM WEIGHTS: backbone '{spec.arch}' is randomly initialised. Scores mean nothing; "
            "use this for tests only.",
            stacklevel=2,
        )
        log.warning("RANDOM WEIGHTS: backbone %s is randomly initialised; scores mean nothing", spec.arch)
        torch.manual_seed(0)  # the same "random" backbone every time, so tests and demos are repeatable
        return open_clip.create_model(spec.arch, pretrained=None).float().eval()
    path = Path(source).expanduser()
    if path.suffix or path.exists() or "/" in source:
        if not path.is_file():
            raise BackboneError(f"CLIP checkpoint not found: {path}")
        fmt = spec.clip_format
        if fmt == "auto":
            fmt = "open_clip" if _is_open_clip_file(path) else "openai"
        if fmt == "openai":
            return build_openai_clip(read_openai_state_dict(path), spec.activation, spec.model_config or None,
                                     spec.image_size)
        if fmt != "open_clip":
            raise BackboneError(f"unknown clip_format '{spec.clip_format}' (auto, openai, open_clip)")
        return open_clip.create_model(spec.arch, pretrained=str(path)).float().eval()
    if spec.arch not in open_clip.list_models():
        raise BackboneError(f"unknown backbone architecture '{spec.arch}'")
    tags = open_clip.list_pretrained_tags_by_model(spec.arch)
    if source not in tags:
        raise BackboneError(f"'{source}' is not a file nor a pretrained tag of {spec.arch} ({', '.join(tags)})")
    cached = _cached_pretrained(spec.arch, source)  # a file already here: no network at all
    try:
        return open_clip.create_model(spec.arch, pretrained=cached or source).float().eval()
    except Exception as exc:  # noqa: BLE001 - network failures surface in many types
        raise BackboneError(
            f"could not get pretrained weights {spec.arch}/{source} ({type(exc).__name__}: {exc}). "
            f"{_NO_DOWNLOAD_ADVICE}"
        ) from None


_NO_DOWNLOAD_ADVICE = (
    "Put a checkpoint file on this machine and set [model] pretrained to its path (INSPECTOR_MODEL__PRETRAINED=PATH "
    "or --pretrained PATH), or try the pipeline on random weights: --pretrained random --backbone test-tiny "
    "--allow-random-weights")


def _cached_pretrained(arch: str, tag: str, timeout: float = 1.0) -> str:
    """The local file of an open_clip pretrained tag when the Hugging Face cache holds it, else "".

    Where the tag's file would have to be downloaded and there is no network (HF_HUB_OFFLINE=1, or the host
    does not answer a TCP connect within ``timeout`` seconds), a BackboneError says so at once, instead of a
    minute of download retries. Only the cache on disk and one connect are looked at, never the hub's API.
    """
    import os
    import socket
    import threading
    import urllib.parse
    import urllib.request

    import open_clip
    from open_clip import pretrained as oc_pretrained
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg or cfg.get("file"):
        return ""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if cfg.get("hf_hub") and oc_pretrained.has_hf_hub():  # open_clip prefers the hub where it has both
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" -> the default file name
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]  # open_clip tries a .safetensors twin first
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for name in candidates:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        offline = offline or bool(constants.HF_HUB_OFFLINE)
        where = f"{repo} on {constants.ENDPOINT}"
        url = constants.ENDPOINT
    else:
        url = cfg.get("url", "")
        if not url or os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))):
            return ""  # open_clip finds (and checks) its own download
        offline, where = False, url  # HF_HUB_OFFLINE does not stop open_clip's plain URL download
    reason = "HF_HUB_OFFLINE is set" if offline else ""
    if not offline:
        target = urllib.parse.urlsplit(url)
        proxy = urllib.request.getproxies().get(target.scheme or "https")
        if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
            target = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
        answered = threading.Event()

        def connect() -> None:  # in a thread: a name lookup may hang longer than any socket timeout
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                answered.set()
            except OSError:
                pass

        probe = threading.Thread(target=connect, daemon=True)
        probe.start()
        probe.join(timeout)
        if not answered.is_set():
            reason = f"{host}:{port} does not answer"
    if reason:
        raise BackboneError(
            f"backbone {arch} needs the weights '{tag}' ({where}), which are not cached here, and there is no network "
            f"({reason}). {_NO_DOWNLOAD_ADVICE}")
    return ""


def resize_position_embedding(pos: torch.Tensor, grid: int, antialias: bool = True) -> torch.Tensor:
    """``[1 + g*g, W] -> [1 + grid*grid, W]``: bicubic, align_corners=False, CLS kept.

    ``antialias=True``: the antialiased bicubic kernel (a = -0.5), what the Bayes-PFL and AA-CLIP official
    code uses, also when upsampling. ``False``: PyTorch's plain bicubic (a = -0.75), what the official
    MuSc loader runs (its resize takes an ``antialias`` argument but never passes it on).
    """
    old = round(math.sqrt(pos.shape[0] - 1))
    if old == grid:
        return pos
    cls, img = pos[:1], pos[1:]
    img = img.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=antialias, align_corners=False)
    img = img.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    return torch.cat([cls.float(), img], dim=0)


# --------------------------------------------------------------------------------------------------
# forward


def _self_attention(attn: nn.MultiheadAttention, x: torch.Tensor, causal: bool,
                    attention: str = "sdpa") -> torch.Tensor:
    """x: [N, L, C] -> [N, L, C] with the weights of ``nn.MultiheadAttention``.

    ``attention="sdpa"``: fused scaled-dot-product attention (fast). ``"explicit"``: the arithmetic of
    ``nn.MultiheadAttention`` called with ``need_weights=True`` (q pre-scaled by 1/sqrt(head width), then
    q·k^T, softmax, ·v), which the official AA-CLIP code runs; the two differ by about 1e-6 relative on CPU.
    """
    n, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each [N, H, L, d]
    if attention == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    elif attention == "explicit":
        q = q.reshape(n * heads, length, -1) * math.sqrt(1.0 / q.shape[-1])
        k, v = k.reshape(n * heads, length, -1), v.reshape(n * heads, length, -1)
        if causal:
            mask = torch.full((length, length), float("-inf"), device=x.device, dtype=q.dtype).triu_(1)
            weights = torch.baddbmm(mask, q, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q, k.transpose(-2, -1))
        out = torch.bmm(weights.softmax(dim=-1), v).view(n, heads, length, -1)
    else:
        raise ValueError(f"attention must be 'sdpa' or 'explicit', not '{attention}'")
    return attn.out_proj(out.transpose(1, 2).reshape(n, length, width))


def _run_block(block: nn.Module, x: torch.Tensor, causal: bool, attention: str = "sdpa") -> torch.Tensor:
    x = x + block.ls_1(_self_attention(block.attn, block.ln_1(x), causal, attention))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


#: ``after_block(index, x) -> x``: called with the residual stream after each block (1-indexed) in the
#: vision and text forwards, so a detector can adapt it (AA-CLIP's residual adapters) without its own loop.
BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


class ClipBackbone(nn.Module):
    """Frozen CLIP: ``encode_image`` -> (g, [F_l]); ``encode_text`` on token embeddings."""

    def __init__(self, clip: nn.Module, spec: BackboneSpec):
        super().__init__()
        visual = clip.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise BackboneError(f"{spec.arch}: only ViT backbones pooled on the CLS token are supported")
        self.spec = spec
        self.clip = clip
        self.patch_size = visual.conv1.kernel_size[0]
        if spec.image_size % self.patch_size:
            raise BackboneError(f"image_size {spec.image_size} is not a multiple of the patch size {self.patch_size}")
        self.grid = spec.image_size // self.patch_size
        self._source_position_embedding = visual.positional_embedding.data.detach().clone()  # checkpoint grid
        with torch.no_grad():
            visual.positional_embedding = nn.Parameter(
                resize_position_embedding(visual.positional_embedding.data, self.grid, spec.pos_embed_antialias),
                requires_grad=False,
            )
        self.vision_layers = len(visual.transformer.resblocks)
        bad = [layer for layer in spec.feature_layers if not 1 <= layer <= self.vision_layers]
        if bad:
            raise BackboneError(f"feature_layers {bad} outside 1..{self.vision_layers} for {spec.arch}")
        self.set_activation(spec.activation)
        self.requires_grad_(False)
        self.eval()

    # sizes ---------------------------------------------------------------------------------------
    @property
    def vision_width(self) -> int:
        return self.clip.visual.conv1.out_channels

    @property
    def text_width(self) -> int:
        return self.clip.token_embedding.embedding_dim

    @property
    def embed_dim(self) -> int:
        return self.clip.text_projection.shape[1]

    @property
    def context_length(self) -> int:
        return self.clip.positional_embedding.shape[0]

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def set_activation(self, activation: str) -> None:
        if activation not in ("gelu", "quick_gelu"):
            raise BackboneError(f"activation must be 'gelu' or 'quick_gelu', not '{activation}'")
        from open_clip.transformer import QuickGELU

        act = nn.GELU if activation == "gelu" else QuickGELU
        for tower in (self.clip.visual.transformer, self.clip.transformer):
            for block in tower.resblocks:
                block.mlp.gelu = act()

    def set_pos_embed_antialias(self, antialias: bool) -> None:
        """Resize the position embedding again from the checkpoint's grid, with or without antialias (a
        detector whose paper used the other kernel than the spec it was loaded with); ``spec`` follows."""
        if antialias == self.spec.pos_embed_antialias:
            return
        visual = self.clip.visual
        pos = resize_position_embedding(self._source_position_embedding, self.grid, antialias)
        with torch.no_grad():
            visual.positional_embedding.data = pos.to(visual.positional_embedding.device,
                                                      visual.positional_embedding.dtype)
        self.spec = dataclasses.replace(self.spec, pos_embed_antialias=antialias)

    def train(self, mode: bool = True) -> ClipBackbone:  # frozen: never in training mode
        return super().train(False)

    # vision --------------------------------------------------------------------------------------
    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [N, 3, S, S] normalised -> tokens [N, 1 + G*G, W]: patch embedding, CLS prepended,
        position embedding added (before ``ln_pre``). Patch p = row·G + col."""
        visual = self.clip.visual
        x = visual.conv1(pixels.to(visual.conv1.weight.dtype))  # [N, W, G, G]
        x = x.flatten(2).transpose(1, 2)  # [N, G*G, W]
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)

    def run_vision(self, tokens: torch.Tensor, layers: Sequence[int] = (), after_block: BlockHook | None = None,
                   attention: str = "sdpa") -> tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens: [N, T, W] from ``embed_image`` (any subset of its tokens) -> (x after the last block
        [N, T, W], [x[:, 1:] after block l for l in layers]). ``ln_pre`` is applied here."""
        x = self.clip.visual.ln_pre(tokens)
        taps = []
        for index, block in enumerate(self.clip.visual.transformer.resblocks, start=1):
            x = _run_block(block, x, causal=False, attention=attention)
            if after_block is not None:
                x = after_block(index, x)
            if index in layers:
                taps.append(x[:, 1:, :])
        return x, taps

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """x after the last block [N, T, W] -> g = LN_post(CLS) @ W_proj: [N, D], not normalised."""
        return self.clip.visual.ln_post(x[:, 0, :]) @ self.clip.visual.proj

    def encode_image(
        self, pixels: torch.Tensor, layers: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixels: [N, 3, S, S] normalised -> (g: [N, D], [F_l: [N, G*G, W] for l in layers])."""
        layers = tuple(self.spec.feature_layers if layers is None else layers)
        x, patch_tokens = self.run_vision(self.embed_image(pixels), layers)
        return self.pool(x), patch_tokens

    def encode_image_floor(self, pixels: torch.Tensor) -> torch.Tensor:
        """The plain backbone forward (the benchmark's floor): g only."""
        return self.encode_image(pixels, layers=())[0]

    # text ----------------------------------------------------------------------------------------
    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids [..., L] -> embeddings [..., L, E]."""
        return self.clip.token_embedding(token_ids)

    def encode_text(self, embeddings: torch.Tensor, last_index: torch.Tensor, after_block: BlockHook | None = None,
                    attention: str = "sdpa", project: bool = True) -> torch.Tensor:
        """embeddings: [S, L, E] (positional embedding not yet added); last_index: [S] -> [S, D].

        Each sequence is read at its own ``last_index`` after LN_final and (``project``) the text
        projection; ``project=False`` returns the [S, E] token after LN_final. Under the causal mask
        anything after that position cannot change it, so callers may cut sequences right after their
        EOT and pad shorter ones.
        """
        length = embeddings.shape[1]
        if length > self.context_length:
            raise ValueError(f"text sequence of {length} tokens exceeds the context length {self.context_length}")
        x = embeddings + self.clip.positional_embedding[:length].to(embeddings.dtype)
        for index, block in enumerate(self.clip.transformer.resblocks, start=1):
            x = _run_block(block, x, causal=True, attention=attention)
            if after_block is not None:
                x = after_block(index, x)
        x = self.clip.ln_final(x[torch.arange(x.shape[0], device=x.device), last_index])  # [S, E]
        return x @ self.clip.text_projection if project else x


def load_backbone(spec: BackboneSpec) -> ClipBackbone:
    return ClipBackbone(create_clip(spec), spec)


def tokenize(texts: Sequence[str]) -> torch.Tensor:
    """CLIP BPE token ids, [len(texts), 77], SOS ... EOT then zeros."""
    import open_clip

    return open_clip.tokenize(list(texts))
