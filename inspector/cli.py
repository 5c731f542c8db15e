"""The ``inspector`` command line. Thin: parse flags, load settings, call a service, print.

A user's mistake (a bad path, an unknown model, a broken config) ends with one clear line on stderr and
exit code 2, never a stack trace. ``--verbose`` shows the trace for bug reports.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import Settings, check_name, load_settings
from .errors import UsageError

app = typer.Typer(help="Batch visual inspection: zero-shot anomaly detection on CLIP (Bayes-PFL, AA-CLIP, WinCLIP).",
                  no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Model versions in the registry (models/).", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
db_app = typer.Typer(help="The database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")
references_app = typer.Typer(help="Normal reference images per class (few-shot WinCLIP+).", no_args_is_help=True)
app.add_typer(references_app, name="references")
console = Console(stderr=True)
out = Console()


class _State:
    config: Path | None = None
    verbose: bool = False


state = _State()


# Built-in defaults, for help texts ("default: [model] batch_size, 8"); config.toml and the environment may
# change them, `inspector config show` prints the effective ones.
DEFAULTS = Settings()

# options shared by several verbs (one definition, one help text). Help texts are plain text: square brackets
# are escaped for rich when the command tree is built (see _tidy_help), so write "[model] detector" as is.
MODEL_OPTION = typer.Option(None, "--model", "-m", help="Registered model name or version folder (default: "
                            "[model] name, else the version promoted for the class).")
DETECTOR_OPTION = typer.Option(None, "--detector", "-d", help="bayes-pfl, aa-clip, winclip or musc (default: "
                               f"[model] detector, {DEFAULTS.model.detector}).")
BACKBONE_OPTION = typer.Option(None, "--backbone", help="open_clip architecture, e.g. test-tiny (default: "
                               "[model] backbone, else the detector's own; ignored with --model).")
PRETRAINED_OPTION = typer.Option(None, "--pretrained", help="Backbone weights: an open_clip pretrained tag, a "
                                 "checkpoint file, or 'random' (default: [model] pretrained, else the detector's "
                                 "own; env INSPECTOR_MODEL__PRETRAINED).")
DATABASE_OPTION = typer.Option(None, "--database", help="Database URL (default: [database] url).")
METRICS_OPTION = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics on this port.")
RANDOM_OPTION = typer.Option(None, "--allow-random-weights",
                             help="Accept random or untrained weights (tests and demos only).")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The CLI boundary: a user's mistake (an ``InspectorError``, an OS error such as a full disk or a missing
    permission, a database that cannot be used) is one red line and exit code 2; anything else is a bug: one
    "internal error" line and exit code 1, or its traceback under ``--verbose``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if state.verbose:
                raise
            if isinstance(exc, _user_error_types()):
                console.print(f"[bold red]error:[/] {escape(_cli_spelling(_one_line(exc), fn))}", highlight=False,
                              soft_wrap=True)  # one line, as long as it is (the terminal wraps it)
                raise typer.Exit(2) from None
            console.print(f"[bold red]internal error:[/] {escape(type(exc).__name__)}: {escape(_one_line(exc))} "
                          "(a bug in inspector: run again with --verbose for the traceback, and report it)",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .errors import InspectorError

    found: list[type[BaseException]] = [InspectorError, OSError]  # OSError: a full disk, a long name, no permission
    if "sqlalchemy.exc" in sys.modules:  # a database that cannot be used (corrupt file, full disk, gone)
        found.append(sys.modules["sqlalchemy.exc"].DBAPIError)
    return tuple(found)


def _one_line(exc: BaseException) -> str:
    """The error as one line: a database error by its driver's first line (not the SQL statement)."""
    if "sqlalchemy.exc" in sys.modules and isinstance(exc, sys.modules["sqlalchemy.exc"].DBAPIError):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"database error: {first}"
    return str(exc)


def _cli_spelling(message: str, fn: Callable[..., Any]) -> str:
    """Python keyword spellings of the verb's options in a message, as flags: ``orphan_masks='ignore'`` ->
    ``--orphan-masks ignore`` (the library's messages name keywords; a CLI user types flags)."""
    import inspect
    import re

    from typer.models import OptionInfo

    flags = {}
    for name, parameter in inspect.signature(fn).parameters.items():
        decls = [d for d in getattr(parameter.default, "param_decls", None) or () if d.startswith("--")]
        if isinstance(parameter.default, OptionInfo):
            flags[name] = max(decls, key=len) if decls else "--" + name.replace("_", "-")

    def flag(m: re.Match[str]) -> str:
        return f"{flags[m.group(1)]} {m.group(3)}" if m.group(1) in flags else m.group(0)

    return re.sub(r"\b([a-z][a-z0-9_]*)=(['\"])([^'\"]*)\2", flag, message)


def settings() -> Settings:
    return load_settings(state.config)


@app.callback()
def main_options(
    config: Path | None = typer.Option(None, "--config", "-c", help="config.toml to read (default ./config.toml "
                                          "or $INSPECTOR_CONFIG)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs and full tracebacks (also after the "
                                 "verb: inspector watch DIR -n NAME --verbose)."),
) -> None:
    """Settings: defaults < config.toml < INSPECTOR_<SECTION>__<KEY> environment variables < flags."""
    state.config, state.verbose = config, verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("inspector").setLevel(logging.DEBUG if verbose else logging.INFO)
    import warnings

    warnings.filterwarnings("ignore", message="RANDOM WEIGHTS")  # logged once by the loader instead


def _model_flags(s: Settings, *, model: str | None = None, backbone: str | None = None,
                 pretrained: str | None = None, head: str | None = None, samples: int | None = None,
                 device: str | None = None, batch_size: int | None = None, allow_random_weights: bool | None = None,
                 detector: str | None = None) -> Settings:
    """The model flags a verb was given (None: not given) over ``s``."""
    if detector is not None:
        from .detectors import detector_class

        detector_class(detector)  # an unknown name is the user's mistake, said before anything loads
    s.override("bayes_pfl", samples=samples)
    return s.override("model", name=model, backbone=backbone, pretrained=pretrained, head=head, device=device,
                      batch_size=batch_size, allow_random_weights=allow_random_weights, detector=detector)


def _random_banner(provenance: dict[str, Any]) -> None:
    if provenance.get("random_weights"):
        console.print("[bold yellow on red] RANDOM OR UNTRAINED WEIGHTS [/] scores below mean nothing "
                      "(tests and demos only).")


@app.command()
@user_errors
def score(
    paths: list[Path] = typer.Argument(..., help="Image or DICOM files, or folders (folders: their images and "
                                       "DICOM files, .dcm or suffix-less with the DICM preamble; sub-folders too "
                                       "with --recursive). A multi-frame DICOM file gives one result per frame."),
    class_name: str = typer.Option(..., "--class-name", "-n", help='Product class, e.g. "metal nut".'),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout (latency_ms: the "
                                 "image's share of its batch's time, i.e. batch time / images in the batch; "
                                 "fallback: why the day-one detector scored instead of the configured one)."),
    maps: Path | None = typer.Option(None, "--maps", help="Write each anomaly map as an 8-bit PNG here, named "
                                     "by the image's path under the common folder (good/000.png -> "
                                     "good_000_map.png)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also score images in sub-folders."),
    window: str | None = typer.Option(None, "--window", help="DICOM window: a preset (brain, subdural, stroke, "
                                      "bone, lung, ...) or \"center/width\" (default: the file's own)."),
    class_description: str | None = typer.Option(None, "--class-description", help="The words the detector's "
                                                 "text prompts use for the class, e.g. \"brain CT slice\" "
                                                 "(default: the class name; a model version of its own)."),
    model: str | None = MODEL_OPTION,
    backbone: str | None = BACKBONE_OPTION,
    pretrained: str | None = PRETRAINED_OPTION,
    head: str | None = typer.Option(None, help="Trained head of the detector (Bayes-PFL: ours or official; "
                                    "default: [model] head)."),
    samples: int | None = typer.Option(None, "--samples", "-R", help="Monte-Carlo samples R (Bayes-PFL; "
                                       f"default: [bayes_pfl] samples, {DEFAULTS.bayes_pfl.samples})."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:1, ... (default: [model] device, "
                                      f"{DEFAULTS.model.device})."),
    batch_size: int | None = typer.Option(None, help="Images per batch (default: [model] batch_size, "
                                          f"{DEFAULTS.model.batch_size})."),
    database: str | None = DATABASE_OPTION,
    allow_random_weights: bool | None = RANDOM_OPTION,
    detector: str | None = DETECTOR_OPTION,
) -> None:
    """Score images now (a progress bar), store the results like `watch` does, and print them."""
    from rich.progress import Progress

    from .dicom import parse_window
    from .intake import is_candidate
    from .pipeline import score_files

    s = _model_flags(settings(), model=model, backbone=backbone, pretrained=pretrained, head=head,
                     samples=samples, device=device, batch_size=batch_size,
                     allow_random_weights=allow_random_weights, detector=detector)
    s.override("database", url=database)
    try:
        parse_window(window)
    except ValueError as exc:
        raise UsageError(f"--window: {exc}") from None
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            files.extend(sorted(p for p in found if p.is_file() and is_candidate(str(p))))
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    if not files:
        raise UsageError("no images found in the given paths" + ("" if recursive else " (sub-folders: --recursive)"))
    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("scoring", total=len(files))
        rows, detector = score_files(s, files, check_name(class_name, "--class-name"), window=window,
                                     class_description=check_name(class_description or "", "--class-description",
                                                                  required=False) or None,
                                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    random_weights = bool(detector.provenance.get("random_weights"))
    fallback = detector.provenance.get("fallback") or None  # the day-one detector scored, not the one asked for
    _random_banner(detector.provenance)
    if fallback:
        console.print(f"[bold yellow]DAY ONE:[/] {escape(fallback)}")
    common = _common_folder([r["path"] for r in rows])
    keys = [_frame_key(r) for r in rows]
    names = _map_names(keys, common) if maps is not None else {}
    replaced = 0
    for row, key in zip(rows, keys):
        png = row.pop("anomaly_map_png")
        if maps is not None and png is not None:
            target = maps / names[key]
            try:
                maps.mkdir(parents=True, exist_ok=True)
                replaced += target.exists()
                target.write_bytes(png)
            except OSError as exc:  # a full disk, a read-only or missing folder: the results are stored
                try:
                    target.unlink(missing_ok=True)  # no half-written map left behind
                except OSError:
                    pass
                raise OSError(f"cannot write the anomaly map {target}: {exc.strerror or exc} (the scores are "
                              "stored in the database)") from None
            row["map"] = str(target)
        if as_json:
            print(json.dumps({**row, "random_weights": random_weights, "fallback": fallback}), flush=True)
    if replaced:
        console.print(f"{replaced} map(s) in {escape(str(maps))} replaced by this run's (same image paths)",
                      highlight=False)
    if not as_json:
        fmt = (lambda v: f"{v:.4f}" if v is not None else "")
        title = f"model version {rows[0]['model_version']}, images under {common}" if rows else None
        table = Table("image", "status", "score", "text", "top-k", "ms/image", "error", title=title)
        table.columns[0].overflow = "fold"  # a path is never cut (no terminal: 80 columns)
        for r in rows:
            frame = f" [frame {r['frame'] + 1} of {r['frames']}]" if r.get("frames", 1) > 1 else ""
            table.add_row(escape(_relative(r["path"], common) + frame), r["status"], fmt(r["image_score"]),
                          fmt(r["text_score"]), fmt(r["topk_score"]),
                          f"{r['latency_ms']:.0f}" if r["latency_ms"] else "", escape(r["error"] or ""))
        out.print(table)
    if any(r["image_score"] is None for r in rows):
        raise typer.Exit(1)


def _common_folder(paths: list[str]) -> Path:
    """The deepest folder holding every path (a single file: its folder)."""
    import os

    if not paths:
        return Path.cwd()
    return Path(os.path.commonpath([str(Path(p).parent) for p in paths]))


def _relative(path: str, folder: Path) -> str:
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return path


def _frame_key(row: dict[str, Any]) -> str:
    """The image a row is: its path, and for a frame of a multi-frame DICOM file "path NUL frame"."""
    return f"{row['path']}\0{row['frame']}" if row.get("frames", 1) > 1 else row["path"]


def _map_names(paths: list[str], common: Path) -> dict[str, str]:
    """A distinct PNG name per image path: its path under ``common``, separators as "_" and the suffix dropped
    (good/000.png -> good_000_map.png; frame 3 of a multi-frame file, ``_frame_key``: ct_frame3_map.png); where two
    images would still share a name (a.png and a.jpg), each gets a short hash of its full path
    (a-1f3c9a2b_map.png), as does a name cut to the file system's 255 bytes."""
    import hashlib
    import os

    def stem_of(key: str) -> str:
        path, _, frame = key.partition("\0")
        return "_".join(Path(_relative(path, common)).with_suffix("").parts) + (f"_frame{frame}" if frame else "")

    stems = {p: stem_of(p) for p in paths}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1  # case-insensitive file systems too
    names = {}
    for path, stem in stems.items():
        tag = "-" + hashlib.sha1(path.encode()).hexdigest()[:8]
        if counts[stem.lower()] > 1:
            stem += tag
        if len(os.fsencode(stem + "_map.png")) > 255:  # over a file name's limit: cut, and keep it distinct
            cut = os.fsencode(stem)[:255 - len(tag) - len("_map.png")]
            stem = cut.decode("utf-8", "ignore") + tag
        names[path] = stem + "_map.png"
    return names


@app.command()
@user_errors
def bench(
    detectors: str | None = typer.Option(None, "--detectors",
                                         help="Comma-separated detectors timed side by side on the same images "
                                              "(default: bayes-pfl,aa-clip,winclip; with --quick every detector)."),
    backbone: str | None = typer.Option(None, help="open_clip architecture for every detector; default each "
                                           "detector's own (ViT-L-14-336, ViT-B-16-plus-240). 'test-tiny' for a "
                                           "quick run."),
    pretrained: str = typer.Option("random", help="Weights; random by default (speed does not depend on them)."),
    batch_sizes: str | None = typer.Option(None, help="Comma-separated batch sizes, e.g. 1,2,8 (default: [bench] "
                                           f"batch_sizes, {','.join(map(str, DEFAULTS.bench.batch_sizes))})."),
    repeats: int | None = typer.Option(None, help="Timed repetitions per case, median reported (default: [bench] "
                                       f"repeats, {DEFAULTS.bench.repeats})."),
    samples: int | None = typer.Option(None, "--samples", "-R", help="Bayes-PFL's R of the 'exact R' and cache "
                                       f"cases (default: [bayes_pfl] samples, {DEFAULTS.bayes_pfl.samples})."),
    references: int = typer.Option(4, help="WinCLIP few-shot case with this many references (0: zero-shot only)."),
    image_size: int | None = typer.Option(None, help="Input side for every detector (default: [model] image_size, "
                                          "0 = each one's own)."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, ... (default: [model] device, "
                                      f"{DEFAULTS.model.device})."),
    precision: str | None = typer.Option(None, help="auto, fp32, bf16, fp16 (CUDA autocast; default: [model] "
                                         f"precision, {DEFAULTS.model.precision})."),
    output: Path | None = typer.Option(None, help=f"JSON report path (default: [bench] output, "
                                       f"{DEFAULTS.bench.output})."),
    runtimes: str = typer.Option("", "--runtimes", help="Also time the exported graphs in these runtimes, e.g. "
                                 "onnxruntime,openvino (ms/image and ratio to the torch fp32 floor, agreement "
                                 "with torch fp32); default none."),
    quick: bool = typer.Option(False, "--quick", help="The GPU check: every detector at batch 1, 8 and 32, 3 "
                               "repeats, and on CUDA the parity of the exact fp32 path with the CPU "
                               "(scripts/gpu-check.sh runs it with the CUDA tests)."),
) -> None:
    """Time each detector against its own backbone floor (and Bayes-PFL's R=1, R=10 and class-cache modes,
    WinCLIP zero- and few-shot, MuSc's pools, and `watch --once` end to end); print the tables and save JSON.

    On a GPU machine: `inspector bench --device cuda --quick` (under 10 minutes on one GPU)."""
    import gc

    import torch

    from .bench import run_bench, side_by_side, write_report
    from .detectors import KINDS, detector_class
    from .versions import load_model

    if detectors is None:
        detectors = ",".join(KINDS) if quick else "bayes-pfl,aa-clip,winclip"
    if quick:
        batch_sizes = batch_sizes or "1,8,32"
        repeats = repeats or 3
    names = [d.strip() for d in detectors.split(",") if d.strip()]
    for name in names:
        detector_class(name)
    reports = []
    for name in names:
        s = settings()
        s.override("model", detector=name, backbone=backbone, pretrained=pretrained, device=device,
                   precision=precision, image_size=image_size, head="", name="")
        s.override("bench", batch_sizes=batch_sizes, repeats=repeats, output=str(output) if output else None)
        s.override("bayes_pfl", samples=samples)  # the pipeline case scores as the line would, at this R
        r = s.bayes_pfl.samples
        model = load_model(settings=s)
        console.print(f"bench {name}: {model.backbone.spec.arch} ({model.backbone.spec.pretrained}) at "
                      f"{model.image_size}px on {model.device}", highlight=False)
        report = run_bench(model, s.bench.batch_sizes, s.bench.repeats, r, references=references,
                           progress=lambda msg: console.print(f"  timing {msg}", highlight=False),
                           parity_device="cpu" if quick and model.device.type == "cuda" else None,
                           runtimes=[r.strip() for r in runtimes.split(",") if r.strip()])
        report["backbone"] = model.backbone.spec.arch
        reports.append(report)
        del model
        gc.collect()
        if torch.cuda.is_available():  # the next detector's backbone gets the memory back
            torch.cuda.empty_cache()
    combined = {"device": reports[0]["device"], "precision": reports[0]["precision"], "detectors": reports,
                "side_by_side": side_by_side(reports)}
    path = write_report(combined, s.bench.output)
    for report in reports:
        table = Table("case", "batch", "ms/image", "images/s", "peak MB", "x floor",
                      title=f"{report['detector']}: {report['device']}, {report['precision']}, {report['backbone']} "
                            f"@ {report['image_size']}px")
        for c in report["cases"]:
            table.add_row(c["name"], str(c["batch_size"]), f"{c['ms_per_image']:.1f}", f"{c['images_per_s']:.2f}",
                          f"{c['peak_memory_mb']:.0f}", f"{c['ratio_to_floor']:.2f}")
        out.print(table)
        for line in (report.get("detector_report") or {}).get("summary") or ():  # a detector's own facts
            out.print(line, highlight=False, soft_wrap=True)
        a = (report.get("detector_report") or {}).get("class_cache_agreement")
        if a:
            out.print(f"class-cache vs exact on {a['images']} images: Spearman {a['spearman_image_score']:.3f}, "
                      f"max map diff {a['max_abs_map_diff']:.4f}, max image-score diff "
                      f"{a['max_abs_image_score_diff']:.4f}")
        for name, c in (report.get("runtime_comparison") or {}).items():
            a = c["agreement"]
            speed = ", ".join(f"{x['case']} batch {x['batch_size']} {x['ms_per_image']:.1f} ms/image "
                              f"({x['ratio_to_fp32_floor']:.2f}x the torch fp32 floor)" for x in c["speed"]
                              if x["ratio_to_fp32_floor"] is not None)
            out.print(f"{name} ({c['export_format']} export) vs torch fp32 on {c['images']} images: max map diff "
                      f"{a['max_abs_map_diff']:.1e}, max image-score diff {a['max_abs_image_score_diff']:.1e}, "
                      f"{a['decision_flips']} decision flip(s); {speed}", highlight=False)
        parity = report.get("device_parity")
        if parity:
            out.print(f"{parity['devices'][0]} vs {parity['devices'][1]} (exact path, fp32, {parity['images']} images): "
                      f"max map diff {parity['max_abs_map_diff']:.2e}, max image-score diff "
                      f"{parity['max_abs_image_score_diff']:.2e}, Spearman {parity['spearman_image_score']:.4f}, "
                      f"{parity['decision_flips']} decision flip(s)", highlight=False)
        out.print(f"pipeline overhead over the {report['main_case']} case (watch --once, PNG files, SQLite): "
                  f"{100 * report['pipeline_overhead']:.1f}%")
        lat = report.get("decision_latency") or {}
        if "p50_ms" in lat:
            out.print(f"file stable -> decision delivered ({lat['broker']}, {lat['events']} events): p50 "
                      f"{lat['p50_ms']:.0f} ms, p95 {lat['p95_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms", highlight=False)
        elif lat:
            out.print(f"decision latency: {lat.get('skipped')}", highlight=False)
    table = Table(title="side by side, same images (each detector against its own backbone's floor)")
    for column in ("detector", "case", "backbone @ px", "batch", "ms/image", "floor", "x floor"):
        table.add_column(column, no_wrap=True)
    for row in combined["side_by_side"]:
        table.add_row(row["detector"], row["case"], f"{row['backbone']} @ {row['image_size']}", str(row["batch_size"]),
                      f"{row['ms_per_image']:.1f}", f"{row['floor_ms_per_image']:.1f}", f"{row['ratio_to_floor']:.2f}")
    out.print(table)
    out.print(f"report: {path}")


@app.command("export")
@user_errors
def export(
    model: str = typer.Argument(..., help="Registered model version (name or version folder), or 'active': the "
                                "version the [model] settings name, else the one promoted for --class-name (or the "
                                "site) in the database."),
    out_dir: Path = typer.Argument(..., help="New folder for the graphs and their manifest "
                                   "(export.json)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx (onnxruntime or OpenVINO read it) or openvino "
                            "(OpenVINO IR)."),
    class_name: str | None = typer.Option(None, "--class-name", "-n", help="With 'active': the class whose "
                                          "promoted version to export."),
    database: str | None = DATABASE_OPTION,
) -> None:
    """Write a model version's scoring graphs (vision tower with its taps; Bayes-PFL's text tower too) for
    [model] runtime = "onnxruntime" or "openvino" on edge PCs; the head stays in torch."""
    from .export import export_model

    s = settings()
    s.override("database", url=database)
    folder, recipe = export_model(s, None if model == "active" else model, fmt, out_dir, class_name=class_name,
                                  progress=lambda msg: console.print(f"  {msg}", highlight=False))
    from .exported import read_manifest

    manifest = read_manifest(folder)
    out.print(f"exported {recipe.name} ({recipe.detector}, {manifest['input_size']} px) to {folder}", highlight=False)
    for name, entry in manifest["graphs"].items():
        worst = max(manifest["check"][name].values(), default=0.0)
        out.print(f"  {name}: {entry['file']} (outputs {', '.join(entry['outputs'])}; max |exported - torch| "
                  f"{worst:.1e})", highlight=False)
    runtime = "onnxruntime" if fmt == "onnx" else "openvino"
    out.print(f"score with it: [model] runtime = \"{runtime}\", export = \"{folder}\"", highlight=False)


@models_app.command("import-official")
@user_errors
def import_official(
    clip: Path = typer.Option(..., help="OpenAI CLIP checkpoint, e.g. ViT-L-14-336px.pt (TorchScript or state dict)."),
    name: str = typer.Option(..., help="Name of the new model version."),
    detector: str = typer.Option("bayes-pfl", "--detector", "-d", help="Detector whose published files these are "
                                 "(bayes-pfl, aa-clip)."),
    head: Path | None = typer.Option(None, help="Bayes-PFL: official head, e.g. train_visa.pth ({'MyModel': ...})."),
    stage: int | None = typer.Option(None, help="Bayes-PFL: 1 or 2; default: the official rule from the file name."),
    text_adapter: Path | None = typer.Option(None, help="AA-CLIP: text_adapter.pth (absent: the frozen CLIP text "
                                                 "encoder, as the official code does)."),
    image_adapter: Path | None = typer.Option(None, help="AA-CLIP: image_adapter_<epoch>.pth."),
    model_config: Path | None = typer.Option(None, help="Open_clip-style JSON architecture of the checkpoint "
                                                  "(only for heads that are not 64 wide)."),
) -> None:
    """Register published checkpoints (Bayes-PFL head, or AA-CLIP adapters) as a model version under models/."""
    from .detectors import detector_class
    from .registry import register_model

    s = settings()
    cls = detector_class(detector)
    imported = cls.import_official(clip, head=head, stage=stage, text_adapter=text_adapter,
                                   image_adapter=image_adapter, model_config=model_config)
    if imported is None:
        raise UsageError(f"{detector} publishes no trained files to import (it needs none)")
    model, origin = imported
    folder = register_model(s.registry.path, name, model, origin)
    stage_note = f", stage {origin['stage']}" if "stage" in origin else ""
    out.print(f"registered [bold]{name}[/] ({detector}{stage_note}) in {folder}")


@models_app.command("promote")
@user_errors
def models_promote(
    name: str = typer.Argument(..., help="Registered model version to make active."),
    class_name: str | None = typer.Option(None, "--class-name", "-n", help="Only for this class (default: site)."),
    rescore: str | None = typer.Option(
        None, "--rescore", metavar="SINCE",
        help="Also re-score history with it, after live images: 'all', a date (2026-11-30) or an age (7d)."),
    who: str | None = typer.Option(None, "--by", help="Who promotes (default: the OS user)."),
    note: str | None = typer.Option(None, help="Why, for the history."),
    database: str | None = DATABASE_OPTION,
) -> None:
    """Make a version the active one (site-wide or for one class): new images switch to it at once, on every
    box sharing the database; the history is kept."""
    from .promotion import promote

    s = settings().override("database", url=database)
    entry = promote(s, name, class_name, who, note, rescore)
    scope = f"class '{class_name}'" if class_name else "the site"
    if entry["random_weights"]:
        console.print(f"[bold yellow]warning:[/] {entry['version']} has random or untrained weights: its scores "
                      "mean nothing (tests and demos only)")
    when = f"{entry['created_at']:%Y-%m-%d %H:%M:%S}"
    out.print(f"{entry['version']} is now active for {scope} (by {entry['created_by']} at {when} UTC)",
              highlight=False)
    if rescore is not None:
        out.print(f"queued {entry['backfill']} images to re-score with it (after live images); progress: "
                  "inspector status", highlight=False)


@models_app.command("shadow")
@user_errors
def models_shadow(
    name: str = typer.Argument(..., help="Registered candidate version."),
    class_name: str | None = typer.Option(None, "--class-name", "-n", help="Only for this class (default: site)."),
    stop: bool = typer.Option(False, "--stop", help="Stop shadowing."),
    who: str | None = typer.Option(None, "--by", help="Who (default: the OS user)."),
    note: str | None = typer.Option(None, help="Why, for the history."),
    database: str | None = DATABASE_OPTION,
) -> None:
    """Score new images with a candidate beside the active version: its results are stored and compared in the
    dashboard, and never drive a decision."""
    from .promotion import shadow

    s = settings().override("database", url=database)
    entry = shadow(s, name, class_name, who, note, stop)
    scope = f"class '{class_name}'" if class_name else "the site"
    verb = "no longer shadows" if stop else "now shadows the active version for"
    out.print(f"{entry['version']} {verb} {scope}", highlight=False)


@models_app.command("history")
@user_errors
def models_history(
    class_name: str | None = typer.Option(None, "--class-name", "-n", help="Only this class."),
    as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
    database: str | None = DATABASE_OPTION,
) -> None:
    """Every promotion and shadow start/stop: who, when, why."""
    from .promotion import history

    rows = history(settings().override("database", url=database), class_name)
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table("when (UTC)", "action", "version", "scope", "by", "note")
    for r in rows:
        table.add_row(f"{r['created_at']:%Y-%m-%d %H:%M:%S}", r["action"], r["model"], r["class_name"] or "site",
                      r["created_by"], r["note"] or "")
    out.print(table)


@models_app.command("list")
@user_errors
def models_list(as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
                database: str | None = DATABASE_OPTION) -> None:
    """List the registered model versions, with where each is active or in shadow."""
    from .promotion import placements
    from .registry import list_versions

    s = settings().override("database", url=database)
    versions = list_versions(s.registry.path)
    where = placements(s)
    for v in versions:
        v.update(where.get(v["name"], {"active_for": [], "shadow_for": []}))
    if as_json:
        out.print_json(json.dumps(versions))
        return
    table = Table("name", "detector", "backbone", "created", "origin", "active for", "shadow for")
    for v in versions:
        table.add_row(v["name"], v.get("detector", ""), str(v["backbone"].get("pretrained")), v.get("created", ""),
                      v.get("origin", {}).get("kind", ""), ", ".join(v["active_for"]), ", ".join(v["shadow_for"]))
    out.print(table)


@models_app.command("show")
@user_errors
def models_show(name: str = typer.Argument(..., help="Model name or version folder.")) -> None:
    """Print a model version's manifest."""
    from .registry import read_manifest, resolve

    out.print_json(json.dumps(read_manifest(resolve(name, settings().registry.path))))


@config_app.command("show")
@user_errors
def config_show() -> None:
    """Print the effective settings (after config file and environment) as JSON."""
    s = settings()
    out.print_json(json.dumps({"source": s.source or None, **masked_settings(s.as_dict())}))


SECRET_KEY = r"(?i)password|passwd|secret|token|api_?key"


def masked_settings(values: Any) -> Any:
    """Settings to print: every non-empty key named like a secret becomes "***", and so does the password of
    any URL (``postgresql+psycopg://user:***@host/db``)."""
    import re

    if isinstance(values, dict):
        return {k: "***" if re.search(SECRET_KEY, str(k)) and values[k] not in ("", None) else masked_settings(values[k])
                for k in values}
    if isinstance(values, list):
        return [masked_settings(v) for v in values]
    if isinstance(values, str) and "://" in values and "@" in values:
        return re.sub(r"^([^:/?#]+://[^:/@]*:)[^@]*@", r"\1***@", values)
    return values


@app.command()
@user_errors
def watch(
    folders: list[Path] = typer.Argument(None, help="Folders to watch (a camera's drop folder); none = the "
                                         "[[sources]] of the config file."),
    class_name: str | None = typer.Option(None, "--class-name", "-n",
                                          help='Product class of these images, e.g. "metal nut".'),
    model: str | None = MODEL_OPTION,
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also watch sub-folders (cameras that file by date)."),
    polling: bool | None = typer.Option(None, "--polling", help="Poll instead of inotify (network shares)."),
    once: bool = typer.Option(False, "--once", help="Score the backlog and exit 0."),
    line: str | None = typer.Option(None, help="Line label stored with the source."),
    database: str | None = DATABASE_OPTION,
    metrics_port: int | None = METRICS_OPTION,
    allow_random_weights: bool | None = RANDOM_OPTION,
    detector: str | None = DETECTOR_OPTION,
    backbone: str | None = BACKBONE_OPTION,
    pretrained: str | None = PRETRAINED_OPTION,
) -> None:
    """Watch folders and score every new image into the database (runs until SIGTERM / Ctrl-C).

    One daemon serves many lines: without folder arguments it watches every [[sources]] entry of the config
    file, each with its class, line and (optionally) its own model or detector, loading each distinct model
    once. A folder without its own model scores with the version promoted for its class; `--model` or
    `--detector` pins the folders given here."""
    import threading

    from .intake import WatchedFolder
    from .pipeline import install_signal_handlers
    from .pipeline import watch as run_watch

    s = _model_flags(settings(), backbone=backbone, pretrained=pretrained,
                     allow_random_weights=allow_random_weights)
    s.override("watch", polling=polling)
    s.override("database", url=database)
    watched = []
    if folders:
        if not class_name or not class_name.strip():
            raise UsageError("--class-name is required with folder arguments (the product class of their images)")
        if detector is not None:
            _model_flags(s, detector=detector)  # checks the name
        for folder in folders:
            watched.append(WatchedFolder(_folder(folder), class_name.strip(), recursive, line, model=model,
                                         detector=detector))
    else:
        if not s.sources:
            raise UsageError("give folders to watch (inspector watch DIR --class-name NAME) or [[sources]] "
                             "entries in the config file")
        for entry in s.sources:
            watched.append(WatchedFolder(_folder(Path(entry.path).expanduser()), entry.class_name.strip(),
                                         entry.recursive, entry.line or None, model=entry.model or None,
                                         detector=entry.detector or None, polling=entry.polling,
                                         window=entry.window or None, domain=entry.domain or None,
                                         class_description=entry.class_description or None,
                                         hide_paths=entry.hide_paths))
    stop = threading.Event()
    install_signal_handlers(stop)
    if not once:
        console.print(f"watching {', '.join(str(f.path) for f in watched)} -> {s.database.url} (Ctrl-C to stop)")
    summary = run_watch(s, watched, once=once, stop=stop, metrics_port=metrics_port)
    if summary["random_weights"]:
        _random_banner({"random_weights": True})
    if summary["fallback"]:
        console.print(f"[bold yellow]DAY ONE:[/] {escape(summary['fallback'])}")
    console.print(f"stored {summary['stored']} results, {summary['failed']} failed, in {summary['seconds']:.1f}s "
                  f"(model {summary['model_version']})", highlight=False)


def _folder(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"not a folder: {path}")
    return path.resolve()


@app.command()
@user_errors
def worker(
    model: str | None = MODEL_OPTION,
    database: str | None = DATABASE_OPTION,
    metrics_port: int | None = METRICS_OPTION,
    allow_random_weights: bool | None = RANDOM_OPTION,
    detector: str | None = DETECTOR_OPTION,
    once: bool = typer.Option(False, "--once", help="Exit 0 once no job this box can serve is waiting."),
    backbone: str | None = BACKBONE_OPTION,
    pretrained: str | None = PRETRAINED_OPTION,
) -> None:
    """Score queued images only (no intake): extra GPU boxes sharing one Postgres.

    Without --model / --detector it serves every model version with work waiting that it can build (the
    registry folder is shared), following promotions made on any box; with one, only that version."""
    import threading

    from .pipeline import install_signal_handlers, run_worker

    s = _model_flags(settings(), model=model, backbone=backbone, pretrained=pretrained,
                     allow_random_weights=allow_random_weights, detector=detector)
    s.override("database", url=database)
    stop = threading.Event()
    install_signal_handlers(stop)
    stored = run_worker(s, stop, metrics_port, pinned=bool(model or detector), until_empty=once)
    console.print(f"worker stopped after storing {stored} results")


@app.command()
@user_errors
def status(
    as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
    database: str | None = DATABASE_OPTION,
    escape_days: float = typer.Option(7.0, "--escape-days", min=0.01,
                                      help="Window of the escape-rate estimate, in days."),
) -> None:
    """Queue depth per model version, backfill progress, throughput, the outbox per sink, the escape rate per
    class and line, errors and the active versions."""
    from .status import status_json

    s = settings().override("database", url=database)
    data = json.loads(status_json(s, escape_days))
    if as_json:
        print(json.dumps(data))
        return
    rate = data["images_per_second"]
    out.print(f"queue depth      {data['queue_depth']}")
    out.print(f"images           {data['by_status']}")
    out.print(f"last {data['window_minutes']} min     {data['scored_last_window']} scored"
              + (f" ({rate:.2f} images/s over the window)" if rate else ""))
    out.print(f"active model     {data['active_model']}" + (" (RANDOM WEIGHTS)" if data["active_model_random_weights"]
                                                         else ""), highlight=False)
    for name, version in data.get("active_by_class", {}).items():
        out.print(f"  {name:<14} {version}", highlight=False, markup=False)
    if data.get("active_model_fallback"):
        out.print(f"day one          {data['active_model_fallback']}", highlight=False, markup=False)
    if data.get("versions"):
        table = Table("model version", "queued", "claimed", "done", "failed", "backfill")
        for v in data["versions"]:
            b = v["backfill"]
            table.add_row(v["model_version"], str(v["queued"]), str(v["claimed"]), str(v["done"]), str(v["failed"]),
                          f"{b['done'] + b['failed']}/{b['total']}" if b["total"] else "")
        out.print(table)
    for sink, b in data.get("outbox", {}).items():
        out.print(f"outbox {sink:<9} {b['pending']} pending, oldest {b['oldest_seconds']:.0f}s"
                  + (f" ({b['last_error']})" if b["last_error"] else "")
                  + (" -- OVER [outputs] backlog_warn: is the sink down?" if b["pending"] > s.outputs.backlog_warn
                     else ""), highlight=False, markup=False)
    for e in data.get("escape", []):
        if e["audited"]:
            low, high = e["interval"]
            out.print(f"escape rate      {e['class_name']}/{e['line'] or '-'}: {e['escapes_found']} defects in "
                      f"{e['audited']} audited passes = {100 * e['rate']:.2f}% (95% {100 * low:.2f}-{100 * high:.2f}%)"
                      f", about {e['estimated_escapes']:.0f} of {e['passes']} passes in {data['escape_window_days']:g} d",
                      highlight=False, markup=False)
    for e in data["errors"]:
        out.print(f"error x{e['count']:<6} {e['error']}", highlight=False, markup=False)


@db_app.command("upgrade")
@user_errors
def db_upgrade(database: str | None = DATABASE_OPTION) -> None:
    """Create the schema, or migrate it to the current version."""
    from .store.db import upgrade

    s = settings().override("database", url=database)
    revision = upgrade(s.database.url)
    out.print(f"database at revision {revision}")


@app.command()
@user_errors
def demo(
    out_dir: Path = typer.Option(Path("inspector-demo"), "--out", help="Folder for the generated images."),
    count: int = typer.Option(8, help="How many sample images to generate."),
    samples: int | None = typer.Option(None, "--samples", "-R", help="Monte-Carlo samples R (default: [model] "
                                       f"samples, {DEFAULTS.bayes_pfl.samples})."),
) -> None:
    """Generate sample images, run `watch --once` on them with the configured model (test-tiny random weights
    when no trained model is configured, with a banner saying so) and print the results."""
    import threading

    from sqlalchemy import select

    from .bench import synthetic_images
    from .intake import WatchedFolder
    from .pipeline import watch as run_watch
    from .store import images, make_engine, results

    s = settings().override("bayes_pfl", samples=samples)
    images_dir = out_dir / "line1"
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(synthetic_images(count, size=320, seed=7)):
        target = images_dir / f"sample_{i:02d}.png"
        if not target.exists():
            image.save(target)
    if not (s.model.name or s.model.head):
        console.print("[bold yellow]No trained model configured: scoring with the training-free fallback "
                      f"({s.model.fallback}) on the test-tiny backbone with random weights (no weights can be "
                      "assumed on this machine). Scores show the plumbing, not accuracy.[/]")
        s.override("model", backbone="test-tiny", pretrained="random", image_size=s.model.image_size or 224,
                   allow_random_weights=True)
    summary = run_watch(s, [WatchedFolder(images_dir.resolve(), "demo part")], once=True, stop=threading.Event())
    engine = make_engine(s.database.url)
    with engine.connect() as conn:
        rows = conn.execute(select(images.c.path, images.c.status, images.c.error, results.c.image_score,
                                   results.c.latency_ms).join(results, results.c.image_id == images.c.id,
                                                              isouter=True)
                            .where(images.c.path.like(str(images_dir.resolve()) + "%")).order_by(images.c.id)).all()
    engine.dispose()
    table = Table("image", "status", "score", "ms")
    for r in rows:
        table.add_row(Path(r.path).name, r.status, f"{r.image_score:.4f}" if r.image_score is not None else "",
                      f"{r.latency_ms:.0f}" if r.latency_ms else "")
    out.print(table)
    if summary["random_weights"]:
        _random_banner({"random_weights": True})
    out.print(f"{summary['stored']} new results in {s.database.url}. Next: `inspector status`, or watch a folder: "
              "inspector watch DIR --class-name NAME")


@app.command()
@user_errors
def retrain(
    aux: str = typer.Option(..., "--aux", help="Auxiliary dataset: a name from [datasets.NAME] or a path/archive."),
    name: str | None = typer.Option(None, "--name", help="Name of the new model version (default: retrain-<aux>-<date>)."),
    epochs: int | None = typer.Option(None, help=f"Epochs (default: [train] epochs, {DEFAULTS.train.epochs})."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per step (default: [train] "
                                          f"batch_size, {DEFAULTS.train.batch_size})."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of the same --name."),
    backbone: str | None = typer.Option(None, help="open_clip architecture of the frozen backbone."),
    pretrained: str | None = typer.Option(None, help="Backbone weights: tag, checkpoint file, or 'random'."),
    head: str | None = typer.Option(None, help="Start from this head instead of the official initialisation."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, ..."),
    orphan_masks: str = typer.Option("error", help="Masks without an image: 'error' or 'ignore'."),
    allow_random_weights: bool | None = RANDOM_OPTION,
    detector: str | None = DETECTOR_OPTION,
    text_epochs: int | None = typer.Option(None, "--text-epochs", help="AA-CLIP: epochs of stage 1 (text "
                                           "adapters; the paper: 5). --epochs sets stage 2 (image adapters; 20)."),
) -> None:
    """Train a detector's learnable parts on an auxiliary dataset (its test split, as the papers do) and
    register the result as a new model version. Bayes-PFL: both flow stages with validation-driven stage
    switch; AA-CLIP: text adapters, then image adapters (the official two stages)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .training import retrain as run_retrain

    s = _model_flags(settings(), backbone=backbone, pretrained=pretrained, head=head, device=device,
                     allow_random_weights=allow_random_weights, detector=detector)
    s.override("train", epochs=epochs, batch_size=batch_size)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[losses]}"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("epoch 1", total=1, losses="")

        def on_step(_phase: str, step: int, steps: int, losses: dict[str, float]) -> None:
            bar.update(task, total=steps, completed=step,
                       losses=" ".join(f"{k} {v:.3f}" for k, v in losses.items()))

        def started(plan: Any) -> None:
            console.print(f"retrain {plan.name} ({plan.detector}): {plan.images} images of {plan.classes} classes "
                          f"from {plan.dataset}; checkpoints in {plan.run_dir}", highlight=False)

        folder, state = run_retrain(s, aux, name, resume=resume, text_epochs=text_epochs, orphan_masks=orphan_masks,
                                    progress=on_step, started=started)
    out.print(f"registered [bold]{folder.name}[/] in {folder} after {state.epoch} epochs (stage {state.stage})")


@app.command("eval")
@user_errors
def eval_(
    data: str = typer.Option(..., "--data", help="Dataset: a name from [datasets.NAME] or a path/archive."),
    model: str | None = MODEL_OPTION,
    samples: int | None = typer.Option(None, "--samples", "-R", help="Monte-Carlo samples R (default: [model] "
                                       f"samples, {DEFAULTS.bayes_pfl.samples})."),
    score: str = typer.Option("official", help="Image score: 'official' (per-class min-max fusion, for "
                              "comparison with papers) or 'live' (the per-image score inspector stores)."),
    json_file: Path | None = typer.Option(None, "--json", help="Write the metrics as JSON here."),
    plots: Path | None = typer.Option(None, "--plots", help="Write image ROC and PR curves as PNG here."),
    orphan_masks: str = typer.Option("error", help="Masks without an image: 'error' or 'ignore'."),
    allow_random_weights: bool | None = RANDOM_OPTION,
    detector: str | None = DETECTOR_OPTION,
) -> None:
    """Image AUROC/AP/F1-max and pixel AUROC/AP/F1-max/AUPRO per class and mean on a labelled test split,
    with the protocol of the detector's paper ('official') or the stored per-image score ('live')."""
    from rich.progress import Progress

    from .data import ArchiveLimits, load_dataset
    from .evaluation import ProgressLines, evaluate_rows, score_dataset
    from .pipeline import load_detector
    from .training import dataset_path

    s = _model_flags(settings(), model=model, samples=samples, allow_random_weights=allow_random_weights,
                     detector=detector)
    path = dataset_path(s, data)
    limits = ArchiveLimits.from_settings(s.data)
    records = [r for r in load_dataset(path, orphan_masks=orphan_masks, limits=limits) if r.split == "test"]
    if not records:
        raise UsageError(f"{path}: no test-split images")
    detector = load_detector(s)
    _random_banner(detector.provenance)
    if not console.is_terminal:  # no bar can be drawn (a log file, CI): a line every 10 % or 30 s
        lines = ProgressLines(len(records), lambda line: console.print(line, highlight=False, markup=False))
        rows = score_dataset(detector, records, None, s.model.batch_size, progress=lines, score=score)
    else:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("scoring", total=len(records))
            rows = score_dataset(detector, records, None, s.model.batch_size,
                                 progress=lambda n: bar.advance(task, n), score=score)
    report = evaluate_rows(rows, detector.eval_protocol, score)
    report["model"] = detector.provenance
    report["detector"] = detector.name
    report["dataset"] = str(path)
    report["image_score"] = score
    names = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"]
    table = Table("class", *[n.replace("_", " ") for n in names], title=f"{path} ({score} image score)")
    fmt = (lambda v: f"{100 * v:.1f}" if isinstance(v, (int, float)) and not math.isnan(v) else "-")
    for class_name, metrics in sorted(report["per_class"].items()):
        table.add_row(class_name, *[fmt(metrics.get(n)) for n in names])
    table.add_row("[bold]mean[/]", *[fmt(report["mean"].get(n)) for n in names])
    out.print(table)
    if plots:
        from .evaluation import write_plots

        for written in write_plots(rows, plots, detector.eval_protocol, score):
            out.print(f"plot: {written}")
    if json_file:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
        out.print(f"metrics: {json_file}")


@references_app.command("add")
@user_errors
def references_add(
    images: list[Path] = typer.Argument(..., help="Normal (defect-free) images of the class."),
    class_name: str = typer.Option(..., "--class-name", "-n", help='Product class, e.g. "metal nut".'),
) -> None:
    """Store normal reference images of a class: WinCLIP scores that class few-shot (WinCLIP+) from then on.

    Every file is checked first; a bad one stops the command and nothing is added."""
    from .references import ReferenceStore

    store = ReferenceStore(settings().winclip.references)
    added = store.add(class_name, images)
    total = len(store.list(class_name))
    out.print(f"{len(added)} reference image(s) added for '{class_name}' ({total} in all) in {store.folder}",
              highlight=False)


@references_app.command("list")
@user_errors
def references_list(as_json: bool = typer.Option(False, "--json", help="JSON on stdout.")) -> None:
    """Classes with reference images, and how many each has."""
    from .references import ReferenceStore

    store = ReferenceStore(settings().winclip.references)
    counts = {name: len(store.list(name)) for name in store.classes()}
    if as_json:
        print(json.dumps(counts))
        return
    table = Table("class", "references")
    for name, count in sorted(counts.items()):
        table.add_row(name, str(count))
    out.print(table)


@references_app.command("remove")
@user_errors
def references_remove(class_name: str = typer.Option(..., "--class-name", "-n", help="Product class.")) -> None:
    """Forget the reference images of a class (WinCLIP scores it zero-shot again)."""
    from .references import ReferenceStore

    ReferenceStore(settings().winclip.references).remove(class_name)
    out.print(f"references of '{class_name}' removed", highlight=False)


@app.command("demo-data")
@user_errors
def demo_data(
    out_dir: Path = typer.Argument(..., help="Folder to create (MVTec AD layout)."),
    classes: int = typer.Option(3, "--classes", help="How many synthetic classes."),
    seed: int = typer.Option(0, help="Random seed (the same seed gives the same files)."),
) -> None:
    """Generate synthetic textures and objects with defects and exact masks, in MVTec AD layout."""
    from .data.synthetic import make_synthetic

    root = make_synthetic(out_dir, classes=classes, seed=seed)
    out.print(f"synthetic dataset with {classes} classes in {root}")


@app.command()
@user_errors
def dashboard(
    port: int | None = typer.Option(None, help=f"Port (default: [dashboard] port, {DEFAULTS.dashboard.port})."),
    address: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 to serve the network)."),
    database: str | None = DATABASE_OPTION,
) -> None:
    """Start the review and threshold dashboard (Streamlit) on the configured database."""
    import os
    import sys

    s = settings().override("dashboard", port=port).override("database", url=database)
    from importlib import resources

    app_path = Path(str(resources.files("inspector._dashboard") / "app.py"))  # the top-level dashboard/
    if not app_path.is_file():
        raise FileNotFoundError(f"dashboard app not found at {app_path}")
    env = dict(os.environ, INSPECTOR_DATABASE__URL=s.database.url)
    if state.config:
        env["INSPECTOR_CONFIG"] = str(state.config.resolve())
    if not s.dashboard.password and not is_loopback(address):
        console.print(f"[bold yellow]warning:[/] the dashboard serves {escape(address)} without a password; set "
                      "INSPECTOR_DASHBOARD__PASSWORD (or --address 127.0.0.1)", highlight=False)
    console.print(f"dashboard on http://{address}:{s.dashboard.port} ({masked_settings(s.database.url)})",
                  highlight=False)
    argv = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.fileWatcherType", "none",
            "--server.port", str(s.dashboard.port), "--server.address", address, "--server.headless", "true",
            "--browser.gatherUsageStats", "false"]
    os.execvpe(sys.executable, argv, env)


def is_loopback(address: str) -> bool:
    """Whether a listen address serves this machine only ("localhost", 127.x, ::1); "" and 0.0.0.0 do not."""
    import ipaddress

    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def _tidy_help(command: Any) -> None:
    """Help as a user reads it, whichever Typer renders it: help texts are plain text (rich markup escaped, so
    "[model] detector" is printed, not taken as a style); flags show no value type (not `<bool>`);
    positionals are named in capitals, PATHS..., with no `<list[Path]>` type and no `{paths}...` in the
    usage line. Duck-typed: recent Typer builds on its own copy of click."""
    for attr in ("help", "short_help"):
        if getattr(command, attr, None):
            setattr(command, attr, escape(getattr(command, attr)))
    for param in command.params:
        if getattr(param, "help", None):
            param.help = escape(param.help)
        if param.param_type_name == "option" and getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.param_type_name == "argument":
            label = param.name.upper() + ("..." if param.nargs != 1 else "")
            param.metavar = label
            if hasattr(param, "_usage_display_name"):  # Typer >= 0.2x writes {name}... / [name]...
                param._usage_display_name = lambda label=label, required=param.required: (
                    label if required else f"[{label}]")
            if hasattr(param, "display_type_rich"):
                param.display_type_rich = lambda ctx: None
    get_help_option = command.get_help_option

    def help_option(ctx: Any) -> Any:  # --help is made on demand, not one of command.params
        option = get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in (getattr(command, "commands", None) or {}).values():
        _tidy_help(sub)


def _verbose_anywhere(argv: list[str]) -> list[str]:
    """``--verbose`` / ``-v`` after the verb (``inspector watch DIR -n NAME --verbose``) as if before it: the
    flag belongs to the top level, where it also configures logging before anything loads."""
    end = argv.index("--") if "--" in argv else len(argv)
    keep = [a for i, a in enumerate(argv) if i >= end or a not in ("--verbose", "-v")]
    return argv if len(keep) == len(argv) else ["--verbose", *keep]


def main() -> None:
    import typer.main

    command = typer.main.get_command(app)
    _tidy_help(command)
    command.main(args=_verbose_anywhere(sys.argv[1:]), prog_name="inspector")


if __name__ == "__main__":
    main()
