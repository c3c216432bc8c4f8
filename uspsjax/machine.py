"""What produced a figure: the device, for a CPU its model, vector ISA, cores and caches
(machines of one kind differ, and so do their speeds and their float32 rounding), and the
versions of uspsjax, its source and its libraries.

The CPU is read from Linux's /proc/cpuinfo and /sys (elsewhere: what `platform` knows), never
measured.
"""

import functools
import hashlib
import os
import platform
from pathlib import Path

CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none): what a build
    for this CPU depends on (`uspsjax.kernels`), and what `cpu()` reports."""
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


def xla_flag(xla_flags: str, name: str) -> str | None:
    """The value of XLA flag `name` ("--xla_cpu_max_isa") in `xla_flags` (the value of
    XLA_FLAGS), the last one given, as XLA reads them in order; None where it is not set."""
    value = None
    for flag in xla_flags.split():
        flag_name, _, flag_value = flag.partition("=")
        if flag_name == name:
            value = flag_value or None
    return value


def isa_limits(environ) -> list[str]:
    """What the settings in `environ` limit below the CPU's widest ISA, as stand-ins for a
    narrower CPU: XLA's generated code (`--xla_cpu_max_isa` in XLA_FLAGS) and XLA's dots where
    XLA_FLAGS gives them to oneDNN, which `ONEDNN_MAX_CPU_ISA` limits. (The C kernels record
    their own vector width, `kernels.status`; XLA's other dot libraries pick theirs from the CPU
    and cannot be limited.)"""
    flags = environ.get("XLA_FLAGS", "")
    limits = []
    if code := xla_flag(flags, "--xla_cpu_max_isa"):
        limits.append(f"XLA's generated code limited to {code}")
    onednn = xla_flag(flags, "--xla_cpu_experimental_onednn_fusion_type") or ""
    if "DOT" in onednn and environ.get("ONEDNN_MAX_CPU_ISA"):
        limits.append(f"XLA's dots in oneDNN limited to {environ['ONEDNN_MAX_CPU_ISA']}")
    return limits


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


def cache_bytes(level: str, folder: Path = CACHE_DIR) -> int | None:
    """The size in bytes of the first core's cache `level` ("L2", "L3"), as the kernel gives
    it ("2048K", "32M"); None where it does not."""
    size = _caches(folder).get(level, "")
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        return int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)
    except ValueError:
        return None


def cpu() -> dict:
    """This machine's CPU: model name, family/model, widest vector ISA (and what settings limit
    below it, `isa_limits`: "AVX-512, XLA's generated code limited to AVX2"), cores usable by
    this process and cache sizes per level."""
    info = cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = ", ".join([widest_isa(set(info.get("flags", "").split())), *isa_limits(os.environ)])
    return {"model_name": info.get("model name") or platform.processor() or platform.machine(),
            "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
            "isa": isa,
            "cores": cores, "caches": _caches()}


def describe(record: dict) -> str:
    """One line for a `cpu()` record, such as "Intel(R) Xeon(R) Processor (family/model 6/143,
    AVX-512, 2 cores, L1d 48K, L2 2048K, L3 107520K)"."""
    caches = ", ".join(f"{level} {size}" for level, size in record["caches"].items())
    return (f"{record['model_name']} (family/model {record['family_model']}, {record['isa']}, "
            f"{record['cores']} cores" + (f", {caches}" if caches else "") + ")")


@functools.cache
def source_hash() -> str:
    """A digest of uspsjax's own source, Python and C: the code that trains, whatever its
    version number says (a resume continues only the same code). Read once per process, so that
    it names the code that process runs even if the files change while it does."""
    digest = hashlib.sha256()
    folder = Path(__file__).parent
    for path in sorted([*folder.glob("*.py"), *folder.glob("*.c")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def environment() -> tuple[str, dict]:
    """The device description and the versions of the packages that produced a result."""
    import jax
    from importlib.metadata import version
    from uspsjax import KEEPS_FREED_MEMORY
    from uspsjax.models import lc_lowering_name
    from uspsjax.train import microbatch_rule
    dev = jax.devices()[0]
    device = f"{dev.platform}: {getattr(dev, 'device_kind', '')} x{len(jax.devices())}".strip()
    if dev.platform == "cpu":
        device = f"cpu: {describe(cpu())}"
    if jax.process_count() > 1:
        device += f", {len(jax.devices())} devices in {jax.process_count()} processes"
    versions = {p: version(p) for p in ("uspsjax", "jax", "jaxlib", "flax", "optax", "numpy",
                                        "h5py")}
    versions["source"] = source_hash()
    versions["python"] = platform.python_version()
    # TF32 on recent GPUs unless set to "float32"/"highest": part of what produced the numbers.
    versions["matmul_precision"] = str(jax.config.jax_default_matmul_precision or "default")
    # What LC layers with the default `lc_lowering = "auto"` run here (a member's own setting is
    # recorded with its settings), and the allocator (`uspsjax.__init__`).
    versions["lc_lowering"] = lc_lowering_name("auto", dev.platform)
    versions["microbatch"] = microbatch_rule(dev.platform)  # what `microbatch = 0` runs here
    versions["malloc"] = "glibc, keeps freed memory" if KEEPS_FREED_MEMORY else "default"
    if dev.platform == "cpu":
        versions["cpu_tactics"] = cpu_tactics()
    return device, versions


def cpu_tactics() -> str:
    """The CPU tactics a CPU run used: the cache the chunks of members training at once keep
    within (half this machine's last-level cache, capped: `population.cpu_cache_bytes`), how
    many train at once (`population.cpu_lane_limit`), what runs the LC's patches and products
    and the CNN's second convolution (`kernels.status`), up to which batch size the LC's forward
    and gradients take their few-rows forms, and from which a dense layer's product and kernel
    gradient run in the kernels, and from which size a parameter tensor is updated by them
    (measured on two machine types, results/bench/NOTES.md §16, §17, §19, §26, §29-§31,
    §33-§35, §37)."""
    from uspsjax import kernels
    from uspsjax.models import (DENSE_KERNEL_ROWS, ELEMENTWISE_FEATURES, FEW_ROWS, OUTER_SUM_ROWS,
                                PRODUCT_FORWARD_ROWS)
    from uspsjax.population import cpu_cache_bytes, cpu_lane_limit
    from uspsjax.train import KERNEL_UPDATE_FLOATS
    return (f"member chunks within {cpu_cache_bytes() / 2**20:g} MiB of cache, up to "
            f"{cpu_lane_limit()} at once; LC patches and products and CNN convolutions by "
            f"{kernels.status()}; LC forward as "
            f"summed products up to batch {PRODUCT_FORWARD_ROWS} where the kernels do not run it, "
            f"kernel gradient as row products up to batch {OUTER_SUM_ROWS} (both for layers of "
            f"{ELEMENTWISE_FEATURES}+ features), patch gradient batch-innermost up to batch "
            f"{FEW_ROWS}; dense products and kernel gradients by the kernels from batch "
            f"{DENSE_KERNEL_ROWS}; parameter tensors of {KERNEL_UPDATE_FLOATS:,}+ floats updated "
            f"by the kernels")
