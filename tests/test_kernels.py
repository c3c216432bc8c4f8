"""The LC's C kernels: built for this machine, each product equal to XLA's dot to float32
rounding, a population's members computed exactly as single calls, and a clear reason where they
cannot be built."""

import os
import shutil

import jax
import numpy as np
import pytest

from uspsjax import kernels
from uspsjax.models import LC_LOWERING_NAMES, lc_lowering_name

COMPILER = os.environ.get("CC", "cc")
needs_compiler = pytest.mark.skipif(shutil.which(COMPILER) is None, reason="no C compiler")

FORWARD, KERNEL_GRAD, PATCH_GRAD = "gmk,gkn->gmn", "gmk,gmn->gkn", "gkn,gmn->gkm"
# (op, the product as an einsum, the operands' shapes): rows that do not fill a tile (13, 16 and
# 32 rows against tiles of 6 or 12), one to four vectors across a tile, windows of one channel
# (the LC's first layer: 3 patch columns) and of many.
CASES = [
    (kernels.lc_forward, FORWARD, (7, 16, 13), (7, 13, 48)),
    (kernels.lc_forward, FORWARD, (5, 32, 3), (5, 3, 256)),
    (kernels.lc_kernel_grad, KERNEL_GRAD, (7, 32, 13), (7, 32, 16)),
    (kernels.lc_kernel_grad, KERNEL_GRAD, (5, 16, 384), (5, 16, 64)),
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
    members = [operands((x_shape, y_shape), seed) for seed in range(3)]
    stacked = jax.jit(jax.vmap(op))(*(np.stack(parts) for parts in zip(*members)))
    single = jax.jit(op)
    for i, (x, y) in enumerate(members):
        np.testing.assert_array_equal(stacked[i], single(x, y))
    np.testing.assert_array_equal(single(*members[0]), single(*members[0]))


def test_a_missing_compiler_is_named(tmp_path):
    library, why = kernels.build([str(tmp_path / "no-such-cc")], tmp_path)
    assert library is None and why.startswith("no working C compiler (")


@needs_compiler
def test_a_failed_build_says_why_and_leaves_nothing(tmp_path):
    library, why = kernels.build([COMPILER, "-include", str(tmp_path / "missing.h")], tmp_path)
    assert library is None and why.startswith("the C kernels did not compile (")
    assert "missing.h" in why
    assert list(tmp_path.iterdir()) == []


@needs_compiler
def test_a_build_is_made_once_per_machine_and_compiler(tmp_path):
    library, why = kernels.build([COMPILER], tmp_path / "cache")
    assert why == "" and library.is_file()
    built_at = library.stat().st_mtime_ns
    again, _ = kernels.build([COMPILER], tmp_path / "cache")
    assert again == library and library.stat().st_mtime_ns == built_at
    other, _ = kernels.build([COMPILER, "-DUSPSJAX_OTHER_BUILD"], tmp_path / "cache")
    assert other != library and other.is_file()


def test_a_damaged_build_is_not_loaded(tmp_path):
    damaged = tmp_path / "kernels-0123456789abcdef.so"
    damaged.write_bytes(b"not a shared library")
    width, why = kernels.load(damaged)
    assert width == 0 and why.startswith("the C kernels could not be loaded (")
