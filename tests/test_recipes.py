"""Training options beyond the study: rotations and scalings, label smoothing, weight decay and
the one-cycle schedule, each checked against what it is defined to do."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uspsjax import train
from uspsjax.train import Static, make_hparams, train_step

IMAGE = np.arange(256, dtype=np.float32).reshape(1, 256) / 255


def test_warp_is_exact_at_zero_and_turns_a_quarter_at_pi_over_2():
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 256)), jnp.float32)
    same = train.affine_images(x, jax.random.key(0), jnp.float32(0), jnp.float32(0))
    np.testing.assert_array_equal(same, x)
    quarter = train.warp_images(jnp.asarray(IMAGE), jnp.array([np.pi / 2]), jnp.array([1.0]))
    np.testing.assert_allclose(np.asarray(quarter).reshape(16, 16),
                               np.rot90(IMAGE.reshape(16, 16), -1), atol=1e-5)
    # Twice the size: output pixel (r, c) reads the source at 7.5 + (r - 7.5) / 2; on an image
    # linear in (row, col) bilinear interpolation is exact.
    big = np.asarray(train.warp_images(jnp.asarray(IMAGE), jnp.array([0.0]), jnp.array([2.0])))
    src = 7.5 + (np.arange(16) - 7.5) / 2
    np.testing.assert_allclose(big.reshape(16, 16), (16 * src[:, None] + src[None, :]) / 255,
                               atol=1e-5)


def test_random_affine_draws_within_its_strengths():
    x = jnp.tile(jnp.asarray(IMAGE), (64, 1))
    out = train.affine_images(x, jax.random.key(1), jnp.float32(15), jnp.float32(0.1))
    assert not np.allclose(out[0], out[1])  # each image its own draw
    # At most 15 degrees and 10 %: every image stays close to the original in the centre.
    centre = np.asarray(out).reshape(64, 16, 16)[:, 6:10, 6:10]
    assert np.abs(centre - IMAGE.reshape(16, 16)[6:10, 6:10]).max() < 0.25


def test_label_smoothing_zero_is_plain_cross_entropy_and_positive_mixes_in_uniform():
    logits = jax.random.normal(jax.random.key(2), (8, 10))
    y = jnp.arange(8) % 10
    plain = jnp.mean(train.cross_entropy(logits, y))
    np.testing.assert_allclose(train.smoothed_cross_entropy(logits, y, 0.0), plain, rtol=1e-6)
    uniform = -jnp.mean(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(train.smoothed_cross_entropy(logits, y, 0.1),
                               0.9 * plain + 0.1 * uniform, rtol=1e-5)


def test_weight_decay_adds_its_share_of_the_weights_to_the_step(small):
    static = Static(network="fc", batch_size=8, epochs=1)
    x, y = small.x_train[:8], small.y_train[:8]
    steps, step = {}, jax.jit(partial(train_step, static))  # one program for both
    for wd in (0.0, 0.1):
        hp = make_hparams(lr=0.5, weight_decay=wd)
        state = train.init_members(static, jax.random.key(0), hp, 512)
        new, *_ = step(state, hp, x, y, jax.random.key(1))
        steps[wd] = (state.params, new.params)
    (p0, plain), (_, decayed) = steps[0.0], steps[0.1]
    for a, b, p in zip(jax.tree.leaves(plain), jax.tree.leaves(decayed), jax.tree.leaves(p0)):
        np.testing.assert_allclose(b, a - 0.5 * 0.1 * p, rtol=1e-5, atol=1e-6)


def test_onecycle_warms_up_then_decays():
    f = [float(train.schedule("onecycle", jnp.float32(p))) for p in (0.0, 0.15, 0.3, 0.65, 1.0)]
    np.testing.assert_allclose(f, [0.04, 0.52, 1.0, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(float(train.schedule("cosine", jnp.float32(0.5))), 0.5, atol=1e-7)


@pytest.mark.parametrize("settings", [{"affine": True}, {"lr_schedule": "onecycle"}])
def test_a_recipe_member_trains_and_vmaps_like_a_single_run(small, settings):
    from conftest import assert_curves_match
    static = Static(network="fc", batch_size=32, epochs=2, **settings)
    hps = [make_hparams(lr=0.05, momentum=0.9, rotate=10.0, scale=0.1, weight_decay=1e-3,
                        label_smoothing=ls) for ls in (0.0, 0.1)]
    keys = jnp.stack([jax.random.key(0), jax.random.key(1)])
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *hps)
    _, curves = train.train_members(static, small, keys, stacked)
    for i, hp in enumerate(hps):
        _, single = train.train_members(static, small, keys[i], hp)
        assert_curves_match(curves[i], single, small.x_test.shape[0])
    # It learns (one-cycle spends its first epoch warming up: 2 epochs reach ~50 %).
    assert np.all(np.isfinite(curves)) and np.all(curves[:, -1, 0] < curves[:, 0, 0])
    assert curves[:, -1, 3].min() > 0.3
