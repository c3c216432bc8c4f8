"""The C kernels (the LC's products, the CNN's patches and gradients): built for this machine, each
product equal to the exact one to float32 rounding, a population's members computed exactly as
single calls, and a clear reason where they cannot be built."""

import os
import shlex
import shutil

import jax
import numpy as np
import pytest

from uspsjax import kernels
from uspsjax.models import LC_LOWERING_NAMES, lc_lowering_name

COMPILER = shlex.split(os.environ.get("CC", "cc"))
needs_compiler = pytest.mark.skipif(shutil.which(COMPILER[0]) is None, reason="no C compiler")

FORWARD, KERNEL_GRAD, PATCH_GRAD = "gmk,gkn->gmn", "gmk,gmn->gkn", "gkn,gmn->gkm"
# (op, the product as an einsum, the operands' shapes): rows that do not fill a tile (13, 16 and
# 32 rows against tiles of 6 or 12), one to four vectors across a tile, windows of one channel
# (the LC's first layer: 3 patch columns) and of many, a kernel gradient's sum of 600 terms,
# taken in chunks that fit the L1 cache (16 to 512 terms), the last chunk partial, and a single
# position (a dense layer's product), its rows cut in a band per thread.
CASES = [
    (kernels.product, FORWARD, (7, 16, 13), (7, 13, 48)),
    (kernels.product, FORWARD, (5, 32, 3), (5, 3, 256)),
    (kernels.product, FORWARD, (1, 1000, 96), (1, 96, 64)),
    (kernels.lc_kernel_grad, KERNEL_GRAD, (7, 32, 13), (7, 32, 16)),
    (kernels.lc_kernel_grad, KERNEL_GRAD, (1, 600, 100), (1, 600, 32)),
    (kernels.lc_kernel_grad, KERNEL_GRAD, (5, 16, 384), (5, 16, 64)),
    (kernels.lc_kernel_grad, KERNEL_GRAD, (3, 600, 30), (3, 600, 32)),
    (kernels.lc_patch_grad, PATCH_GRAD, (7, 13, 32), (7, 16, 32)),
    (kernels.lc_patch_grad, PATCH_GRAD, (5, 384, 64), (5, 48, 64)),
]


def operands(shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes)]


@needs_compiler
def test_the_kernels_are_built_here_and_run_the_lc_by_default():
    assert kernels.built(), kernels.status()
    assert kernels.status().startswith("C kernels (")
    assert lc_lowering_name("auto", "cpu") == LC_LOWERING_NAMES["kernels"]
    assert lc_lowering_name("kernels", "gpu") == LC_LOWERING_NAMES["sliced"]
    assert kernels.runs(16 * 7) and kernels.runs(32) and not kernels.runs(12)


@needs_compiler
@pytest.mark.parametrize("op, product, x_shape, y_shape", CASES)
def test_each_product_equals_the_exact_one_to_float32_rounding(op, product, x_shape, y_shape):
    x, y = operands((x_shape, y_shape))
    ours = np.asarray(jax.jit(op)(x, y), np.float64)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    exact = np.einsum(product, x, y)
    # A float32 sum of n products in any order is within n * 2^-24 * sum |products| of the exact.
    inputs, output = product.split("->")
    (summed,) = set(inputs.split(",")[0]) & set(inputs.split(",")[1]) - set(output)
    n = x_shape[inputs.index(summed)]
    bound = n * 2.0**-24 * np.einsum(product, np.abs(x), np.abs(y))
    assert ours.shape == exact.shape
    assert np.all(np.abs(ours - exact) <= bound)
    assert np.max(bound) < 1e-3 * np.mean(np.abs(exact))  # a wrong product cannot pass


@needs_compiler
@pytest.mark.parametrize("op, product, x_shape, y_shape", CASES[::2])
def test_members_of_a_population_are_computed_exactly_as_single_calls(op, product, x_shape,
                                                                         y_shape):
    # Alone, a single position's rows are cut in bands, one per thread; in a population each
    # member is one item of work: the same sums in the same order, bit for bit.
    members = [operands((x_shape, y_shape), seed) for seed in range(3)]
    stacked = jax.jit(jax.vmap(op))(*(np.stack(parts) for parts in zip(*members)))
    single = jax.jit(op)
    for i, (x, y) in enumerate(members):
        np.testing.assert_array_equal(stacked[i], single(x, y))
    np.testing.assert_array_equal(single(*members[0]), single(*members[0]))


def float32_bound(n, exact_abs):
    """How far a float32 sum of n products, in any order, may be from the exact sum."""
    return n * 2.0**-24 * exact_abs


@needs_compiler
@pytest.mark.parametrize("images, window", [((3, 8, 7, 16), (3, 3)), ((2, 6, 6, 32), (2, 3))])
def test_convolution_patches_and_gradients_equal_the_exact_ones(images, window):
    kh, kw = window
    x, g, w = operands((images, (*images[:-3], images[1] - kh + 1, images[2] - kw + 1, 48),
                        (48, kh * kw * images[-1])))
    patches = np.asarray(jax.jit(kernels.patches, static_argnums=(1, 2))(x, kh, kw))
    # The patches are a copy: pixel (i + dy, j + dx) in row (i, j), offset (dy, dx).
    xs = np.asarray(x)
    for dy in range(kh):
        for dx in range(kw):
            offset = (dy * kw + dx) * images[-1]
            np.testing.assert_array_equal(
                patches[..., offset:offset + images[-1]],
                xs[:, dy:dy + patches.shape[1], dx:dx + patches.shape[2]])
    x64, g64, w64 = (np.asarray(v, np.float64) for v in (patches, g, w))
    # The input gradient: the patch gradients g . w, summed back onto their pixels.
    dx = np.asarray(jax.jit(kernels.conv_input_grad, static_argnums=(2, 3))(g, w, *images[1:3]))
    exact, size = np.zeros(images), np.zeros(images)
    dpatches, dsize = g64 @ w64, np.abs(g64) @ np.abs(w64)
    for dy in range(kh):
        for dx_ in range(kw):
            part = slice((dy * kw + dx_) * images[-1], (dy * kw + dx_ + 1) * images[-1])
            rows, cols = slice(dy, dy + g.shape[1]), slice(dx_, dx_ + g.shape[2])
            exact[:, rows, cols] += dpatches[..., part]
            size[:, rows, cols] += dsize[..., part]
    assert np.all(np.abs(dx - exact) <= float32_bound(48 * kh * kw, size))
    # The kernel gradient, summed over every row of every image.
    rows = x64.reshape(-1, x64.shape[-1])
    dk = np.asarray(jax.jit(kernels.summed_kernel_grad)(patches.reshape(rows.shape),
                                                       g.reshape(-1, 48)))
    g_rows = g64.reshape(-1, 48)
    assert np.all(np.abs(dk - rows.T @ g_rows) <= float32_bound(len(rows),
                                                                np.abs(rows.T) @ np.abs(g_rows)))


@needs_compiler
@pytest.mark.parametrize("rows", [200, 1000, 4608])
def test_a_summed_kernel_gradient_is_exact_to_rounding_and_member_wise(rows):
    # Sums of 200 to 4,608 terms, in L1-sized chunks; the result's 96 rows are cut in bands, one
    # per thread of XLA's pool, alone, and not in a population.
    members = [operands(((rows, 96), (rows, 32)), seed) for seed in range(2)]
    single = jax.jit(kernels.summed_kernel_grad)
    for p, g in members:
        p64, g64 = np.asarray(p, np.float64), np.asarray(g, np.float64)
        ours = np.asarray(single(p, g))
        assert np.all(np.abs(ours - p64.T @ g64) <= float32_bound(rows, np.abs(p64.T) @ np.abs(g64)))
    stacked = jax.jit(jax.vmap(kernels.summed_kernel_grad))(*(np.stack(v) for v in zip(*members)))
    for i, (p, g) in enumerate(members):
        np.testing.assert_array_equal(stacked[i], single(p, g))


def test_a_missing_compiler_is_named(tmp_path):
    library, why = kernels.build([str(tmp_path / "no-such-cc")], tmp_path)
    assert library is None and why.startswith("no working C compiler (")


@needs_compiler
def test_a_failed_build_says_why_and_leaves_nothing(tmp_path):
    library, why = kernels.build([*COMPILER, "-include", str(tmp_path / "missing.h")], tmp_path)
    assert library is None and why.startswith("the C kernels did not compile (")
    assert "missing.h" in why
    assert list(tmp_path.iterdir()) == []


@needs_compiler
def test_a_build_is_made_once_per_machine_and_compiler(tmp_path):
    library, why = kernels.build(COMPILER, tmp_path / "cache")
    assert why == "" and library.is_file()
    built_at = library.stat().st_mtime_ns
    again, _ = kernels.build(COMPILER, tmp_path / "cache")
    assert again == library and library.stat().st_mtime_ns == built_at
    other, _ = kernels.build([*COMPILER, "-DUSPSJAX_OTHER_BUILD"], tmp_path / "cache")
    assert other != library and other.is_file()


def test_a_damaged_build_is_not_loaded(tmp_path):
    damaged = tmp_path / "kernels-0123456789abcdef.so"
    damaged.write_bytes(b"not a shared library")
    width, why = kernels.load(damaged)
    assert width == 0 and why.startswith("the C kernels could not be loaded (")


@needs_compiler
@pytest.mark.parametrize("shape, kernel_size", [((10, 5, 3), 3), ((2, 8, 4, 16), 3), ((6, 2, 1), 2)])
def test_the_lc_patches_are_an_exact_copy_of_the_sliced_ones(shape, kernel_size):
    # Channel-major rows (entry c * k + o from position l + o), leading axes as a population's.
    x = np.asarray(operands((shape,))[0])
    ours = np.asarray(jax.jit(kernels.lc_patches, static_argnums=1)(x, kernel_size))
    l_out = shape[-3] - kernel_size + 1
    expected = np.stack([x[..., o:o + l_out, :, :] for o in range(kernel_size)], axis=-1)
    np.testing.assert_array_equal(ours, expected.reshape(*expected.shape[:-2], -1))


@needs_compiler
def test_the_sgd_update_is_one_pass_of_the_optimizer_and_leaves_a_frozen_member_as_it_was():
    # Per member (rate, momentum, decay, active): trace' = (g + decay p) + momentum trace,
    # p' = p - rate trace'; the third member is frozen, its trace and parameters kept bit for bit.
    g, trace, p = (np.asarray(a) for a in operands(((3, 5, 40000),) * 3))
    hyper = np.array([[0.1, 0.9, 0.01, 1], [0.5, 0.0, 0.0, 1], [0.1, 0.9, 0.01, 0]], np.float32)
    new_trace, new_p = (np.asarray(a, np.float64)
                        for a in jax.jit(jax.vmap(kernels.sgd_update))(g, trace, p, hyper))
    rate, momentum, decay, _ = (hyper[:, i, None, None].astype(np.float64) for i in range(4))
    g64, t64, p64 = (a.astype(np.float64) for a in (g, trace, p))
    exact_trace = g64 + decay * p64 + momentum * t64
    exact_p = p64 - rate * exact_trace
    # Each rounding within 2^-24 of what it rounds: three in the trace; the parameters carry
    # the trace's error times the rate, and two roundings of their own.
    t_bound = 3 * 2.0**-24 * (np.abs(g64) + np.abs(decay * p64) + np.abs(momentum * t64))
    p_bound = rate * t_bound + 2 * 2.0**-24 * (np.abs(p64) + rate * (np.abs(exact_trace) + t_bound))
    for i in range(2):
        assert np.all(np.abs(new_trace[i] - exact_trace[i]) <= t_bound[i])
        assert np.all(np.abs(new_p[i] - exact_p[i]) <= p_bound[i])
    np.testing.assert_array_equal(new_trace[2], trace[2])
    np.testing.assert_array_equal(new_p[2], p[2])
    single = jax.jit(kernels.sgd_update)(g[1], trace[1], p[1], hyper[1])
    np.testing.assert_array_equal(single[0], new_trace[1])
    np.testing.assert_array_equal(single[1], new_p[1])
