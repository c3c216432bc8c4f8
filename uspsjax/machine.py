"""Which CPU a figure came from: machines of one kind differ (AVX-512 or AVX2 only, cache sizes),
and so do their speeds and their float32 rounding, so every result and benchmark names its CPU.

Read from Linux's /proc/cpuinfo and /sys (elsewhere: what `platform` knows), never measured.
"""

import os
import platform
from pathlib import Path

CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def widest_isa(flags: set[str]) -> str:
    """The widest x86 vector instruction set among CPU `flags`: "AVX-512" (its foundation),
    "AVX2", or "other" (older x86, or another architecture)."""
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else "other"


def _caches(folder: Path = CACHE_DIR) -> dict[str, str]:
    """Cache sizes of the first core by level ("L1d", "L2", "L3"), as the kernel gives them."""
    sizes = {}
    for index in sorted(folder.glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            sizes[f"L{level}" + ("d" if kind == "Data" else "")] = size
    return sizes


def cpu() -> dict:
    """This machine's CPU: model name, family/model, widest vector ISA, cores usable by this
    process and cache sizes per level."""
    info = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model_name": info.get("model name") or platform.processor() or platform.machine(),
            "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
            "isa": widest_isa(set(info.get("flags", "").split())), "cores": cores,
            "caches": _caches()}


def describe(record: dict) -> str:
    """One line for a `cpu()` record, such as "Intel(R) Xeon(R) Processor (family/model 6/143,
    AVX-512, 2 cores, L1d 48K, L2 2048K, L3 107520K)"."""
    caches = ", ".join(f"{level} {size}" for level, size in record["caches"].items())
    return (f"{record['model_name']} (family/model {record['family_model']}, {record['isa']}, "
            f"{record['cores']} cores" + (f", {caches}" if caches else "") + ")")
