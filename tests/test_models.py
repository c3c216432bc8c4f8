"""Networks: exact parameter counts, the LC layer against Keras semantics, initializers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compiled_forward, initial_params
from uspsjax import kernels
from uspsjax.models import (DENSE_KERNEL_ROWS, ELEMENTWISE_FEATURES, FEW_ROWS, LC_LOWERING_NAMES, NETWORKS,
                            OUTER_SUM_ROWS, PRODUCT_FORWARD_ROWS, LocallyConnected1D, bernoulli,
                            conv2d, count_params, dense, draw_kernel, lc_lowering_name,
                            locally_connected, locally_connected_reference,
                            locally_connected_sliced, max_pool_2x2, parse_init, valid_patches)
from uspsjax.train import Static, forward, init_params, make_hparams

# The study's Keras summaries, layer by layer.
STUDY_LAYERS = {
    "fc": [65792, 32896, 8256, 2080, 528, 170],
    "lc": [260096, 24804864, 6160000, 1531648, 381792, 39370],
    "cnn": [320, 18496, 295040, 1290],
}
STUDY_TOTAL = {"fc": 109_722, "lc": 33_177_770, "cnn": 315_146}


def shapes(network, **options):
    return jax.eval_shape(lambda k: init_params(Static(network=network, **options), k, 1.0),
                          jax.random.key(0))


@pytest.mark.parametrize("network", ["fc", "lc", "cnn"])
def test_parameter_counts_match_the_study(network):
    params, batch_stats = shapes(network)
    assert count_params(params) == STUDY_TOTAL[network]
    assert batch_stats == {}
    # Flax names layers by type and order; order them as the forward pass does.
    order = sorted(params, key=lambda name: (name.startswith("Dense"), name))
    if network == "cnn":
        order = ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    assert [count_params(params[name]) for name in order] == STUDY_LAYERS[network]


@pytest.mark.parametrize("network", ["fc", "lc", "cnn"])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_batchnorm_adds_only_its_own_parameters(network, placement):
    params, batch_stats = shapes(network, batchnorm=placement)
    bn = {k: v for k, v in params.items() if k.startswith("BatchNorm")}
    rest = {k: v for k, v in params.items() if not k.startswith("BatchNorm")}
    assert count_params(rest) == STUDY_TOTAL[network]
    hidden_widths = {"fc": 256 + 128 + 64 + 32 + 16, "lc": 256 + 128 + 64 + 32 + 16,
                     "cnn": 32 + 64 + 128}[network]
    assert count_params(bn) == 2 * hidden_widths
    assert count_params(batch_stats) == 2 * hidden_widths


def keras_locally_connected_1d(x, kernel, bias, k):
    """Keras LocallyConnected1D (valid, stride 1) as a plain loop: kernel (L_out, k*C, F) with
    its middle axis position-major (j * C + c), as Keras lays it out."""
    n, length, c = x.shape
    l_out = length - k + 1
    out = np.zeros((n, l_out, kernel.shape[-1]))
    for i in range(l_out):
        patch = x[:, i:i + k, :].reshape(n, k * c)  # position-major, channel fastest
        out[:, i, :] = patch @ kernel[i] + bias[i]
    return out


@pytest.mark.parametrize("lowering", ["reference", "sliced"])
def test_locally_connected_matches_keras_loop(lowering):
    rng = np.random.default_rng(0)
    n, length, c, f, k = 4, 11, 3, 5, 3
    x = rng.normal(size=(n, length, c)).astype(np.float32)
    keras_kernel = rng.normal(size=(length - k + 1, k * c, f)).astype(np.float32)
    bias = rng.normal(size=(length - k + 1, f)).astype(np.float32)
    # Our layout is channel-major (c * k + j): the same weights, reordered once.
    ours = keras_kernel.reshape(-1, k, c, f).transpose(0, 2, 1, 3).reshape(-1, c * k, f)
    layer = LocallyConnected1D(f, k, lowering=lowering)
    # The layer runs (length, batch, channels).
    y = layer.apply({"params": {"kernel": ours, "bias": bias}}, x.transpose(1, 0, 2))
    np.testing.assert_allclose(y.transpose(1, 0, 2),
                               keras_locally_connected_1d(x, keras_kernel, bias, k),
                               rtol=1e-5, atol=1e-5)


# Channels (2 -> 4) that XLA's gathers and dots take, and (16 -> 32) that fill the C kernels'
# vectors where they are built (the CNN's second convolution, 32 -> 64).
@pytest.mark.parametrize("c_in, c_out", [(2, 4), (16, 32)])
def test_conv2d_gradients_equal_xla_convolution(c_in, c_out):
    x = jax.random.normal(jax.random.key(0), (3, 8, 7, c_in))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out))
    native = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
    np.testing.assert_allclose(conv2d(x, kernel), native(x, kernel), rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(loss(conv2d), (0, 1)))
    for ours, ref in zip(grad(x, kernel), jax.grad(loss(native), (0, 1))(x, kernel)):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    hlo = grad.lower(x, kernel).as_text()
    by_kernels = kernels.built() and c_in == 16
    for target in ("uspsjax_patches", "uspsjax_conv_input_grad", "uspsjax_summed_kernel_grad"):
        assert (target in hlo) == by_kernels
    # A population's member is computed exactly as the same convolution alone.
    xs, kernels_ = jnp.stack([x, 2 * x]), jnp.stack([kernel, -kernel])
    members = jax.jit(jax.vmap(jax.grad(loss(conv2d), (0, 1))))(xs, kernels_)
    for ours, alone in zip(members, grad(xs[1], kernels_[1])):
        np.testing.assert_array_equal(ours[1], alone)


@pytest.mark.parametrize("rows, outputs", [(DENSE_KERNEL_ROWS - 1, 32), (DENSE_KERNEL_ROWS, 32),
                                           (1024, 10)])
def test_dense_gradients_equal_xlas(rows, outputs):
    # From DENSE_KERNEL_ROWS rows, with outputs that fill the kernels' vectors, the product and
    # the kernel gradient run in the C kernels where they are built; the same to float32 rounding.
    x = jax.random.normal(jax.random.key(0), (rows, 48))
    kernel = jax.random.normal(jax.random.key(1), (48, outputs))
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
    grad = jax.jit(jax.grad(loss(dense), (0, 1)))
    np.testing.assert_allclose(jax.jit(dense)(x, kernel), x @ kernel, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grad(x, kernel), jax.grad(loss(jnp.matmul), (0, 1))(x, kernel)):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    by_kernels = rows >= DENSE_KERNEL_ROWS and kernels.runs(outputs)
    hlo = grad.lower(x, kernel).as_text()
    for target in ("uspsjax_product", "uspsjax_summed_kernel_grad"):
        assert (target in hlo) == by_kernels
    members = jax.jit(jax.vmap(jax.grad(loss(dense), (0, 1))))(jnp.stack([x, -x]),
                                                                jnp.stack([kernel, 2 * kernel]))
    for ours, alone in zip(members, grad(-x, 2 * kernel)):
        np.testing.assert_array_equal(ours[1], alone)


@pytest.mark.parametrize("shape, window, dims", [((2, 12, 5), (3,), ("NWC", "WIO", "NWC")),
                                                 ((2, 9, 8, 3), (3, 2), ("NHWC", "HWIO", "NHWC"))])
def test_valid_patches_equal_xla_patches(shape, window, dims):
    x = jax.random.normal(jax.random.key(0), shape)
    xla = jax.lax.conv_general_dilated_patches(x, window, (1,) * len(window), "VALID",
                                               dimension_numbers=dims)
    ours = valid_patches(x, window)  # (B, *out, C, offsets): channel-major
    np.testing.assert_array_equal(ours.reshape(xla.shape), xla)


# The CPU lowering against `conv_general_dilated_local` (XLA's own gradient): float32 rounding
# of sums reordered, relative to the largest value of each array.
LOWERING_RTOL = 1e-5


def assert_close_to(ours, ref):
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOWERING_RTOL * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("channels", [1, 6])
# Every path of the forward and the backward. XLA's dots (use_kernels False): batch 4 with
# ELEMENTWISE_FEATURES features takes the summed-products forward and the row-product kernel
# gradient (up to PRODUCT_FORWARD_ROWS, OUTER_SUM_ROWS), 24 and fewer features the dots, 40 the
# other layout of the input gradient (FEW_ROWS). The C kernels (use_kernels True) where batch or
# features are multiples of their vectors (8 or 16): at batch 4 the forward, at 32 all three
# products, at 48 the forward and kernel gradient.
@pytest.mark.parametrize("batch, features, use_kernels", [
    (4, ELEMENTWISE_FEATURES, False), (4, 5, False), (24, ELEMENTWISE_FEATURES, False),
    (40, 5, False), (4, ELEMENTWISE_FEATURES, True), (32, 16, True), (48, 16, True)])
def test_sliced_lowering_equals_conv_general_dilated_local(channels, batch, features,
                                                           use_kernels):
    assert 4 <= min(OUTER_SUM_ROWS, PRODUCT_FORWARD_ROWS)
    assert max(OUTER_SUM_ROWS, PRODUCT_FORWARD_ROWS) < 24 and 32 <= FEW_ROWS < 40
    x = jax.random.normal(jax.random.key(0), (18, batch, channels))  # (L, B, C)
    kernel = jax.random.normal(jax.random.key(1), (16, channels * 3, features))
    sliced = lambda x, k, size: locally_connected_sliced(x, k, size, use_kernels)
    loss = lambda layer: lambda x, k: jnp.sum(jnp.sin(layer(x, k, 3)))
    assert_close_to(sliced(x, kernel, 3), locally_connected_reference(x, kernel, 3))
    for ours, ref in zip(jax.grad(loss(sliced), (0, 1))(x, kernel),
                         jax.grad(loss(locally_connected_reference), (0, 1))(x, kernel)):
        assert_close_to(ours, ref)


def test_lc_network_lowerings_agree_in_value_and_gradient():
    params, _ = initial_params(Static(network="lc"), jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (3, 256))
    hp = make_hparams(l1=1e-3)

    def loss(params, x, lowering):
        static = Static(network="lc", l1_at="hidden", lc_lowering=lowering)
        logits, _, penalty = forward(static, params, {}, x, hp, train=False)
        return jnp.sum(jnp.sin(logits)) + penalty, logits

    results = {lowering: jax.jit(jax.grad(loss, (0, 1), has_aux=True), static_argnums=2)(
        params, x, lowering) for lowering in ("reference", "sliced", "kernels")}
    ref_grads, ref_logits = results["reference"]
    for grads, logits in (results["sliced"], results["kernels"]):
        assert_close_to(logits, ref_logits)
        for ours, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert_close_to(ours, ref)
    # The kernel layout every saved result and initialization was made with.
    assert params["LocallyConnected1D_1"]["kernel"].shape == (252, 768, 128)
    assert count_params(params) == STUDY_TOTAL["lc"]


def test_lc_activity_penalty_is_per_sample():
    # Two copies of one image cost what one does (Keras divides by the batch size, and the
    # LC net's activations run batch second).
    static = Static(network="lc", l1_at="hidden")
    params, _ = initial_params(static, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (1, 256))
    penalty = lambda x: compiled_forward(static, params, {}, x, make_hparams(),
                                         train=False)[2]
    np.testing.assert_allclose(penalty(jnp.concatenate([x, x])), penalty(x), rtol=1e-5)


def test_lc_lowering_is_platform_dependent_and_recorded():
    x = jnp.ones((10, 2, 4))
    kernel = jnp.ones((8, 12, 3))
    hlo = lambda lowering: jax.jit(lambda x, k: locally_connected(x, k, 3, lowering)).lower(
        x, kernel).as_text()
    assert jax.devices()[0].platform != "cpu" or "convolution" not in hlo("auto")
    assert "convolution" in hlo("reference") and "convolution" not in hlo("sliced")
    fits = jnp.ones((10, 16, 4)), jnp.ones((8, 12, 16))  # batch and features that fit the kernels
    calls = lambda lowering: jax.jit(lambda x, k: locally_connected(x, k, 3, lowering)).lower(
        *fits).as_text().count("uspsjax_product")
    assert calls("sliced") == 0 and calls("kernels") == int(kernels.built())
    assert lc_lowering_name("auto", "cpu") == LC_LOWERING_NAMES[
        "kernels" if kernels.built() else "sliced"]
    assert lc_lowering_name("auto", "gpu") == LC_LOWERING_NAMES["reference"]
    assert lc_lowering_name("reference", "cpu") == LC_LOWERING_NAMES["reference"]
    assert lc_lowering_name("sliced", "tpu") == LC_LOWERING_NAMES["sliced"]


def test_max_pool_matches_flax():
    import flax.linen as nn
    x = jax.random.normal(jax.random.key(0), (3, 12, 12, 4))  # continuous: no ties
    flax_pool = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), flax_pool(x))
    loss = lambda pool: lambda v: jnp.sum(jnp.sin(pool(v)))
    np.testing.assert_allclose(jax.grad(loss(max_pool_2x2))(x), jax.grad(loss(flax_pool))(x),
                               rtol=1e-6)


def test_max_pool_gradient_equals_the_derived_one_with_ties():
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (3, 12, 12, 4)))  # ties at 0
    x = x.at[:, ::2].set(x[:, 1::2])  # and ties between rows
    derived = lambda v: v.reshape(3, 6, 2, 6, 2, 4).max(axis=(2, 4))
    loss = lambda pool: lambda v: jnp.sum(jnp.sin(pool(v)) * jnp.arange(4))
    np.testing.assert_array_equal(jax.jit(jax.grad(loss(max_pool_2x2)))(x),
                                  jax.jit(jax.grad(loss(derived)))(x))


@pytest.mark.parametrize("shape", [(16, 6, 6, 64), (3, 128), (1,)])
def test_dropout_masks_are_jax_bernoulli_bit_for_bit(shape):
    # The one-pass hash draws JAX's bits: the same masks, so the same numbers as before it.
    draw = jax.jit(bernoulli, static_argnums=2)
    for key in (jax.random.key(7), jax.random.PRNGKey(8), jax.random.fold_in(jax.random.key(9), 3)):
        for p in (0.5, 0.75, 0.1234567, 0.0, 1.0):
            np.testing.assert_array_equal(draw(key, jnp.float32(p), shape),
                                          jax.random.bernoulli(key, jnp.float32(p), shape))
    keys, ps = jax.random.split(jax.random.key(3), 4), jnp.array([0.5, 0.6, 0.7, 0.8], jnp.float32)
    np.testing.assert_array_equal(
        jax.jit(jax.vmap(lambda k, p: bernoulli(k, p, shape)))(keys, ps),
        jax.vmap(lambda k, p: jax.random.bernoulli(k, p, shape))(keys, ps))
    assert draw(jax.random.key(0), jnp.float32(0.5), shape).dtype == bool


def test_a_block_of_rows_draws_the_whole_masks_rows_bit_for_bit():
    # A batch trained in blocks drops exactly the units the whole batch would.
    shape, key, p = (12, 6, 6, 64), jax.random.key(5), jnp.float32(0.75)
    whole = jax.random.bernoulli(key, p, shape)
    block = jax.jit(lambda start: bernoulli(key, p, shape, start, 4))
    for start in (0, 4, 8):
        np.testing.assert_array_equal(block(start), whole[start:start + 4])
    old = jax.random.key(5, impl="rbg")  # a PRNG the one-pass form was not written for
    np.testing.assert_array_equal(bernoulli(old, p, shape, 8, 4),
                                  jax.random.bernoulli(old, p, shape)[8:])


def test_parse_init():
    assert parse_init("constant(1e5)") == ("constant", 1e5)
    assert parse_init("zeros") == ("constant", 0.0)
    assert parse_init("ones") == ("constant", 1.0)
    assert parse_init("he_normal") == ("he_normal", 1.0)
    for bad in ("glorot", "constant(x)", "constant"):
        with pytest.raises(ValueError):
            parse_init(bad)


def test_glorot_uniform_fans():
    key = jax.random.key(0)
    dense = draw_kernel("glorot_uniform", key, (256, 128), 1.0, per_position=False)
    limit = np.sqrt(6 / (256 + 128))
    assert float(jnp.max(jnp.abs(dense))) <= limit
    assert float(jnp.max(jnp.abs(dense))) > 0.95 * limit
    # LC kernel (L_out, k*C, F): Keras counts fans over the whole kernel, per-position does not.
    shape = (254, 3, 256)
    keras = draw_kernel("glorot_uniform", key, shape, 1.0, per_position=False)
    position = draw_kernel("glorot_uniform", key, shape, 1.0, per_position=True)
    np.testing.assert_allclose(float(jnp.max(jnp.abs(keras))),
                               np.sqrt(6 / (254 * 3 + 254 * 256)), rtol=1e-3)
    np.testing.assert_allclose(float(jnp.max(jnp.abs(position))), np.sqrt(6 / (3 + 256)),
                               rtol=1e-3)
    assert float(jnp.std(position) / jnp.std(keras)) == pytest.approx(np.sqrt(254), rel=0.01)


def test_constant_init_scales_ones():
    params, _ = initial_params(Static(network="fc", init="constant"), jax.random.key(0), 0.01)
    for layer in params.values():
        np.testing.assert_array_equal(layer["kernel"], np.float32(0.01))
        np.testing.assert_array_equal(layer["bias"], 0.0)


def test_registry_is_one_dict():
    assert set(NETWORKS) == {"fc", "lc", "cnn"}
