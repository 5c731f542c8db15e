"""One typed settings object.

Precedence, lowest first: the defaults below < ``config.toml`` (or ``--config PATH``) <
environment variables ``INSPECTOR_<SECTION>__<KEY>`` < command-line flags.

Every key that a user may set lives in a dataclass here, with its type; ``config.toml`` at the repository
root documents each one. Unknown sections or keys are an error, not silently ignored: a typo in a
threshold or a database URL must not go unnoticed on a production line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InspectorError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "INSPECTOR_"


class ConfigError(InspectorError, ValueError):
    """A user's configuration is wrong; the message says where and how."""


@dataclass
class ModelSettings:
    #: Detector behind the engine: "bayes-pfl", "aa-clip" or "winclip" (training-free).
    detector: str = "bayes-pfl"
    #: Training-free detector that scores while the configured one has no trained head ("winclip"), or
    #: "none" to refuse (or, with allow_random_weights, to score with the untrained head).
    fallback: str = "winclip"
    #: Registered model version (folder under ``registry.path``) to load; empty = build from the keys below.
    name: str = ""
    #: open_clip architecture name ("ViT-L-14-336", "test-tiny", ...); empty = the detector's own (ViT-L-14-336
    #: for Bayes-PFL and AA-CLIP, ViT-B-16-plus-240 for WinCLIP). Ignored for OpenAI checkpoints, whose
    #: architecture is read from the tensors (or from model_config).
    backbone: str = ""
    #: Backbone weights: an open_clip pretrained tag ("openai"), a local checkpoint file, or "random";
    #: empty = the detector's own ("openai"; "laion400m_e31" for WinCLIP).
    pretrained: str = ""
    #: Optional open_clip-style JSON for an OpenAI checkpoint whose attention heads are not 64 wide.
    model_config: str = ""
    #: How to read a checkpoint file: "auto", "openai" (TorchScript or plain OpenAI state dict) or "open_clip".
    clip_format: str = "auto"
    #: Trained head of the detector (our format; for Bayes-PFL also the official ``{'MyModel': ...}`` file);
    #: empty = none (WinCLIP needs none; the others fall back to [model] fallback).
    head: str = ""
    #: MLP activation of the backbone: "gelu" (exact, what the Bayes-PFL checkpoints were trained with) or
    #: "quick_gelu" (what OpenAI CLIP was trained with).
    activation: str = "gelu"
    #: Input side in pixels (square, bicubic resize without keeping the aspect ratio, as the papers do);
    #: 0 = the detector's own (518; 240 for WinCLIP).
    image_size: int = 0
    #: 1-indexed transformer blocks whose patch tokens feed the pixel branch; empty = the detector's own
    #: (6, 12, 18, 24).
    feature_layers: list[int] = field(default_factory=list)
    #: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    #: "auto": bf16 autocast on CUDA and on CPUs with native bf16 (avx512_bf16 or amx_bf16 in
    #: /proc/cpuinfo), fp32 on other CPUs; "fp32" (exact, the parity mode); "bf16", "fp16" (forced).
    precision: str = "auto"
    #: What runs the backbone/encoder calls: "torch", or the graphs `inspector export` wrote, in "onnxruntime"
    #: (pip install 'inspector[onnx]') or "openvino" (pip install 'inspector[openvino]'); the head and the
    #: post-processing stay in torch. Exported graphs are fp32 ("auto" precision means fp32 there).
    runtime: str = "torch"
    #: The export folder for runtime "onnxruntime" / "openvino" (`inspector export MODEL --format F OUT`), or a
    #: folder of such folders (the one written for the version being loaded is used).
    export: str = ""
    #: Images per engine call.
    batch_size: int = 8
    #: Allow randomly initialised weights in production verbs (tests and demos only).
    allow_random_weights: bool = False


@dataclass
class BayesPFLSettings:
    #: Monte-Carlo samples R of the prompt distributions per image.
    samples: int = 10
    #: "none" = exact per-image text path; "class" = approximate, text embeddings from a class prototype.
    text_cache: str = "none"
    #: Reference images that define the class prototype in "class" mode (images of the first batch otherwise).
    prototype_images: int = 8
    #: Seed of the noise generator (per class for the image-agnostic samples, per image content for the
    #: image-specific ones, so a score never depends on batch composition or order).
    seed: int = 333
    #: k of the top-k map score; 0 = the official rule (20 for small-defect classes, 2000 otherwise).
    topk: int = 0


#: keys that moved from [model] to [bayes_pfl] (a clear error instead of "unknown key")
MOVED_KEYS = {("model", k): "bayes_pfl" for k in ("samples", "text_cache", "prototype_images", "seed", "topk")}


@dataclass
class AAClipSettings:
    #: "industrial" (blur kernel 7, sigma 1; image score from text and map) or "medical" (9, 1.5; map only).
    domain: str = "industrial"
    #: k of the top-k map score (mean of the k largest pixel probabilities).
    topk: int = 100
    #: "auto"/"sdpa" (fused attention) or "explicit" (the official code's literal attention arithmetic;
    #: agrees with sdpa to ~3e-6 on the map and costs 1.5x on CPU).
    attention: str = "auto"


@dataclass
class WinCLIPSettings:
    #: Folder of normal reference images per class (`inspector references add`), for few-shot WinCLIP+.
    references: str = "references"
    #: Reference images used per class; 0 = all stored ones.
    k_shot: int = 0
    #: Window sizes in patches (the paper: 2 and 3).
    scales: list[int] = field(default_factory=lambda: [2, 3])


@dataclass
class MuScSettings:
    #: Earlier images of a class kept in its rolling pool (the references of each new image besides the
    #: other images of its batch and the class's reference images); 0 = no rolling pool.
    pool_size: int = 50
    #: Add each scored image to its class's pool afterwards.
    join_pool: bool = True
    #: Folder of reference images per class (`inspector references add`, shared with WinCLIP), always in the
    #: pool; empty = none.
    references: str = "references"
    #: Storage of pooled features: "float32" or "float16" / "bfloat16" (half the memory, distances in fp32).
    pool_dtype: str = "float32"
    #: LNAMD aggregation degrees r (the paper: 1, 3, 5).
    r_list: list[int] = field(default_factory=lambda: [1, 3, 5])
    #: Share of the other images whose nearest-patch distances are averaged (the paper: 0.3).
    fraction: float = 0.3
    #: RsCIN neighbour counts of `score_pool` (the official code: [1, 2, 3], or [1, 8, 9] for VisA).
    k_list: list[int] = field(default_factory=lambda: [1, 2, 3])
    #: "matmul" (blocks of distances under memory_mb) or "cdist" (the official arithmetic, full matrix).
    msm: str = "matmul"
    #: Largest block of patch distances MSM holds at once, in MB.
    memory_mb: int = 256
    #: Position-embedding resize kernel: false = plain bicubic (the official MuSc loader), true = antialiased.
    pos_embed_antialias: bool = False
    #: "auto"/"sdpa" (fused attention) or "explicit" (the official attention arithmetic).
    attention: str = "auto"
    #: k of the top-k map score; 0 = 1 % of the pixels.
    topk: int = 0
    #: Nearest-patch search: "none" (exact, all L patches of every reference image) or "subsample" (each
    #: reference image keeps patch_budget of its patches, chosen by its content hash: less MSM work and memory).
    approx: str = "none"
    #: Patches kept per reference image with approx = "subsample" (1369 at 518 px).
    patch_budget: int = 256
    #: Folder for the rolling pools on disk (one sub-folder per model version, one per class); empty = memory only.
    pool_dir: str = "~/.cache/inspector/musc-pools"
    #: Pool drift check: images in the baseline and in the recent window; 0 = off.
    drift_window: int = 16
    #: Drift when at least this share of the recent window scores above the baseline's drift_quantile.
    drift_share: float = 0.5
    drift_quantile: float = 0.95
    #: RsCIN k list of `inspector eval` (batch mode); empty = as the official code picks it ([1, 8, 9] VisA).
    eval_k_list: list[int] = field(default_factory=list)


@dataclass
class SourceSettings:
    """One ``[[sources]]`` entry: a watched folder served by `inspector watch` with no folder arguments."""

    #: The folder (a camera's drop folder).
    path: str = ""
    #: Product class of its images, e.g. "metal nut".
    class_name: str = ""
    #: Line label stored with the source (shown in the dashboard and status).
    line: str = ""
    #: Pin the folder to a registered model version (empty = the version promoted for its class).
    model: str = ""
    #: Pin the folder to a detector built from [model] (empty = the version promoted for its class).
    detector: str = ""
    #: Also watch sub-folders.
    recursive: bool = False
    #: Poll this folder instead of inotify (network shares); empty = [watch] polling.
    polling: bool | None = None
    #: DICOM images: the window they are scored in, a preset (brain, subdural, stroke, bone, temporal_bone,
    #: soft_tissue, lung, mediastinum, liver; see inspector/dicom.py) or "center/width" ("40/80"); empty =
    #: the file's own window (VOI LUT, else Window Center / Width, else each frame's range).
    window: str = ""
    #: AA-CLIP domain of this folder's model version, "industrial" or "medical" (empty = [aa_clip] domain);
    #: pins the folder to that version.
    domain: str = ""
    #: The words the detector's text prompts use for the class, e.g. "brain CT slice" for class "head CT"
    #: (empty = the class name). Part of the model version's identity: pins the folder to that version.
    class_description: str = ""
    #: Keep this folder's paths (which may name the patient) out of the events sent to the line: MQTT and
    #: webhook events carry no path (the content hash and, for DICOM, the UIDs identify the image), and the
    #: folder sink names its copies by result id. The database keeps the path (workers read the file by it).
    hide_paths: bool = False


@dataclass
class DecisionSettings:
    #: Results of a (class, model version) before a provisional threshold is computed from their unlabeled
    #: scores; until then every image is "review".
    provisional_after: int = 50
    #: Provisional rule: "mad" (median + k * 1.4826 * MAD of those scores) or "rate" (the quantile that flags
    #: expected_flag_rate of them).
    provisional_rule: str = "mad"
    #: k of the "mad" rule.
    provisional_k: float = 3.5
    #: Share of images the "rate" rule flags.
    expected_flag_rate: float = 0.02
    #: Half-width of the uncertainty band around a provisional threshold: a score closer than this is
    #: "review" (a saved threshold carries its own band).
    review_band: float = 0.0
    #: Share of "pass" images drawn (seeded, by image content) into the audit sample for the escape rate.
    audit_share: float = 0.02
    #: Seed of the audit draw (recorded with every audited result).
    audit_seed: int = 0


@dataclass
class OutputSettings:
    #: MQTT broker for decision events, "mqtt://host:1883" or "mqtts://host:8883"; empty = off.
    mqtt_url: str = ""
    #: Topic template; {line}, {class_name}, {decision} and {model_version} are filled in.
    mqtt_topic: str = "inspector/{line}/{class_name}"
    #: Broker credentials (set the password through INSPECTOR_OUTPUTS__MQTT_PASSWORD).
    mqtt_username: str = ""
    mqtt_password: str = ""
    #: CA file for mqtts:// (empty = the system's).
    mqtt_ca: str = ""
    #: Webhook that receives each event as an HTTP POST of JSON; empty = off.
    webhook_url: str = ""
    #: Shared secret: the X-Inspector-Signature header is "sha256=" + HMAC-SHA256(secret, body).
    webhook_secret: str = ""
    #: Seconds before a webhook call counts as failed.
    webhook_timeout: float = 5.0
    #: Root of OK/ NG/ REVIEW/ folders that receive each decided image; empty = off.
    folder_root: str = ""
    #: "copy", "hardlink" or "move" the image into them (always through a temporary name, then renamed).
    folder_mode: str = "copy"
    #: Longest wait between two delivery attempts of a sink that is down (seconds).
    retry_max_seconds: float = 60.0
    #: Pending events of one sink above which `status` and the log warn (nothing is ever dropped).
    backlog_warn: int = 10000


@dataclass
class DatabaseSettings:
    #: SQLAlchemy URL. SQLite in the working folder by default; any ``postgresql+psycopg://`` URL works.
    url: str = "sqlite:///inspector.sqlite"


@dataclass
class WatchSettings:
    #: A file is taken once its size and mtime have not changed for this many seconds.
    stable_seconds: float = 2.0
    #: Full rescan of the watched folders every N seconds (events get dropped; shares send none). 0 = never.
    rescan_seconds: float = 30.0
    #: Use the polling observer (network shares: inotify sees nothing written by other machines).
    polling: bool = False
    #: A claimed batch is given back to the queue if its worker has not finished it within this time.
    lease_seconds: float = 300.0
    #: Transient failures (I/O errors, GPU out of memory) are retried with backoff up to this many attempts.
    max_attempts: int = 5
    #: Longest side of the anomaly map stored in the database (8-bit PNG).
    map_size: int = 256
    #: Threads that read and decode images while the GPU scores.
    decode_threads: int = 4
    #: Most pixels the decode threads hold decoded at once (a batch of huge images is decoded a few at a
    #: time instead of all together); one image alone always proceeds. 0 = no limit.
    batch_pixel_budget: int = 100_000_000
    #: Seconds a worker waits before polling an empty queue again.
    idle_seconds: float = 0.5
    #: Address the Prometheus endpoint (``--metrics-port``) listens on; "0.0.0.0" serves every network.
    metrics_address: str = "127.0.0.1"


@dataclass
class TrainSettings:
    #: Epochs (the paper: at most 30, with early stopping and the stage switch on validation).
    epochs: int = 30
    #: Images per training step (the paper: 32).
    batch_size: int = 32
    #: Share of each auxiliary class held out for validation (model selection never sees target data).
    val_fraction: float = 0.2
    #: Epochs without improvement tolerated before switching stage (stage 1) or stopping (stage 2).
    patience: int = 3
    #: Monte-Carlo samples R during validation (the paper: 5).
    val_samples: int = 5
    #: Probability of the 2x2 mosaic of anomalous images (the paper uses 0.4 when training on MVTec).
    mosaic: float = 0.0
    #: Random augmentation of training images (rotations, brightness/contrast, noise, blur) as in the paper.
    augment: bool = True
    #: Seed of data order, augmentation and prompt noise (the paper: 333).
    seed: int = 333


@dataclass
class DataSettings:
    #: Most bytes one dataset archive may extract to (counted as written; header sizes are not trusted).
    archive_max_bytes: int = 64 << 30
    #: Most bytes extracted per byte of archive (image datasets compress ~1-3x; bombs 1000x). Archives may
    #: always extract 64 MiB, whatever their ratio.
    archive_max_ratio: float = 100.0


@dataclass
class DashboardSettings:
    #: Port of `inspector dashboard`.
    port: int = 8501
    #: Optional shared password for the page. Set it with INSPECTOR_DASHBOARD__PASSWORD, never in the repo.
    password: str = ""
    #: Images per page of the review queue.
    page_size: int = 50


@dataclass
class RegistrySettings:
    #: Folder that holds model versions (one sub-folder each, with ``manifest.json``).
    path: str = "models"


@dataclass
class BenchSettings:
    #: Batch sizes timed by ``inspector bench``.
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2])
    #: Timed repetitions per case (after one warm-up).
    repeats: int = 2
    #: Where the JSON report goes.
    output: str = "bench-results/bench.json"


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    bayes_pfl: BayesPFLSettings = field(default_factory=BayesPFLSettings)
    aa_clip: AAClipSettings = field(default_factory=AAClipSettings)
    winclip: WinCLIPSettings = field(default_factory=WinCLIPSettings)
    musc: MuScSettings = field(default_factory=MuScSettings)
    decisions: DecisionSettings = field(default_factory=DecisionSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    bench: BenchSettings = field(default_factory=BenchSettings)
    #: Named datasets: ``[datasets.mvtec] path = "/data/mvtec_anomaly_detection.tar.xz"`` -> {"mvtec": path}.
    datasets: dict[str, str] = field(default_factory=dict)
    #: ``[[sources]]`` entries: the folders one `inspector watch` serves, each with its class and line.
    sources: list[SourceSettings] = field(default_factory=list)
    #: The file the settings were read from, if any (for messages and relative paths).
    source: str = ""

    def section(self, name: str) -> Any:
        if name not in _SECTIONS:
            raise ConfigError(f"unknown config section [{name}]; known: {', '.join(sorted(_SECTIONS))}")
        return getattr(self, name)

    def set(self, section: str, key: str, value: Any, origin: str = "flag") -> None:
        """Set one key, converting ``value`` to the key's declared type."""
        target = self.section(section)
        types = typing.get_type_hints(type(target))
        if key not in types and (section, key) in MOVED_KEYS:
            raise ConfigError(f"[{section}] {key} ({origin}) is now [{MOVED_KEYS[section, key]}] {key}")
        if key not in types:
            known = ", ".join(f.name for f in dataclasses.fields(target))
            raise ConfigError(f"unknown key '{key}' in [{section}] ({origin}); known: {known}")
        where = f"[{section}] {key} ({origin})"
        setattr(target, key, _check(section, key, _coerce(value, types[key], where), where))

    def override(self, section: str, **values: Any) -> Settings:
        """Apply command-line flags: ``None`` means the flag was not given."""
        for key, value in values.items():
            if value is not None:
                self.set(section, key, value)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}


_SECTIONS = {f.name for f in dataclasses.fields(Settings) if f.name not in ("source", "datasets", "sources")}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    try:
        if origin is list:
            (item_type,) = typing.get_args(typ)
            if isinstance(value, str):
                value = [v for v in (p.strip() for p in value.split(",")) if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError("expected a list")
            return [_coerce(v, item_type, where) for v in value]
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
                return True
            if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off", ""}:
                return False
            raise TypeError("expected true or false")
        if typ is float:
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if typ is int:
            if isinstance(value, bool):
                raise TypeError("expected an integer")
            return int(value)
        if typ is str:
            if not isinstance(value, (str, Path)):
                raise TypeError("expected a string")
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot use {value!r}: {exc}") from None
    raise ConfigError(f"{where}: unsupported type {typ}")  # pragma: no cover


#: allowed values of enumerated keys (the detectors check them again, later and with a traceback)
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("model", "runtime"): ("torch", "onnxruntime", "openvino"),
    ("bayes_pfl", "text_cache"): ("none", "class"),
    ("model", "clip_format"): ("auto", "openai", "open_clip"),
    ("model", "activation"): ("gelu", "quick_gelu"),
    ("aa_clip", "domain"): ("industrial", "medical"),
    ("aa_clip", "attention"): ("auto", "sdpa", "explicit"),
    ("musc", "attention"): ("auto", "sdpa", "explicit"),
    ("musc", "pool_dtype"): ("float32", "float16", "bfloat16"),
    ("musc", "msm"): ("matmul", "cdist"),
}
#: smallest allowed value of numeric keys; (value, True) = strictly greater than value
_MINIMUM: dict[tuple[str, str], tuple[float, bool]] = {
    ("model", "batch_size"): (1, False), ("bayes_pfl", "samples"): (1, False), ("model", "image_size"): (0, False),
    ("bayes_pfl", "topk"): (0, False), ("bayes_pfl", "prototype_images"): (1, False),
    ("watch", "stable_seconds"): (0, False), ("watch", "rescan_seconds"): (0, False),
    ("watch", "lease_seconds"): (0, True), ("watch", "max_attempts"): (1, False), ("watch", "map_size"): (1, False),
    ("watch", "decode_threads"): (1, False), ("watch", "idle_seconds"): (0, False),
    ("watch", "batch_pixel_budget"): (0, False),
    ("train", "epochs"): (1, False), ("train", "batch_size"): (1, False), ("train", "patience"): (0, False),
    ("train", "val_samples"): (1, False), ("aa_clip", "topk"): (1, False), ("winclip", "k_shot"): (0, False),
    ("musc", "pool_size"): (0, False), ("musc", "memory_mb"): (1, False), ("musc", "topk"): (0, False),
    ("dashboard", "page_size"): (1, False), ("bench", "repeats"): (1, False),
}
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
#: the store keeps class names and line labels in varchar(200) columns
NAME_MAX = 200


def check_name(value: str, what: str, required: bool = True) -> str:
    """A class name (or line label): stripped, 1..200 characters, printable. Returns the stripped name."""
    name = value.strip()
    if not name:
        if required:
            raise ConfigError(f"{what}: must not be empty")
        return name
    if len(name) > NAME_MAX:
        raise ConfigError(f"{what}: at most {NAME_MAX} characters, not {len(name)}")
    if not name.isprintable():
        raise ConfigError(f"{what}: {name!r} contains control characters")
    return name


def _check(section: str, key: str, value: Any, where: str) -> Any:
    """Range, enumeration and device checks of one key (raises ConfigError saying what is allowed)."""
    if (section, key) in _CHOICES and value not in _CHOICES[section, key]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(_CHOICES[section, key])}")
    if (section, key) == ("model", "device") and not _DEVICE.fullmatch(value.strip()):
        raise ConfigError(f"{where}: {value!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if (section, key) in _MINIMUM:
        low, strict = _MINIMUM[section, key]
        values = value if isinstance(value, list) else [value]
        if any(not math.isfinite(v) or (v <= low if strict else v < low) for v in values):
            bound = f"greater than {low:g}" if strict else f"at least {low:g}"
            raise ConfigError(f"{where}: must be {bound}, not {value!r}")
    return value


def _source(entry: Any, where: str) -> SourceSettings:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each [[sources]] entry must be a table")
    source = SourceSettings()
    types = typing.get_type_hints(SourceSettings)
    for key, value in entry.items():
        if key not in types:
            known = ", ".join(f.name for f in dataclasses.fields(SourceSettings))
            raise ConfigError(f"{where}: unknown key '{key}'; known: {known}")
        typ = bool if key in ("polling", "hide_paths") else types[key]
        setattr(source, key, _coerce(value, typ, f"{where} {key}"))
    if not source.path or not source.class_name.strip():
        raise ConfigError(f"{where}: path and class_name are required")
    source.class_name = check_name(source.class_name, f"{where} class_name")
    source.line = check_name(source.line, f"{where} line", required=False)
    source.class_description = check_name(source.class_description, f"{where} class_description", required=False)
    if source.model and source.detector:
        raise ConfigError(f"{where}: give model or detector, not both")
    if source.window:
        from .dicom import parse_window

        try:
            parse_window(source.window)
        except ValueError as exc:
            raise ConfigError(f"{where} window: {exc}") from None
    if source.domain and source.domain not in _CHOICES["aa_clip", "domain"]:
        raise ConfigError(f"{where} domain: {source.domain!r} is not one of "
                          f"{', '.join(_CHOICES['aa_clip', 'domain'])}")
    return source


def load_settings(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults < TOML file < environment. ``path=None`` reads ``./config.toml`` when it exists."""
    settings = Settings()
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get("INSPECTOR_CONFIG") or ("config.toml" if Path("config.toml").is_file() else None)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        for section, values in data.items():
            if section == "sources":
                settings.sources = [_source(entry, f"{file}: [[sources]] #{i + 1}") for i, entry in enumerate(
                    values if isinstance(values, list) else [values])]
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{file}: '{section}' must be a [section]")
            if section == "datasets":
                for name, entry in values.items():
                    if not isinstance(entry, dict) or set(entry) != {"path"} or not isinstance(entry["path"], str):
                        raise ConfigError(f"{file}: [datasets.{name}] must have exactly one key, path = \"...\"")
                    settings.datasets[name] = entry["path"]
                continue
            for key, value in values.items():
                settings.set(section, key, value, origin=str(file))
        settings.source = str(file)
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == "INSPECTOR_CONFIG":
            continue
        section, _, key = name[len(ENV_PREFIX):].partition("__")
        settings.set(section.lower(), key.lower(), value, origin=name)
    return settings
