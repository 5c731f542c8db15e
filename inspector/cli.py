"""The ``inspector`` command line. Thin: parse flags, load settings, call a service, print.

A user's mistake (a bad path, an unknown model, a broken config) ends with one clear line on stderr and
exit code 2, never a stack trace. ``--verbose`` shows the trace for bug reports.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import ConfigError, Settings, load_settings

app = typer.Typer(help="Batch visual inspection: Bayes-PFL anomaly detection on CLIP.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Model versions in the registry (models/).", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
console = Console(stderr=True)
out = Console()


class _State:
    config: Optional[Path] = None
    verbose: bool = False


state = _State()


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .backbone import BackboneError
        from .detectors.bayes_pfl.head import HeadFormatError
        from .imaging import ImageDecodeError
        from .registry import RegistryError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, BackboneError, HeadFormatError, RegistryError, ImageDecodeError, ValueError,
                FileNotFoundError) as exc:
            if state.verbose:
                raise
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def settings() -> Settings:
    return load_settings(state.config)


@app.callback()
def main_options(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="config.toml to read (default ./config.toml "
                                          "or $INSPECTOR_CONFIG)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs and full tracebacks."),
) -> None:
    """Settings: defaults < config.toml < INSPECTOR_<SECTION>__<KEY> environment variables < flags."""
    state.config, state.verbose = config, verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("inspector").setLevel(logging.DEBUG if verbose else logging.INFO)
    import warnings

    warnings.filterwarnings("ignore", message="RANDOM WEIGHTS")  # logged once by the loader instead


def _model_flags(s: Settings, model: Optional[str], backbone: Optional[str], pretrained: Optional[str],
                 head: Optional[str], samples: Optional[int], device: Optional[str], batch_size: Optional[int] = None,
                 allow_random_weights: Optional[bool] = None) -> Settings:
    return s.override("model", name=model, backbone=backbone, pretrained=pretrained, head=head, samples=samples,
                      device=device, batch_size=batch_size, allow_random_weights=allow_random_weights)


def _random_banner(provenance: dict[str, Any]) -> None:
    if provenance.get("random_weights"):
        console.print("[bold yellow on red] RANDOM OR UNTRAINED WEIGHTS [/] scores below mean nothing "
                      "(tests and demos only).")


@app.command()
@user_errors
def score(
    paths: List[Path] = typer.Argument(..., help="Image files or folders (folders: their images, not recursive)."),
    class_name: str = typer.Option(..., "--class-name", "-n", help='Product class, e.g. "metal nut".'),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout."),
    maps: Optional[Path] = typer.Option(None, "--maps", help="Write each anomaly map as an 8-bit PNG here."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model name or version folder."),
    backbone: Optional[str] = typer.Option(None, help="open_clip architecture (without --model)."),
    pretrained: Optional[str] = typer.Option(None, help="Pretrained tag, checkpoint file, or 'random'."),
    head: Optional[str] = typer.Option(None, help="Bayes-PFL head checkpoint (ours or official)."),
    samples: Optional[int] = typer.Option(None, "--samples", "-R", help="Monte-Carlo samples R."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1, ..."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch."),
    allow_random_weights: Optional[bool] = typer.Option(None, "--allow-random-weights", help="Accept random or "
                                                        "untrained weights (tests and demos only)."),
) -> None:
    """Score images once and print their scores (no database)."""
    from rich.progress import Progress

    from .engine import Engine
    from .imaging import IMAGE_SUFFIXES
    from .registry import load_model

    s = _model_flags(settings(), model, backbone, pretrained, head, samples, device, batch_size, allow_random_weights)
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    if not files:
        raise ValueError("no images found in the given paths")
    m = s.model
    if not m.allow_random_weights and not m.name and (m.pretrained == "random" or not m.head):
        raise ValueError("no trained model configured (random backbone or no [model] head); configure [model] "
                         "name, or head and pretrained, or pass --allow-random-weights for a test run")
    detector = load_model(settings=s)
    if detector.provenance.get("random_weights") and not s.model.allow_random_weights:
        raise ValueError("the configured model has random or untrained weights; configure [model] name / head / "
                         "pretrained, or pass --allow-random-weights for a test run")
    _random_banner(detector.provenance)
    engine = Engine(detector, batch_size=s.model.batch_size)
    results = []
    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("scoring", total=len(files))
        for record in engine.score(((f, class_name) for f in files), on_batch=lambda n: bar.advance(task, n)):
            results.append(record)
            if maps is not None and record.ok:
                from .imaging import save_map_png

                save_map_png(record.anomaly_map, maps / (Path(str(record.source)).stem + "_map.png"))
            if as_json:
                print(json.dumps({**record.as_dict(), "random_weights": bool(
                    detector.provenance.get("random_weights"))}), flush=True)
    if not as_json:
        table = Table("image", "score", "text", "top-k", "ms", "error")
        for r in results:
            fmt = (lambda v: f"{v:.4f}" if v is not None else "")
            table.add_row(str(r.source), fmt(r.image_score), fmt(r.text_score), fmt(r.topk_score),
                          f"{r.latency_ms:.0f}" if r.latency_ms else "", r.error or "")
        out.print(table)
    if any(not r.ok for r in results):
        raise typer.Exit(1)


@app.command()
@user_errors
def bench(
    backbone: Optional[str] = typer.Option(None, help="open_clip architecture; default the configured one "
                                           "(ViT-L-14-336). 'test-tiny' for a quick run."),
    pretrained: str = typer.Option("random", help="Weights; random by default (speed does not depend on them)."),
    batch_sizes: Optional[str] = typer.Option(None, help="Comma-separated batch sizes, e.g. 1,2,8."),
    repeats: Optional[int] = typer.Option(None, help="Timed repetitions per case (median reported)."),
    samples: Optional[int] = typer.Option(None, "--samples", "-R", help="R of the 'exact R' and cache cases."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, ..."),
    precision: Optional[str] = typer.Option(None, help="auto, fp32, bf16, fp16 (CUDA autocast)."),
    output: Optional[Path] = typer.Option(None, help="JSON report path."),
) -> None:
    """Time the backbone floor, the exact path at R=1 and R=10 and the class-cache mode; print and save JSON."""
    from .bench import run_bench, write_report
    from .registry import load_model

    s = settings()
    s.override("model", backbone=backbone, pretrained=pretrained, device=device, precision=precision, head="",
               name="")
    s.override("bench", batch_sizes=batch_sizes, repeats=repeats, output=str(output) if output else None)
    r = samples or s.model.samples
    detector = load_model(settings=s)
    console.print(f"bench: {s.model.backbone} ({s.model.pretrained}) at {s.model.image_size}px on {detector.device}")
    report = run_bench(detector, s.bench.batch_sizes, s.bench.repeats, r,
                       progress=lambda msg: console.print(f"  timing {msg}", highlight=False))
    report["backbone"] = s.model.backbone
    path = write_report(report, s.bench.output)
    table = Table("case", "batch", "ms/image", "images/s", "peak MB", "x floor",
                  title=f"{report['device']}, {report['precision']}, {s.model.backbone} @ {report['image_size']}px")
    for c in report["cases"]:
        table.add_row(c["name"], str(c["batch_size"]), f"{c['ms_per_image']:.1f}", f"{c['images_per_s']:.2f}",
                      f"{c['peak_memory_mb']:.0f}", f"{c['ratio_to_floor']:.2f}")
    out.print(table)
    a = report["class_cache_agreement"]
    out.print(f"class-cache vs exact on {a['images']} images: Spearman {a['spearman_image_score']:.3f}, "
              f"max map diff {a['max_abs_map_diff']:.4f}, max image-score diff {a['max_abs_image_score_diff']:.4f}")
    out.print(f"report: {path}")


@models_app.command("import-official")
@user_errors
def import_official(
    clip: Path = typer.Option(..., help="OpenAI CLIP checkpoint, e.g. ViT-L-14-336px.pt (TorchScript or state dict)."),
    head: Path = typer.Option(..., help="Official Bayes-PFL head, e.g. train_visa.pth ({'MyModel': ...})."),
    name: str = typer.Option(..., help="Name of the new model version."),
    stage: Optional[int] = typer.Option(None, help="1 or 2; default: the official rule from the file name."),
) -> None:
    """Register the published Bayes-PFL checkpoints as a model version under models/."""
    from .backbone import BackboneSpec, read_openai_state_dict
    from .detectors.bayes_pfl import BayesPFLHead
    from .registry import register, sha256_of

    s = settings()
    state_dict = read_openai_state_dict(clip)  # validates the file before anything is written
    head_module = BayesPFLHead.load(head, stage=stage)
    width = state_dict["visual.conv1.weight"].shape[0]
    if head_module.config.vision_width != width:
        raise ValueError(f"{head} was trained for a vision width of {head_module.config.vision_width}, "
                         f"{clip} has {width}")
    spec = BackboneSpec(arch="openai-checkpoint", pretrained=str(clip), clip_format="openai", activation="gelu")
    origin = {"kind": "official-bayes-pfl", "head_file": str(head.resolve()), "head_file_sha256": sha256_of(head),
              "stage": head_module.config.stage}
    folder = register(s.registry.path, name, head_module, spec, origin)
    out.print(f"registered [bold]{name}[/] in {folder} (stage {head_module.config.stage})")


@models_app.command("list")
@user_errors
def models_list(as_json: bool = typer.Option(False, "--json", help="JSON on stdout.")) -> None:
    """List the registered model versions."""
    from .registry import list_versions

    versions = list_versions(settings().registry.path)
    if as_json:
        out.print_json(json.dumps(versions))
        return
    table = Table("name", "detector", "backbone", "created", "origin")
    for v in versions:
        table.add_row(v["name"], v.get("detector", ""), str(v["backbone"].get("pretrained")), v.get("created", ""),
                      v.get("origin", {}).get("kind", ""))
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
    out.print_json(json.dumps({"source": s.source or None, **s.as_dict()}))


@app.command()
@user_errors
def demo(
    out_dir: Path = typer.Option(Path("inspector-demo"), "--out", help="Folder for the generated images."),
    count: int = typer.Option(6, help="How many sample images to generate."),
    samples: Optional[int] = typer.Option(None, "--samples", "-R", help="Monte-Carlo samples R."),
) -> None:
    """Generate sample images and score them with the configured model (test-tiny random weights when no
    trained model is configured, with a banner saying so)."""
    from .bench import synthetic_images
    from .engine import Engine
    from .registry import load_model

    s = settings().override("model", samples=samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(synthetic_images(count, size=320, seed=7)):
        files.append(out_dir / f"sample_{i:02d}.png")
        image.save(files[-1])
    if not (s.model.name or s.model.head):
        console.print("[yellow]No trained model configured: using the test-tiny backbone with random weights.[/]")
        s.override("model", backbone="test-tiny", pretrained="random")
    detector = load_model(settings=s)
    _random_banner(detector.provenance)
    table = Table("image", "score", "text", "top-k", "ms")
    for r in Engine(detector, batch_size=s.model.batch_size).score((f, "demo part") for f in files):
        table.add_row(str(r.source), f"{r.image_score:.4f}", f"{r.text_score:.4f}", f"{r.topk_score:.4f}",
                      f"{r.latency_ms:.0f}")
    out.print(table)
    out.print(f"{len(files)} images in {out_dir}/. Score your own: inspector score DIR --class-name NAME")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
