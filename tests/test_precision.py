"""``[model] precision``: native-bf16 detection, what "auto" resolves to, bf16 against fp32 on test-tiny for
every detector (fragile steps in fp32), and the bench's precision comparison."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from inspector import runtime as precision
from inspector.config import Settings
from inspector.detectors import KINDS

from .conftest import tiny_detector_settings

pytestmark = pytest.mark.usefixtures("one_thread")

X86_HEAD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
X86_FLAGS = "fpu vme de pse tsc msr sse sse2 avx avx2 avx512f avx512bw avx512vl"


def cpuinfo(*extra: str, key: str = "flags") -> str:
    line = f"{key}\t\t: {X86_FLAGS} {' '.join(extra)}\n"
    return (X86_HEAD + line + "\n") * 2  # two processors, as /proc/cpuinfo lists each


@pytest.mark.parametrize(("text", "native"), [
    (cpuinfo("avx512_bf16"), True),
    (cpuinfo("amx_bf16", "amx_tile"), True),
    (cpuinfo(), False),  # AVX512 without BF16 is not native bf16
    (cpuinfo("avx512_fp16"), False),
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha1 sha2 crc32 bf16 sve\n", False),  # Arm: not ours to claim
])
def test_detection_from_cpuinfo_flags(text, native):
    # the flags decide even against the probes: /proc/cpuinfo is the first source
    found = precision.detect_cpu_bf16(text, probes={"avx512_bf16": not native}, capability="AVX512")
    assert found.native is native
    assert found.source.startswith("cpuinfo flags")
    assert found.capability == "AVX512"


@pytest.mark.parametrize(("probes", "native", "source"), [
    ({"avx512_bf16": False, "amx_tile": True}, True, "torch probe: amx_tile"),
    ({"avx512_bf16": True, "amx_tile": False}, True, "torch probe: avx512_bf16"),
    ({"avx512_bf16": False, "amx_tile": False}, False, "torch probe: none"),
    ({}, False, "unknown"),
])
def test_detection_without_cpuinfo_uses_the_probes(probes, native, source):
    found = precision.detect_cpu_bf16("", probes=probes, capability="AVX2")
    assert found.native is native and found.source.startswith(source)


def test_capability_string_alone_never_decides():
    # "AVX512" is what PyTorch says for CPUs with and without bf16: it is reported, not used
    for capability in ("AVX512", "AVX2", "DEFAULT"):
        assert not precision.detect_cpu_bf16(cpuinfo(), probes={}, capability=capability).native
        assert precision.detect_cpu_bf16(cpuinfo("avx512_bf16"), probes={}, capability=capability).native


def test_resolve():
    assert precision.resolve("auto", "cpu", native_cpu_bf16=False) == "fp32"
    assert precision.resolve("auto", "cpu", native_cpu_bf16=True) == "bf16"
    assert precision.resolve("auto", "cuda", native_cpu_bf16=False) == "bf16"
    assert precision.resolve("auto", "mps") == "fp32"
    for device in ("cpu", "cuda"):
        assert precision.resolve("fp32", device, native_cpu_bf16=True) == "fp32"  # the parity mode
        assert precision.resolve("bf16", device, native_cpu_bf16=False) == "bf16"  # explicit: as asked
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve("half", "cpu")


def test_autocast_region_on_cpu():
    with torch.inference_mode():
        with precision.autocast("cpu", "auto", native_cpu_bf16=False):
            assert not torch.is_autocast_enabled("cpu")
        with precision.autocast("cpu", "auto", native_cpu_bf16=True):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            with precision.fp32("cpu"):
                assert not torch.is_autocast_enabled("cpu")
    # under autograd (training) a CPU stays fp32 whatever the setting
    with torch.enable_grad(), precision.autocast("cpu", "bf16"):
        assert not torch.is_autocast_enabled("cpu")


def tiny(detector: str, **model: object) -> Settings:
    return tiny_detector_settings(detector, samples=2, **{"precision": "auto", **model})  # this module's subject


def load(detector: str, **model: object):
    from inspector.registry import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(settings=tiny(detector, **model))


@pytest.fixture(scope="module")
def models():
    return {name: load(name) for name in KINDS}


@pytest.fixture(scope="module")
def pixels():
    from inspector.bench import synthetic_images
    from inspector.imaging import to_model_input

    return torch.stack([to_model_input(im, 224) for im in synthetic_images(6, size=256)])


def fake_cpu(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(precision, "cpu_bf16", lambda: precision.CpuBf16(native, "injected by the test"))


@pytest.mark.parametrize("native", [False, True], ids=["cpu-without-bf16", "cpu-with-bf16"])
def test_auto_follows_the_cpu_in_every_detector(models, pixels, monkeypatch, native):
    fake_cpu(monkeypatch, native)
    for name, model in models.items():
        assert model.precision == "auto"
        s = tiny(name)
        assert model.scoring_options(model.options_from(s), s.model.precision)["precision"] == "auto"  # the setting is the identity
        pred = model.predict_tensors(pixels[:2], ["bottle"] * 2)
        assert pred.provenance["precision"] == ("bf16" if native else "fp32"), name


def test_bf16_agrees_with_fp32_and_fragile_steps_stay_fp32(models, pixels, monkeypatch):
    from inspector.bench import precision_agreement
    from inspector.detectors.aa_clip import model as aa_module
    from inspector.detectors.bayes_pfl import model as bayes_module
    from inspector.detectors.winclip import WinCLIP

    seen: dict[str, list[torch.dtype]] = {}

    def spy(key, fn, pick):
        def wrapped(*args, **kwargs):
            seen.setdefault(key, []).append(pick(args))
            return fn(*args, **kwargs)
        return wrapped

    # the inputs of the fragile steps, recorded during the bf16 runs
    monkeypatch.setattr(bayes_module, "upsampled_sigmoid_sum",
                        spy("bayes-pfl", bayes_module.upsampled_sigmoid_sum, lambda a: a[0].dtype))
    monkeypatch.setattr(aa_module.AACLIP, "anomaly_maps",
                        spy("aa-clip", aa_module.AACLIP.anomaly_maps, lambda a: a[1][0].dtype))
    monkeypatch.setattr(WinCLIP, "zero_shot", spy("winclip", WinCLIP.zero_shot, lambda a: a[1].dtype))
    musc = models["musc"]
    monkeypatch.setattr(musc, "mutual_scores", spy("musc", musc.mutual_scores, lambda a: a[0].dtype))
    for name, model in models.items():
        options = {"samples": 2} if name == "bayes-pfl" else {}
        a = precision_agreement(model, pixels, ["bottle"] * pixels.shape[0], "bf16", **options)
        assert model.precision == "auto"  # restored
        assert set(a["output_dtypes"].values()) == {"float32"}, (name, a["output_dtypes"])
        assert set(seen[name]) == {torch.float32}, (name, seen[name])
        # loose: random tiny weights, 6 images; bf16 must change the numbers (autocast did run) but little
        assert 0 < a["max_abs_map_diff"] < 0.1 and a["mean_abs_map_diff"] < 0.02, (name, a)
        assert a["max_abs_image_score_diff"] < 0.05, (name, a)
        assert a["decision_flips"] <= 2 and "quantile 0.5 of the fp32" in a["threshold_source"]


def test_bench_reports_bf16_speedup_and_agreement():
    from inspector.bench import precision_summary, run_bench

    model = load("winclip", precision="fp32")
    report = run_bench(model, [1], repeats=1, samples=1, agreement_images=4)
    assert report["precision"] == report["precision_setting"] == "fp32"
    names = {c["name"]: c for c in report["cases"]}
    assert {"floor", "floor (bf16)", "winclip", "winclip (bf16)"} <= set(names)
    assert names["winclip (bf16)"]["precision"] == "bf16" and names["floor"]["ratio_to_fp32_floor"] == 1.0
    c = report["precision_comparison"]
    assert (c["reference"], c["low"]) == ("fp32", "bf16")
    assert {s["case"] for s in c["speedup"]} == {"floor", "winclip"}
    for s in c["speedup"]:
        assert s["speedup"] > 0 and math.isclose(s["speedup"], s["fp32_ms_per_image"] / s["bf16_ms_per_image"])
    a = c["agreement"]
    for key in ("spearman_image_score", "max_abs_map_diff", "mean_abs_map_diff", "max_abs_anomaly_map_diff",
                "max_abs_image_score_diff", "threshold", "decision_flips"):
        assert isinstance(a[key], (int, float)) and math.isfinite(a[key]), key
    assert a["images"] == 4 and -1 <= a["spearman_image_score"] <= 1
    assert report["cpu_bf16"]["source"]
    assert any("speed-up" in line for line in precision_summary(report))
