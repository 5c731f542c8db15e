"""The GPU check (issue #17 item 3): `inspector bench --device cuda --quick` and the CUDA parity tests below,
which scripts/gpu-check.sh runs on a GPU machine. Tests marked `cuda` are collected only where torch sees a
GPU (tests/conftest.py); the others check the command's plumbing on the CPU."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from inspector import bench
from inspector.cli import app
from inspector.detectors import KINDS
from inspector.detectors.base import Prediction
from inspector.registry import load_model

from .conftest import tiny_detector_settings

pytestmark = pytest.mark.usefixtures("one_thread")


def _pixels(model, n: int = 3) -> torch.Tensor:
    return torch.stack([model.to_input(im) for im in bench.synthetic_images(n, size=96, seed=7)])


def test_quick_is_every_detector_at_batch_1_8_32_with_cpu_parity_on_cuda(tmp_path, monkeypatch):
    """--quick picks the GPU check's cases; on CUDA it asks for the CPU parity, on a CPU it does not."""
    calls = []

    def fake_run_bench(model, batch_sizes, repeats, samples, **kwargs):
        calls.append((model.name, list(batch_sizes), repeats, kwargs.get("parity_device")))
        return {"detector": model.name, "device": "cpu", "precision": "fp32", "backbone": "test-tiny",
                "image_size": model.image_size, "main_case": model.name, "cases": [], "pipeline_overhead": 0.0,
                "device_parity": None}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    monkeypatch.setattr(bench, "side_by_side", lambda reports: [])
    result = CliRunner().invoke(app, ["bench", "--quick", "--backbone", "test-tiny", "--image-size", "112",
                                      "--device", "cpu", "--output", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in calls] == list(KINDS)
    assert all(c[1:] == ([1, 8, 32], 3, None) for c in calls)


@pytest.mark.parametrize("detector", ["winclip", "bayes-pfl"])
def test_device_agreement_compares_the_same_model_on_two_devices(detector):
    """The parity report of the exact fp32 path: on the same device the two runs agree exactly, and the model
    is left on its device in its own precision."""
    model = load_model(settings=tiny_detector_settings(detector, image_size=112, precision="bf16"))
    pixels = _pixels(model)
    report = bench.device_agreement(model, pixels, ["part"] * 3, "cpu", **model.sample_options(2))
    assert report["devices"] == ["cpu", "cpu"] and report["precision"] == "fp32"
    assert report["max_abs_map_diff"] == 0.0 and report["max_abs_image_score_diff"] == 0.0
    assert report["decision_flips"] == 0
    assert model.precision == "bf16" and model.device.type == "cpu"


def test_prediction_agreement_counts_flips_at_the_threshold():
    ref = Prediction(anomaly_map=torch.zeros(3, 4, 4), probability_map=torch.zeros(3, 4, 4),
                           image_score=torch.tensor([0.1, 0.5, 0.9]), text_score=torch.zeros(3),
                           topk_score=torch.zeros(3))
    got = Prediction(anomaly_map=torch.zeros(3, 4, 4), probability_map=torch.full((3, 4, 4), 0.25),
                           image_score=torch.tensor([0.1, 0.45, 0.9]), text_score=torch.zeros(3),
                           topk_score=torch.zeros(3))
    report = bench.prediction_agreement(ref, got, threshold=0.48)
    assert report["decision_flips"] == 1 and report["max_abs_map_diff"] == 0.25
    assert report["max_abs_image_score_diff"] == pytest.approx(0.05)


@pytest.mark.cuda
@pytest.mark.parametrize("detector", list(KINDS))
def test_cuda_exact_path_matches_the_cpu(detector):
    """On a GPU: each detector's exact fp32 path on CUDA matches the CPU (maps 1e-4, scores 1e-5)."""
    model = load_model(settings=tiny_detector_settings(detector, device="cuda", precision="fp32"))
    report = bench.device_agreement(model, _pixels(model, 4).cuda(), ["part"] * 4, "cpu",
                                    **model.sample_options(2))
    assert report["devices"][0].startswith("cuda")
    assert report["max_abs_map_diff"] < 1e-4 and report["max_abs_image_score_diff"] < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("detector", list(KINDS))
def test_cuda_bf16_keeps_the_fragile_steps_in_fp32(detector):
    """On a GPU under bf16 autocast every output is fp32 and close to the fp32 run."""
    model = load_model(settings=tiny_detector_settings(detector, device="cuda", precision="bf16"))
    report = bench.precision_agreement(model, _pixels(model, 4).cuda(), ["part"] * 4, "bf16",
                                       **model.sample_options(2))
    assert set(report["output_dtypes"].values()) == {"float32"}
    assert report["max_abs_map_diff"] < 0.1
