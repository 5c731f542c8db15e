"""Where and in which arithmetic the models run: ``[model] device`` and ``[model] precision``, decided in one
place for every detector, trainer and the bench.

Device: ``resolve_device("auto")`` is CUDA when available, else the CPU; an explicit CUDA device on a box
without CUDA is an error.

Precision:

* ``"fp32"``: no autocast anywhere (the parity mode: what the parity tests compare with the official code).
* ``"auto"``: bf16 autocast on CUDA; on a CPU, bf16 autocast only where the CPU has native bf16 arithmetic
  (x86 ``avx512_bf16`` or ``amx_bf16``, read from ``/proc/cpuinfo`` on Linux, or from PyTorch's own CPU
  probes elsewhere), fp32 on any other CPU (emulated bf16 is slower than fp32) and on other devices.
* ``"bf16"`` / ``"fp16"``: that autocast dtype wherever the device supports autocast, native or not.

On a CPU, autocast applies only where autograd is off (scoring): training on a CPU stays fp32 whatever
the setting, as it always was. Detectors run only their transformer passes (and the learned heads'
matrix products) under ``autocast``; the numerically fragile steps (logit differences before a sigmoid or
softmax, upsampling, min-max, top-k, distances) run in fp32 inside ``fp32()`` or outside autocast.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InspectorError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: x86 CPU flags (Linux ``/proc/cpuinfo`` spelling) that mean native bf16 arithmetic
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU computes bf16 natively, and how that was found out."""

    native: bool
    source: str  # "cpuinfo flags: avx512_bf16", "torch probe: amx_tile", "cpuinfo flags: none of ..."
    capability: str = ""  # torch.backends.cpu.get_cpu_capability() (reported; "AVX512" does not imply bf16)

    def as_dict(self) -> dict[str, object]:
        return {"native_bf16": self.native, "source": self.source, "torch_cpu_capability": self.capability}


def flags_from_cpuinfo(text: str) -> set[str] | None:
    """The CPU flags of ``/proc/cpuinfo`` text (the ``flags`` lines of x86, ``Features`` of Arm), or None
    when the text has no such line."""
    flags: set[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags = (flags or set()) | set(value.split())
    return flags


def detect_cpu_bf16(cpuinfo: str | None = None, probes: Mapping[str, bool] | None = None,
                    capability: str | None = None) -> CpuBf16:
    """Native bf16 on this CPU, found out, never guessed.

    ``cpuinfo``: ``/proc/cpuinfo`` text (default: read it, on Linux); its flags decide when it has any.
    Otherwise ``probes`` decide (default: PyTorch's CPU probes ``avx512_bf16`` and ``amx_tile``, where this
    PyTorch has them); with neither, the answer is no. ``capability`` is only reported: PyTorch's
    ``get_cpu_capability()`` says "AVX512" for CPUs with and without bf16."""
    if capability is None:
        capability = _torch_capability()
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo()
    flags = flags_from_cpuinfo(cpuinfo) if cpuinfo else None
    if flags is not None:
        found = [f for f in NATIVE_BF16_FLAGS if f in flags]
        if found:
            return CpuBf16(True, f"cpuinfo flags: {', '.join(found)}", capability)
        return CpuBf16(False, f"cpuinfo flags: none of {', '.join(NATIVE_BF16_FLAGS)}", capability)
    if probes is None:
        probes = _torch_probes()
    found = [name for name, present in probes.items() if present]
    if found:
        return CpuBf16(True, f"torch probe: {', '.join(found)}", capability)
    if probes:
        return CpuBf16(False, f"torch probe: none of {', '.join(probes)}", capability)
    return CpuBf16(False, "unknown (no /proc/cpuinfo flags, no torch CPU probe): fp32", capability)


def _read_cpuinfo(path: str = "/proc/cpuinfo") -> str:
    if platform.system() != "Linux":
        return ""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _torch_probes() -> dict[str, bool]:
    probes = {}
    for name, attr in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_tile", "_is_amx_tile_supported")):
        fn = getattr(torch.cpu, attr, None)
        if callable(fn):
            try:
                probes[name] = bool(fn())
            except Exception:  # noqa: BLE001 - a probe that cannot answer is not a yes
                probes[name] = False
    return probes


def _torch_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - informative only
        return ""


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """``detect_cpu_bf16()`` of this machine, once per process."""
    return detect_cpu_bf16()


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    return precision


def resolve(precision: str, device: torch.device | str, native_cpu_bf16: bool | None = None) -> str:
    """The arithmetic ``precision`` means on ``device``: "fp32", "bf16" or "fp16".

    ``native_cpu_bf16``: inject the CPU's answer (default: ``cpu_bf16().native``, detected once)."""
    check(precision)
    kind = torch.device(device).type
    if precision != "auto":
        return precision if kind in ("cuda", "cpu") else "fp32"
    if kind == "cuda":
        return "bf16"
    if kind == "cpu":
        native = cpu_bf16().native if native_cpu_bf16 is None else native_cpu_bf16
        return "bf16" if native else "fp32"
    return "fp32"


def autocast(device: torch.device | str, precision: str,
             native_cpu_bf16: bool | None = None) -> contextlib.AbstractContextManager:
    """The autocast region of ``precision`` on ``device`` (a no-op in fp32, and on a CPU under autograd)."""
    device = torch.device(device)
    resolved = resolve(precision, device, native_cpu_bf16)
    if resolved == "fp32" or (device.type == "cpu" and torch.is_grad_enabled()):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[resolved])


def training_autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """The trainers' mixed precision: bf16 autocast on CUDA (no loss scaling needed), fp32 elsewhere, for the
    training steps and their validation alike (so a CPU run trains and selects in fp32)."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fp32(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A region where autocast is off (fragile steps: run them on fp32 inputs)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def describe(devices: Iterable[torch.device | str] = ("cpu",)) -> dict[str, object]:
    """This machine's precision facts (for reports): native CPU bf16 and what "auto" means per device."""
    return {**cpu_bf16().as_dict(), "auto": {str(d): resolve("auto", d) for d in devices}}


class DeviceError(InspectorError, ValueError):
    """A requested device this machine does not have."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``[model] device`` as a ``torch.device``: "auto" (CUDA when available, else CPU), "cpu", "cuda:N"."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{device}' requested but CUDA is not available on this machine")
    return resolved
