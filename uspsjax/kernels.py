"""The LC layer's patches and three products, the CNN's convolution (its patches, input gradient
and kernel gradient), dense layers' products and kernel gradients, and the update of large
parameter tensors (`sgd_update`) on a CPU as C kernels (uspsjax/kernels.c), compiled for the
machine at hand and called from XLA through its FFI; XLA's own operations wherever they cannot
run.

XLA:CPU's libraries run the LC's products (a position's weights, used by only 16-32 rows) at about
a third of the machine's matmul peak: each position's weights stall on their first read from
memory. The kernels prefetch the next position's weights while computing the current one
(results/bench/NOTES.md §29). For the CNN, XLA gathers the patches element by element and writes
every patch gradient out before summing it back onto the pixels; the kernels copy patch rows
whole and compute the input gradient one image at a time in the core's cache (§30). XLA updates
a parameter tensor and its momentum in two passes, the kernels in one (§35). They are built once
per machine with the system's C compiler (`$CC`, else `cc`), `-O3 -march=native`, multiply-adds
fused, for the machine's L1 data cache (§34), into the cache directory (`data.cache_dir()`),
named by a digest of the source, the compiler, the CPU and jaxlib's FFI header, so another CPU
or compiler builds its own. Without a compiler, or where the build fails, `status()` says why
and XLA's operations run: the same results to float32 rounding.
"""

import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from uspsjax import machine
from uspsjax.data import cache_dir

SOURCE = Path(__file__).with_name("kernels.c")
TARGETS = ("uspsjax_product", "uspsjax_lc_kernel_grad", "uspsjax_lc_patch_grad",
           "uspsjax_patches", "uspsjax_conv_input_grad", "uspsjax_summed_kernel_grad",
           "uspsjax_lc_patches", "uspsjax_sgd_update")
# -ffp-contract=fast: multiply-adds fused (ISO C's default keeps them apart, at half the speed
# of the tiles' inner loop; the LC 1.03-1.20x a step, results/bench/NOTES.md §29).
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11")
# The L1 data cache a build assumes where the machine does not say (the smallest of these
# machines'): the kernels take their sums in chunks that fit it.
DEFAULT_L1D_BYTES = 32 * 2**10
# What a build for this CPU depends on, of its /proc/cpuinfo fields (not its clock, which moves).
CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags")
# USPSJAX_KERNELS=0 runs XLA's dots instead (for comparison; a result records which ran).
SWITCH = "USPSJAX_KERNELS"


def l1d_bytes() -> int:
    """The L1 data cache per core the kernels are built for: the machine's, else
    `DEFAULT_L1D_BYTES`."""
    return machine.cache_bytes("L1d") or DEFAULT_L1D_BYTES


def _compiler_version(compiler: list[str]) -> str | None:
    try:
        run = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout if run.returncode == 0 else None


def build(compiler: list[str], folder: Path) -> tuple[Path | None, str]:
    """Compile `kernels.c` with `compiler` into `folder` unless a build for this source, compiler,
    CPU and FFI header is there already. Returns (the shared library or None, why not)."""
    version = _compiler_version(compiler)
    if version is None:
        return None, f"no working C compiler ({shlex.join(compiler)})"
    include = Path(jax.ffi.include_dir())
    digest = hashlib.sha256()
    flags = (*FLAGS, f"-DL1D_BYTES={l1d_bytes()}")
    for part in (SOURCE.read_bytes(), shlex.join(compiler).encode(), version.encode(),
                 " ".join(flags).encode(),
                 (include / "xla/ffi/api/c_api.h").read_bytes(),
                 repr([machine.cpuinfo().get(field) for field in CPU_FIELDS]).encode()):
        digest.update(hashlib.sha256(part).digest())
    library = folder / f"kernels-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library, ""
    folder.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place: processes building at once each
    # finish whole, and none loads a half-written file.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        building = Path(tmp) / library.name
        try:
            run = subprocess.run([*compiler, *flags, f"-I{include}", str(SOURCE), "-o",
                                  str(building)], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return None, "the C kernels did not compile within 300 s"
        if run.returncode != 0:
            first = (run.stderr.strip().splitlines() or ["no message"])[0]
            return None, f"the C kernels did not compile ({first})"
        os.replace(building, library)
    return library, ""


@functools.cache
def _loaded() -> tuple[int, str]:
    """Build, load and register the kernels once per process: (their vector width in floats,
    or 0 where XLA's dots run instead; why not)."""
    if os.environ.get(SWITCH, "1") == "0":
        return 0, f"{SWITCH}=0"
    try:
        library, why = build(shlex.split(os.environ.get("CC", "cc")), cache_dir())
    except OSError as err:  # an unwritable cache directory
        return 0, f"the C kernels could not be built ({err})"
    if library is None:
        return 0, why
    return load(library)


def load(library: Path) -> tuple[int, str]:
    """Load a build of the kernels and register them with XLA: (their vector width, "") or, where
    the file is not such a build, (0, why)."""
    try:
        lib = ctypes.CDLL(str(library))
        handlers = [jax.ffi.pycapsule(getattr(lib, name)) for name in TARGETS]
        width = lib.uspsjax_vector_width()
    except (OSError, AttributeError) as err:
        return 0, f"the C kernels could not be loaded ({err})"
    for name, handler in zip(TARGETS, handlers):
        jax.ffi.register_ffi_target(name, handler, platform="cpu")
    return width, ""


def built() -> bool:
    """Whether the kernels are built and registered in this process."""
    return bool(_loaded()[0])


def runs(size: int) -> bool:
    """Whether a kernel runs here for a product whose result's last axis (the one it vectorizes
    over: the features; the batch for the patch gradient) has this size: the kernels are built,
    and the size is a multiple of their vectors."""
    width = _loaded()[0]
    return bool(width) and size % width == 0


def status() -> str:
    """What runs the LC's sliced lowering and the CNN's convolutions on this CPU, for the record
    of a result."""
    width, why = _loaded()
    if width:
        return (f"C kernels ({width}-float vectors, sums in chunks for a "
                f"{l1d_bytes() // 2**10} KiB L1d) where an axis is a multiple of {width}")
    return f"XLA's operations ({why})"


def _call(target: str, operands: tuple, *shapes: tuple, aliases: dict | None = None):
    """Kernel `target` on `operands`: a float32 result of each of `shapes` (one array, or a
    tuple for several), `aliases` as `jax.ffi.ffi_call`'s `input_output_aliases`."""
    if not built():  # builds and registers them on first use
        raise RuntimeError(f"uspsjax's C kernels do not run here: {status()}")
    results = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    return jax.ffi.ffi_call(target, results[0] if len(results) == 1 else tuple(results),
                            vmap_method="broadcast_all",
                            input_output_aliases=aliases)(*operands)


def on_cpu(runs: bool, kernel_op, xla_op, *operands):
    """`kernel_op(*operands)`, one of these kernels, on a CPU where they run it (`runs`), else
    `xla_op(*operands)`, the same values to float32 rounding."""
    if not runs:
        return xla_op(*operands)
    return jax.lax.platform_dependent(*operands, cpu=kernel_op, default=xla_op)


def lc_patches(x: jax.Array, kernel_size: int) -> jax.Array:
    """The LC layer's channel-major patch rows of `x (..., L, B, C)` for a window of
    `kernel_size` positions: `(..., L - kernel_size + 1, B, C * kernel_size)`, entry
    `c * kernel_size + o` of a row from position `l + o`."""
    *lead, length, batch, channels = x.shape
    return _call(TARGETS[6], (x,), (*lead, length - kernel_size + 1, batch,
                                    channels * kernel_size))


def product(x: jax.Array, y: jax.Array) -> jax.Array:
    """`x (..., M, K) . y (..., K, N) -> (..., M, N)` for each index of the leading axes: the LC's
    forward (patches `(L, B, C*k)` by kernel `(L, C*k, F)`, per position), a dense layer's."""
    return _call(TARGETS[0], (x, y), (*x.shape[:-1], y.shape[-1]))


def lc_kernel_grad(patches: jax.Array, g: jax.Array) -> jax.Array:
    """`patches (L, B, C*k)^T . g (L, B, F) -> (L, C*k, F)` per position."""
    return _call(TARGETS[1], (patches, g), (patches.shape[0], patches.shape[2], g.shape[2]))


def lc_patch_grad(kernel: jax.Array, g: jax.Array) -> jax.Array:
    """`kernel (L, C*k, F) . g (L, B, F)^T -> (L, C*k, B)` per position."""
    return _call(TARGETS[2], (kernel, g), (*kernel.shape[:-1], g.shape[1]))


def patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """The valid, stride-1 `(kh, kw)` patches of images `x (..., H, W, C)`, one row per output
    pixel, offsets row-major and channels innermost: `(..., H-kh+1, W-kw+1, kh*kw*C)`."""
    *lead, h, w, c = x.shape
    return _call(TARGETS[3], (x,), (*lead, h - kh + 1, w - kw + 1, kh * kw * c))


def conv_input_grad(g: jax.Array, kernel_t: jax.Array, height: int, width: int) -> jax.Array:
    """A valid, stride-1 convolution's input gradient: `g (..., OH, OW, F) . kernel_t (F,
    kh*kw*C)`, its patch gradients, summed back onto the pixels they were read from, offsets in
    row-major order: `(..., height, width, C)`."""
    *lead, oh, ow, _ = g.shape
    window = (height - oh + 1) * (width - ow + 1)
    return _call(TARGETS[4], (g, kernel_t), (*lead, height, width, kernel_t.shape[1] // window))


def summed_kernel_grad(patches: jax.Array, g: jax.Array) -> jax.Array:
    """`patches (M, K)^T . g (M, N) -> (K, N)`, the kernel gradient of a layer whose weights every
    row shares (a convolution's, a dense layer's): the K rows of the result in a band per thread
    of XLA's pool, each sum over all M rows."""
    return _call(TARGETS[5], (patches, g), (patches.shape[-1], g.shape[-1]))


def sgd_update(g: jax.Array, trace: jax.Array, params: jax.Array, hyper: jax.Array):
    """SGD with momentum and weight decay on one float32 tensor in one pass (XLA makes two):
    `hyper` = (learning rate, momentum, weight decay, active); returns (trace', params'), trace'
    = (g + decay * params) + momentum * trace and params' = params - rate * trace', both as they
    were where not active. They may be written over `trace` and `params`."""
    return _call(TARGETS[7], (g, trace, params, hyper), params.shape, params.shape,
                 aliases={1: 0, 2: 1})
