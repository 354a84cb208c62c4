"""What this CPU is and whether it has bf16 matrix units: the facts the CPU precision decision uses.

    bf16_units()     # "AMX", "AVX512-BF16" or None: asked of torch (its cpuinfo probe), not the CPU's name
    cpu_model()      # "Intel(R) Xeon(R) Platinum 8480+" (from /proc/cpuinfo; platform as a fallback)
    cpu_line()       # "AMD EPYC (flags: avx2; bf16 matrix units: none)": printed beside every CPU timing

bf16 is fast on a CPU only where it has bf16 matrix instructions: AMX tiles (Sapphire Rapids and
later) or AVX512-BF16 (Cooper Lake, Zen 4 and later). Elsewhere (AVX2 only) oneDNN emulates bf16
and a bf16 matmul runs several times slower than fp32, so models.resolve_precision picks fp32 there.
Tests fake either kind of CPU by monkeypatching `bf16_units`.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")


def bf16_units() -> str | None:
    """The bf16 matrix unit torch will use on this CPU: 'AMX', 'AVX512-BF16', or None (none: bf16
    there is emulated and slow). Asked of torch.cpu (torch >= 2.3); an older torch: oneDNN's own check."""
    import torch

    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    if all(hasattr(torch.cpu, name) for _, name in probes):
        return next((unit for unit, name in probes if getattr(torch.cpu, name)()), None)
    try:
        return "oneDNN bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):  # a private op: if it moves, do not guess a fast path
        return None


def simd_level() -> str:
    """torch's own name for the widest vector ISA it dispatches to here ('AVX2', 'AVX512', ...)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_precision() -> tuple[str, str]:
    """(precision, reason) for `precision: auto` on this CPU."""
    unit = bf16_units()
    if unit:
        return "bf16", f"bf16: {unit} present"
    return "fp32", f"fp32: no bf16 matrix units ({simd_level()} only)"


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> dict[str, bool]:
    """The flags that matter for bf16 speed, as the kernel reports them ({} where it does not)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return {f: f in flags for f in FLAGS} if flags else {}


def cpu_line() -> str:
    """One line naming the CPU, its relevant flags and its bf16 matrix units, for logs and reports."""
    flags = cpu_flags()
    shown = ", ".join(f for f, on in flags.items() if on) or ("none of " + "/".join(FLAGS) if flags else "unknown")
    return f"{cpu_model()} (flags: {shown}; bf16 matrix units: {bf16_units() or 'none'})"
