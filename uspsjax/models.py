"""The study's three networks as Flax modules, their static options, and kernel initializers by
name.

Every network maps a batch of flattened 16x16 images `(batch, 256)` to logits `(batch, 10)`.
Static options (module attributes) change the program: where batch normalization, dropout and
the L1 activity penalty sit. Dynamic values (dropout rates) are call arguments, so many rates can
be traced and vmapped in one program. The L1 activity of the chosen layers is `sow`n into the
`losses` collection; batch-norm running averages live in `batch_stats`.

The locally connected layer is defined by `jax.lax.conv_general_dilated_local`, its lowering on
GPU and TPU; on CPU it lowers to dots on sliced patches, equal to float32 rounding
(`locally_connected`; the static setting `lc_lowering` forces either, `lc_lowering_name`
records which ran).
"""

import itertools
import math
from functools import lru_cache, partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from uspsjax import kernels

BATCHNORM = ("none", "before", "after")
L1_AT = ("none", "hidden", "last")


def _threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array):
    """The Threefry-2x32 hash (20 rounds) of the counts `(x1, x2)` under the key `(k1, k2)`, all
    uint32: the bits of JAX's `threefry2x32` primitive, as one elementwise expression."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r)))
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def bernoulli(key: jax.Array, p: jax.Array, shape: tuple, start: jax.Array | int = 0,
              rows: int | None = None) -> jax.Array:
    """`jax.random.bernoulli(key, p, shape)`, bit for bit, computed in one pass; with `rows`, only
    its rows `start:start + rows` (along the first axis), computed alone.

    XLA:CPU runs JAX's Threefry hash as a loop of five passes over the bits; written out
    elementwise it is one fused pass: the CNN's step at batch 16 1.05x, with dropout in
    its two places (results/bench/NOTES.md §27). Each bit is hashed from its flat index, so a
    block of rows draws its own bits and no more (§30). For a key or `p` it was not written for
    (another PRNG, JAX's older bit layout, not float32) it is `jax.random.bernoulli` itself."""
    rows = shape[0] if rows is None else rows
    if (str(jax.random.key_impl(key)) != "threefry2x32" or not jax.config.jax_threefry_partitionable
            or jnp.result_type(p) != jnp.float32 or math.prod(shape) >= 2**32):
        return jax.lax.dynamic_slice_in_dim(jax.random.bernoulli(key, p, shape), start, rows)
    k1, k2 = jax.random.key_data(key)
    # The counts are the mask's flat indices as two uint32 words, the high one 0 below 2**32.
    row = math.prod(shape[1:])
    counts = (jax.lax.iota(jnp.uint32, rows * row).reshape(rows, *shape[1:])
              + jnp.asarray(start, jnp.uint32) * jnp.uint32(row))
    bits = jnp.bitwise_xor(*_threefry2x32(k1, k2, jnp.zeros_like(counts), counts))
    # jax.random.uniform's float: 23 random mantissa bits under the exponent of 1.0, minus 1.
    uniform = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000),
                                           jnp.float32) - 1.0
    return uniform < p


def dropout(module: nn.Module, x: jax.Array, rate: jax.Array, train: bool,
            rows: tuple | None = None) -> jax.Array:
    """Inverted dropout whose rate may be a traced value (Flax's `nn.Dropout` needs a Python float).

    A rate of 0 keeps every unit, so a population can mix rates 0 and 0.5 in one program.
    `rows = (start, batch)` says that `x` holds rows `start:start + len(x)` of a batch of `batch`
    samples: its mask is those rows of the whole batch's mask, so a batch trained in blocks
    drops exactly the units the whole batch would (each block draws the whole batch's bits:
    results/bench/NOTES.md §15).
    """
    if not train:
        return x
    keep = 1.0 - rate
    start, batch = rows or (0, x.shape[0])
    key, shape = module.make_rng("dropout"), (batch, *x.shape[1:])
    # The same bits either way: `bernoulli` where it was measured faster (NOTES §27, §30).
    mask = jax.lax.platform_dependent(
        key, keep, start,
        cpu=lambda key, keep, start: bernoulli(key, keep, shape, start, x.shape[0]),
        default=lambda key, keep, start: jax.lax.dynamic_slice_in_dim(
            jax.random.bernoulli(key, keep, shape), start, x.shape[0]))
    return jnp.where(mask, x / keep, 0.0)


class LocallyConnected1D(nn.Module):
    """Keras `LocallyConnected1D` (valid padding, stride 1, unshared weights, a bias per position
    and filter) on `locally_connected`, with activations laid out `(length, batch, channels)`.

    The kernel has the Keras shape `(L_out, kernel_size * C_in, features)`, but its middle axis is
    ordered channel-major (`c * kernel_size + j`), the order XLA's unshared convolution reads, so
    no transpose runs per step. Keras orders it position-major (`j * C_in + c`); `keras_kernel`
    in the tests maps one layout to the other.
    """

    features: int
    kernel_size: int = 3
    lowering: str = "auto"  # one of LC_LOWERINGS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to `x` of shape `(length, batch, channels)`."""
        length, _, channels = x.shape
        l_out = length - self.kernel_size + 1
        # Kernels are drawn by `train.init_params` (per-position or Keras fans), so zeros here.
        kernel = self.param("kernel", nn.initializers.zeros,
                            (l_out, channels * self.kernel_size, self.features), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (l_out, self.features), x.dtype)
        return (locally_connected(x, kernel, self.kernel_size, self.lowering)
                + bias[:, None, :])


def valid_patches(x: jax.Array, window: tuple, lead: int = 1) -> jax.Array:
    """Patches of a valid, stride-1 window over the spatial axes of `x`, which follow its first
    `lead` axes (`(B, *spatial, C)` with `lead=1`; `(L, B, C)` with `lead=0`), cut by slicing:
    `(*lead axes, *out, *rest, C, prod(window))`, window offsets in row-major order innermost,
    so that flattening the last two axes gives `conv_general_dilated_patches`' channel-major
    order, the LC kernel's row order, with no transpose (results/bench/NOTES.md §16)."""
    spatial = x.shape[lead:lead + len(window)]
    out = [size - w + 1 for size, w in zip(spatial, window)]
    return jnp.stack([x[(*(slice(None),) * lead, *(slice(o, o + n) for o, n in zip(offset, out)))]
                      for offset in itertools.product(*(range(w) for w in window))], axis=-1)


def _shift_sum(parts: jax.Array, window: tuple, lead: int = 1) -> jax.Array:
    """The transpose of `valid_patches` with its last two axes swapped: `parts (*lead axes, *out,
    *rest, prod(window), C)` added back at their offsets into `(*lead axes, *(out + window - 1),
    *rest, C)`."""
    total = 0
    rest = parts.ndim - 1 - lead - len(window)
    for i, offset in enumerate(itertools.product(*(range(w) for w in window))):
        pads = [(o, w - 1 - o) for o, w in zip(offset, window)]
        total = total + jnp.pad(parts[..., i, :], [(0, 0)] * lead + pads + [(0, 0)] * rest)
    return total


# How the LC layer lowers (the static setting `lc_lowering`): "auto" is
# `conv_general_dilated_local` everywhere but on CPU, where XLA expands its grouped patch
# convolution into a dense one (C_in times the work) and the LC runs as products on sliced
# patches instead, by `uspsjax.kernels` where they are built and a product fits them, else by
# XLA's dots; "reference", "sliced" (XLA's dots only) and "kernels" force one (benchmarks, tests).
LC_LOWERINGS = ("auto", "reference", "sliced", "kernels")
LC_LOWERING_NAMES = {"reference": "conv_general_dilated_local", "sliced": "sliced-dots (L,B,C)",
                     "kernels": "C kernels on sliced patches (L,B,C)"}


def lc_lowering_name(lowering: str, platform: str) -> str:
    """What an LC layer with `lowering` (one of `LC_LOWERINGS`) runs on `platform` ("cpu",
    "gpu", ...): a `LC_LOWERING_NAMES` value, for the record of a result."""
    if lowering == "auto":
        lowering = "kernels" if platform == "cpu" else "reference"
    if lowering == "kernels" and not (platform == "cpu" and kernels.built()):
        lowering = "sliced"
    return LC_LOWERING_NAMES[lowering]


def locally_connected(x: jax.Array, kernel: jax.Array, kernel_size: int,
                      lowering: str = "auto") -> jax.Array:
    """Valid, stride-1 unshared 1-D convolution of `x (L, B, C)` with `kernel (L_out, C * k, F)`
    (channel-major middle axis): `(L_out, B, F)`.

    Defined by `jax.lax.conv_general_dilated_local` (`locally_connected_reference`); with
    `lowering="auto"` it runs on CPU as `locally_connected_sliced` with the C kernels, its equal
    to float32 rounding in value and gradient (see `LC_LOWERINGS`).
    """
    lowerings = {
        "reference": partial(locally_connected_reference, kernel_size=kernel_size),
        "sliced": lambda x, kernel: locally_connected_sliced(x, kernel, kernel_size, False),
        "kernels": lambda x, kernel: locally_connected_sliced(x, kernel, kernel_size, True)}
    if lowering == "auto":
        return jax.lax.platform_dependent(x, kernel, cpu=lowerings["kernels"],
                                          default=lowerings["reference"])
    return lowerings[lowering](x, kernel)


def locally_connected_reference(x: jax.Array, kernel: jax.Array, kernel_size: int) -> jax.Array:
    """`locally_connected` as `jax.lax.conv_general_dilated_local`, with XLA's own gradient."""
    return jax.lax.conv_general_dilated_local(
        x, kernel, window_strides=(1,), padding="VALID", filter_shape=(kernel_size,),
        dimension_numbers=("WNC", "WIO", "WNC"))


def _local_patches(x: jax.Array, kernel_size: int, use_kernels: bool) -> jax.Array:
    """Channel-major patch rows of `x (L, B, C)`: `(L_out, B, C * k)`, the kernel's row order;
    copied by `kernels.lc_patches` on a CPU where `use_kernels` and they run."""
    def sliced(x):
        patches = valid_patches(x, (kernel_size,), lead=0)
        return patches.reshape(*patches.shape[:2], -1)
    runs = _kernels_run(use_kernels, x, x, x.shape[-1] * kernel_size)
    return kernels.on_cpu(runs, partial(kernels.lc_patches, kernel_size=kernel_size), sliced, x)


# Dots batched over positions (axis 0 of every operand), each written in a layout chosen for its
# consumer: the output (L_out, B, F) as the next layer's input, the kernel gradient
# (L_out, C*k, F) as the kernel. Left to itself, XLA writes the kernel gradient transposed
# (results/bench/NOTES.md, section 2).
_FORWARD = (((2,), (1,)), ((0,), (0,)))      # patches . kernel
_KERNEL_GRAD = (((1,), (1,)), ((0,), (0,)))  # patches^T . g
_PATCH_GRAD = (((2,), (2,)), ((0,), (0,)))   # g . kernel^T
# Up to this batch size the patch gradient is written batch-innermost, (L_out, C*k, B): XLA:CPU
# runs that dot about twice as fast with so few rows, and shift-summing the small result before
# one transpose costs less than the strided reads of the other layout. At batch 128 it is 1.4
# times slower, at 1024 three times (results/bench/NOTES.md, section 7).
FEW_ROWS = 32
# Up to this batch size the kernel gradient is a sum of row products (`_outer_sum`), fused into
# the update: at 16 rows 1.3x a step against XLA's dot (results/bench/NOTES.md §16), 1.14x against
# the C kernel's (§29); at 32 0.98x against either.
OUTER_SUM_ROWS = 16
# Up to this batch size, where the C kernels do not run, the forward is products summed over the
# patch axis (`_forward`): XLA:CPU runs the batched dot with so few rows on one thread (NOTES
# §19); the kernel's forward runs 1.10x a step at batch 16 against these (§29).
PRODUCT_FORWARD_ROWS = 16
# Both elementwise forms only for layers with at least this many features (the LC's first two):
# on the smaller layers the dot on one thread is the faster, and a step at batch 16 runs 1.10x
# with the dots there (NOTES §26).
ELEMENTWISE_FEATURES = 128


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def locally_connected_sliced(x: jax.Array, kernel: jax.Array, kernel_size: int,
                             use_kernels: bool = True) -> jax.Array:
    """`locally_connected` as three products batched over positions on patches cut by slicing
    (forward, kernel gradient, input gradient), activations `(L, B, C)`: on a CPU by
    `uspsjax.kernels` where `use_kernels` and a product fits them, else by XLA's dots."""
    return _forward(_local_patches(x, kernel_size, use_kernels), kernel, use_kernels)


def _kernels_run(use_kernels: bool, x: jax.Array, y: jax.Array, size: int) -> bool:
    """Whether `uspsjax.kernels` runs a product of `x` and `y` whose result's last axis has
    `size`: asked for, float32 operands (they compute in nothing else), and a size they take."""
    return use_kernels and x.dtype == y.dtype == jnp.float32 and kernels.runs(size)


def _elementwise(rows: int, limit: int, features: int) -> bool:
    """Whether a layer takes an elementwise form (summed products, row products): up to `limit`
    rows (`PRODUCT_FORWARD_ROWS`, `OUTER_SUM_ROWS`) and `ELEMENTWISE_FEATURES` features or more."""
    return rows <= limit and features >= ELEMENTWISE_FEATURES


def _product(x: jax.Array, y: jax.Array, dims, kernel_op, use_kernels: bool) -> jax.Array:
    """`dot_general(x, y, dims)` batched over positions; on a CPU by `kernel_op`, the same
    product from `uspsjax.kernels` (equal to float32 rounding), where they run it."""
    dot = partial(jax.lax.dot_general, dimension_numbers=dims)
    runs = _kernels_run(use_kernels, x, y, jax.eval_shape(dot, x, y).shape[-1])
    return kernels.on_cpu(runs, kernel_op, dot, x, y)


def _forward(patches: jax.Array, kernel: jax.Array, use_kernels: bool) -> jax.Array:
    """`patches (L_out, B, C*k) . kernel (L_out, C*k, F)` per position: a batched product, or
    where the kernels do not run, with few rows and many features, products summed over the
    patch axis, which XLA:CPU spreads over every core."""
    features = kernel.shape[-1]
    if (_elementwise(patches.shape[1], PRODUCT_FORWARD_ROWS, features)
            and not _kernels_run(use_kernels, patches, kernel, features)):
        return jnp.sum(patches[:, :, :, None] * kernel[:, None], axis=2)
    return _product(patches, kernel, _FORWARD, kernels.product, use_kernels)


def _sliced_fwd(x, kernel, kernel_size, use_kernels):
    patches = _local_patches(x, kernel_size, use_kernels)
    return _forward(patches, kernel, use_kernels), (patches, kernel)


def _outer_sum(patches: jax.Array, g: jax.Array) -> jax.Array:
    """The kernel gradient `patches^T . g` per position, `(L_out, C*k, F)`, as one product of
    rows per sample added up in order: elementwise work that XLA fuses into the optimizer's
    update of the kernel, so the gradient is never written out (one read and one write of the
    weights and momentum a step, against the dot's write and the update's reads: layer 1 at
    batch 16, gradient and update, 48 -> 11 ms, results/bench/NOTES.md §16)."""
    total = patches[:, 0, :, None] * g[:, 0, None, :]
    for b in range(1, g.shape[1]):
        total = total + patches[:, b, :, None] * g[:, b, None, :]
    return total


def _sliced_bwd(kernel_size, use_kernels, residuals, g):
    patches, kernel = residuals
    l_out, batch, features = g.shape
    if _elementwise(batch, OUTER_SUM_ROWS, features):
        dk = _outer_sum(patches, g)
    else:
        dk = _product(patches, g, _KERNEL_GRAD, kernels.lc_kernel_grad, use_kernels)
    if batch <= FEW_ROWS:  # (L_out, C*k, B)
        dpatches = _product(kernel, g, _PATCH_GRAD, kernels.lc_patch_grad, use_kernels)
        dpatches = dpatches.reshape(l_out, -1, kernel_size, batch)
        return jnp.swapaxes(_shift_sum(dpatches, (kernel_size,), lead=0), 1, 2), dk
    dpatches = jax.lax.dot_general(g, kernel, _PATCH_GRAD).reshape(l_out, batch, -1, kernel_size)
    return _shift_sum(jnp.swapaxes(dpatches, -1, -2), (kernel_size,), lead=0), dk


locally_connected_sliced.defvjp(_sliced_fwd, _sliced_bwd)


@lru_cache
def _patch_index(height: int, width: int, kh: int, kw: int) -> tuple[np.ndarray, np.ndarray]:
    """Index tables of the valid, stride-1 `(kh, kw)` patches of a `height x width` image, pixels
    numbered row-major: `rows[(out pixel, offset)]` is the pixel each patch entry reads, and
    `back[pixel, offset]` the patch entry (out pixel, offset) that read `pixel` (one past the last
    entry where no output pixel reads it at that offset)."""
    oh, ow = height - kh + 1, width - kw + 1
    out_r, out_c, off_r, off_c = np.meshgrid(np.arange(oh), np.arange(ow), np.arange(kh),
                                             np.arange(kw), indexing="ij")
    rows = ((out_r + off_r) * width + out_c + off_c).reshape(-1)
    back = np.full((height * width, kh * kw), rows.size)
    back[rows, np.arange(rows.size) % (kh * kw)] = np.arange(rows.size)
    return rows.astype(np.int32), back.astype(np.int32)


def _conv_kernels_run(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether `uspsjax.kernels` cuts a convolution's patches and computes its gradients: built
    here, float32, and input and output channels that fill whole vectors (the CNN's second
    convolution; its first, on one channel, stays with XLA)."""
    return _kernels_run(True, x, kernel, kernel.shape[2]) and kernels.runs(kernel.shape[3])


def _patch_rows(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The valid patches of `x (B, H, W, C)` for an HWIO `kernel`, one row per output pixel,
    features ordered as the rows of `kernel.reshape(-1, C_out)` (offset-major, channel-minor).

    One gather over the pixels: XLA:CPU writes it in a single pass, where stacked slices are
    first copied out one by one and then concatenated (results/bench/NOTES.md, "The CNN:
    patches gathered")."""
    n, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    rows, _ = _patch_index(h, w, kh, kw)

    def gather(x):
        return x.reshape(n, h * w, c)[:, rows].reshape(n, h - kh + 1, w - kw + 1, kh * kw * c)

    return kernels.on_cpu(_conv_kernels_run(x, kernel), partial(kernels.patches, kh=kh, kw=kw),
                          gather, x)


def _patch_rows_transpose(dpatches: jax.Array, height: int, width: int) -> jax.Array:
    """The transpose of `_patch_rows`: `dpatches (B, OH, OW, kh * kw, C)` summed back onto the
    pixels they were read from, `(B, height, width, C)`, offsets added in row-major order.

    Each offset is a gather (reading 0 where no patch covers the pixel) fused into one sum; the
    same sum as padded copies (`_shift_sum`) runs slower on XLA:CPU, and much slower vmapped."""
    n, oh, ow, k, c = dpatches.shape
    _, back = _patch_index(height, width, height - oh + 1, width - ow + 1)
    flat = dpatches.reshape(n, oh * ow * k, c)
    total = 0
    for offset in range(k):
        total = total + flat.at[:, back[:, offset]].get(mode="fill", fill_value=0)
    return total.reshape(n, height, width, c)


@jax.custom_vjp
def conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Valid, stride-1 2-D convolution, NHWC input and HWIO kernel, as matrix products on
    patches gathered from `x` (`_patch_rows`), forward and backward; on a CPU, where the channels
    fill its vectors, the patches and both gradients by `uspsjax.kernels` (the input gradient
    one image at a time, its patch gradients never written out; results/bench/NOTES.md §30).

    Same values and gradients as `lax.conv_general_dilated`, without XLA:CPU's convolutions: its
    kernel-gradient convolution runs about 50 times slower inside a loop body, and a population
    (vmap over members' kernels) turns every convolution into a grouped one, which XLA:CPU runs
    on a slow path (both measured in `results/bench/NOTES.md`).
    """
    return _patch_rows(x, kernel) @ kernel.reshape(-1, kernel.shape[-1])


def _conv2d_fwd(x, kernel):
    return conv2d(x, kernel), (x, kernel)


def _conv2d_bwd(residuals, g):
    x, kernel = residuals
    kh, kw, c_in, c_out = kernel.shape
    height, width = x.shape[1:3]
    patches = _patch_rows(x, kernel).reshape(-1, kh * kw * c_in)
    kernel_t = kernel.reshape(-1, c_out).T

    def products(patches, g, kernel_t):
        # g^T . patches, so XLA:CPU transposes the small output gradient, not the 9x larger
        # patches.
        dk = jax.lax.dot_general(g.reshape(-1, c_out), patches, (((0,), (0,)), ((), ()))).T
        dpatches = (g @ kernel_t).reshape(*g.shape[:3], kh * kw, c_in)
        return _patch_rows_transpose(dpatches, height, width), dk

    def by_kernels(patches, g, kernel_t):
        return (kernels.conv_input_grad(g, kernel_t, height, width),
                kernels.summed_kernel_grad(patches, g.reshape(-1, c_out)))

    dx, dk = kernels.on_cpu(_conv_kernels_run(x, kernel), by_kernels, products, patches, g,
                            kernel_t)
    return dx, dk.reshape(kernel.shape)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2, stride-2 max-pooling of `x (B, H, W, C)` (H, W even), as a reshape and a max: the
    same values as `nn.max_pool`, and a gradient computed elementwise, where `nn.max_pool`'s
    select-and-scatter is slow on XLA:CPU (results/bench/NOTES.md). Only on exact ties does the
    gradient differ: it is shared among the tied inputs instead of given to the first."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_bwd(residuals, g):
    # The gradient JAX derives for the max (g / ties at each maximum; bit for bit, except that a
    # window holding a NaN gets 0, not NaN), computed in the backward pass in one elementwise
    # pass: the derived one builds and stores the tie indicators in the forward and counts them
    # with a separate reduction.
    x, y = residuals
    n, h, w, c = x.shape
    windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
    ties = sum((windows[:, :, i, :, j, :] == y).astype(g.dtype) for i in range(2) for j in range(2))
    share = (g / ties)[:, :, None, :, None, :]
    return (jnp.where(windows == y[:, :, None, :, None, :], share, 0).reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


# From this batch size on, a Dense layer's product and kernel gradient run in `uspsjax.kernels` (on
# a CPU, outputs filling whole vectors); with fewer rows XLA's dots are as fast or faster (the
# CNN's dense layer, in blocks of 32 rows, 0.95x a step with the kernel gradient;
# results/bench/NOTES.md §31).
DENSE_KERNEL_ROWS = 512


def _dense_kernels_run(x: jax.Array, kernel: jax.Array, size: int) -> bool:
    """Whether a dense layer's product of `x` and `kernel` with `size` outputs runs in
    `uspsjax.kernels`: from `DENSE_KERNEL_ROWS` rows, where they take it."""
    return x.shape[0] >= DENSE_KERNEL_ROWS and _kernels_run(True, x, kernel, size)


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x (B, in) . kernel (in, out)`; from `DENSE_KERNEL_ROWS` rows the product and its kernel
    gradient `x^T . g` by `uspsjax.kernels` where they run them (the FC at batch 1024 1.09x a
    step for the kernel gradient, 1.07x more for the product, against XLA's dots;
    results/bench/NOTES.md §31, §37)."""
    runs = _dense_kernels_run(x, kernel, kernel.shape[1])
    return kernels.on_cpu(runs, kernels.product, jnp.matmul, x, kernel)


def _dense_fwd(x, kernel):
    return dense(x, kernel), (x, kernel)


def _dense_bwd(residuals, g):
    x, kernel = residuals
    # Contracted in place, as JAX's own derivative of `x @ kernel` is: `.T` written out would
    # copy the transposes (the CNN's dense layer 9 ms a step at batch 1024).
    product = partial(jax.lax.dot_general, dimension_numbers=(((0,), (0,)), ((), ())))
    runs = _dense_kernels_run(x, g, kernel.shape[1])
    dk = kernels.on_cpu(runs, kernels.summed_kernel_grad, product, x, g)
    return jax.lax.dot_general(g, kernel, (((1,), (1,)), ((), ()))), dk


dense.defvjp(_dense_fwd, _dense_bwd)


class Dense(nn.Module):
    """Keras `Dense(features)`: kernel `(in, features)`, bias `(features,)`, as `dense`."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to `x` of shape `(batch, in)`."""
        kernel = self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.features),
                            x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
        return dense(x, kernel) + bias


class Conv(nn.Module):
    """Keras `Conv2D(features, kernel_size)` with valid padding: kernel `(kh, kw, C_in, F)`,
    bias `(F,)`."""

    features: int
    kernel_size: tuple = (3, 3)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to `x` of shape `(batch, height, width, channels)`."""
        kernel = self.param("kernel", nn.initializers.zeros,
                            (*self.kernel_size, x.shape[-1], self.features), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
        return conv2d(x, kernel) + bias


class Network(nn.Module):
    """What the three networks share: hidden-layer activation with optional batch norm and L1."""

    batchnorm: str = "none"
    bn_momentum: float = 0.99
    dropout_at: str = "none"
    l1_at: str = "none"

    # Settings the study used for this network, applied before a sweep's own settings.
    defaults: ClassVar[dict] = {}
    # The dropout placements this network has layers for.
    dropout_places: ClassVar[tuple] = ("none",)
    # The batch axis of the hidden activations `activate` sees.
    batch_axis: ClassVar[int] = 0
    # On a CPU, the samples a training step works through at a time when its batch is larger
    # (`train.microbatch_size`); None: the whole batch.
    cpu_block: ClassVar[int | None] = None

    def activate(self, y: jax.Array, train: bool, last: bool) -> jax.Array:
        """ReLU with batch normalization before or after it, and the L1 activity recorded."""
        norm = lambda v: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                      epsilon=1e-3)(v)  # Keras' epsilon
        if self.batchnorm == "before":
            y = norm(y)
        y = nn.relu(y)
        if self.batchnorm == "after":
            y = norm(y)
        if self.l1_at == "hidden" or (self.l1_at == "last" and last):
            # Keras divides an activity regularizer by the batch size.
            self.sow("losses", "l1", jnp.sum(jnp.abs(y)) / y.shape[self.batch_axis])
        return y


class FC(Network):
    """Fully connected: Dense 256-128-64-32-16 (ReLU) -> Dense 10. 109,722 parameters."""

    widths: tuple = (256, 128, 64, 32, 16)
    dropout_places: ClassVar[tuple] = ("none", "dense")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, rates=(0.0, 0.0), rows=None) -> jax.Array:
        """Logits for `x` of shape `(batch, 256)`; `rates` are (conv, dense) dropout rates,
        `rows` where `x` sits in a larger batch (`dropout`)."""
        for i, width in enumerate(self.widths):
            x = self.activate(Dense(width)(x), train, last=i == len(self.widths) - 1)
            if self.dropout_at == "dense":
                x = dropout(self, x, rates[1], train, rows)
        return Dense(10)(x)


class LC(Network):
    """Locally connected, unshared weights: the image as a length-256 sequence, five
    LocallyConnected1D layers (kernel 3; 256, 128, 64, 32, 16 filters; ReLU) -> flatten (3936)
    -> Dense 10. 33,177,770 parameters."""

    filters: tuple = (256, 128, 64, 32, 16)
    lowering: str = "auto"  # how its layers lower, one of LC_LOWERINGS
    dropout_places: ClassVar[tuple] = ("none", "conv")
    batch_axis: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, rates=(0.0, 0.0), rows=None) -> jax.Array:
        """Logits for `x` of shape `(batch, 256)`; `rates` are (conv, dense) dropout rates,
        `rows` where `x` sits in a larger batch (`dropout`)."""
        # Hidden activations are (length, batch, channels): each position's rows contiguous for
        # the per-position dots of the CPU lowering (results/bench/NOTES.md).
        x = x.T[..., None]
        for i, f in enumerate(self.filters):
            x = self.activate(LocallyConnected1D(f, lowering=self.lowering)(x), train,
                              last=i == len(self.filters) - 1)
        # Back to (batch, length, channels): Keras' flatten order, and dropout masks drawn as
        # before the layout changed.
        x = jnp.swapaxes(x, 0, 1)
        if self.dropout_at == "conv":
            x = dropout(self, x, rates[0], train, rows)
        return Dense(10)(x.reshape(x.shape[0], -1))


class CNN(Network):
    """Conv 32 3x3 -> Conv 64 3x3 (valid, ReLU) -> MaxPool 2 -> Dropout -> Dense 128 (ReLU)
    -> Dropout -> Dense 10. 315,146 parameters. The study's dropout is 0.25 after the pooling
    and 0.5 after the dense layer."""

    defaults: ClassVar[dict] = {"dropout_at": "both", "dropout_conv": 0.25, "dropout_dense": 0.5}
    dropout_places: ClassVar[tuple] = ("none", "conv", "dense", "both")
    # A block's patch matrices and their gradients (~0.4 MB a sample) stay in the CPU's cache:
    # batch 1024 in blocks of 32 trains 1.4x as fast as at once (results/bench/NOTES.md §15).
    cpu_block: ClassVar[int | None] = 32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, rates=(0.0, 0.0), rows=None) -> jax.Array:
        """Logits for `x` of shape `(batch, 256)`; `rates` are (conv, dense) dropout rates,
        `rows` where `x` sits in a larger batch (`dropout`)."""
        x = x.reshape(x.shape[0], 16, 16, 1)
        x = self.activate(Conv(32)(x), train, last=False)
        x = self.activate(Conv(64)(x), train, last=False)
        x = max_pool_2x2(x)
        if self.dropout_at in ("conv", "both"):
            x = dropout(self, x, rates[0], train, rows)
        x = self.activate(Dense(128)(x.reshape(x.shape[0], -1)), train, last=True)
        if self.dropout_at in ("dense", "both"):
            x = dropout(self, x, rates[1], train, rows)
        return Dense(10)(x)


NETWORKS: dict[str, type[Network]] = {"fc": FC, "lc": LC, "cnn": CNN}

_FAN_RULES = {
    "glorot_uniform": (1.0, "fan_avg", "uniform"),
    "glorot_normal": (1.0, "fan_avg", "truncated_normal"),
    "he_uniform": (2.0, "fan_in", "uniform"),
    "he_normal": (2.0, "fan_in", "truncated_normal"),
    "lecun_uniform": (1.0, "fan_in", "uniform"),
    "lecun_normal": (1.0, "fan_in", "truncated_normal"),
}
# Families whose draw is multiplied by the (dynamic) init scale; "constant" draws ones.
INIT_FAMILIES = ("constant", "random_normal", "random_uniform", *_FAN_RULES)
LC_FANS = ("position", "keras")


def parse_init(spec: str) -> tuple[str, float]:
    """Split an initializer name into (family, scale): "constant(1e5)" -> ("constant", 1e5),
    "zeros" -> ("constant", 0.0), "ones" -> ("constant", 1.0), "glorot_uniform" -> (..., 1.0).

    Raises ValueError for an unknown name or a malformed constant.
    """
    spec = spec.strip()
    if spec == "zeros":
        return "constant", 0.0
    if spec == "ones":
        return "constant", 1.0
    if spec.startswith("constant(") and spec.endswith(")"):
        try:
            return "constant", float(spec[len("constant("):-1])
        except ValueError:
            raise ValueError(f"malformed initializer {spec!r}, expected constant(NUMBER)") from None
    if spec in INIT_FAMILIES and spec != "constant":
        return spec, 1.0
    raise ValueError(f"unknown initializer {spec!r} (known: zeros, ones, constant(v), "
                     + ", ".join(f for f in INIT_FAMILIES if f != "constant") + ")")


def draw_kernel(family: str, key: jax.Array, shape: tuple, scale: jax.Array,
                per_position: bool, dtype=jnp.float32) -> jax.Array:
    """Draw one kernel of `shape` from `family`, times `scale` (a traced value is fine).

    Fans follow Keras: every axis before the last two is receptive field. `per_position` instead
    treats the leading axis of a locally connected kernel as independent positions, each with
    fans (k * C_in, F); Keras' own fans make LC weights about sqrt(L_out) times smaller.
    """
    if family == "constant":
        base = jnp.ones(shape, dtype)
    elif family == "random_normal":
        base = 0.05 * jax.random.normal(key, shape, dtype)  # Keras' default stddev
    elif family == "random_uniform":
        base = jax.random.uniform(key, shape, dtype, -0.05, 0.05)
    else:
        gain, mode, distribution = _FAN_RULES[family]
        batch_axis = (0,) if per_position else ()
        init = jax.nn.initializers.variance_scaling(gain, mode, distribution, batch_axis=batch_axis)
        base = init(key, shape, dtype)
    return scale * base


def count_params(params) -> int:
    """The number of scalars in a parameter pytree."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
