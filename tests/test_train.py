"""The trainer: vmapped members equal single runs, determinism, divergence, and the semantics
of bootstrap, dropout, L1 activity and batch normalization."""

from dataclasses import replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import (assert_curves_match, assert_params_match, compiled_forward,
                      initial_params)
from uspsjax import kernels, population
from uspsjax.population import cpu_cache_bytes, cpu_lane_limit
from uspsjax.models import FC, dropout
from uspsjax.sweep import environment
from uspsjax.train import (KERNEL_UPDATE_FLOATS, Hparams, Static, compiler_options, init_member,
                           init_members, make_hparams, make_optimizer, make_train,
                           microbatch_rule, microbatch_size, sgd_step, shift_images,
                           train_epoch, train_members, train_step)


def single_runs(static, data, keys, hps):
    return [train_members(static, data, k, hp) for k, hp in zip(keys, hps)]


@pytest.mark.parametrize("static", [
    Static(network="fc", batch_size=16, epochs=2),
    Static(network="cnn", batch_size=32, epochs=1, dropout_at="both"),
    Static(network="fc", batch_size=32, epochs=2, batchnorm="before", bootstrap=True),
    Static(network="fc", batch_size=16, epochs=1, augment=2),
])
def test_vmapped_member_equals_its_single_run(small, static):
    keys = [jax.random.key(s) for s in range(3)]
    hps = [make_hparams(lr=lr, momentum=m, dropout_conv=0.25, dropout_dense=0.5)
           for lr, m in [(0.01, 0.9), (0.05, 0.0), (0.001, 0.5)]]
    states, curves = train_members(static, small, jnp.stack(keys), population.stack(hps))
    for i, (state, curve) in enumerate(single_runs(static, small, keys, hps)):
        assert_curves_match(curves[i], curve, small.x_test.shape[0])
        assert_params_match(jax.tree.map(lambda x: x[i], states.params), state.params)
    assert np.all(np.isfinite(curves))


@pytest.mark.parametrize("static, block, hp", [
    (Static(network="cnn", batch_size=32, epochs=1, dropout_at="both"), 8,
     make_hparams(lr=0.01, momentum=0.9, dropout_conv=0.25, dropout_dense=0.5)),
    (Static(network="fc", batch_size=16, epochs=2, dropout_at="dense", l1_at="hidden"), 4,
     make_hparams(lr=0.01, momentum=0.9, dropout_dense=0.3, l1=1e-4, label_smoothing=0.1)),
])
def test_a_batch_in_blocks_trains_as_the_whole_batch(small, static, block, hp):
    """Gradients summed over blocks, each block with its rows of the batch's dropout masks:
    the whole batch's training to float32 rounding (other masks would change the curves)."""
    runs = [train_members(replace(static, microbatch=m), small, jax.random.key(3), hp)
            for m in (static.batch_size, block)]
    (whole, whole_curves), (blocks, block_curves) = runs
    assert_curves_match(block_curves, whole_curves, small.x_test.shape[0])
    assert_params_match(blocks.params, whole.params)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(blocks.params),
                                                          jax.tree.leaves(whole.params)))


def test_microbatch_size_keeps_the_whole_batch_where_blocks_would_change_it():
    cnn = Static(network="cnn", batch_size=1024)
    assert microbatch_size(cnn, "cpu") == 32
    assert microbatch_size(cnn, "gpu") == 1024
    assert microbatch_size(replace(cnn, batch_size=32), "cpu") == 32
    assert microbatch_size(replace(cnn, batch_size=48), "cpu") == 48  # not a multiple of 32
    assert microbatch_size(replace(cnn, batchnorm="after"), "cpu") == 1024
    assert microbatch_size(replace(cnn, adversarial="fgsm"), "cpu") == 1024
    assert microbatch_size(replace(cnn, microbatch=256), "gpu") == 256
    assert microbatch_size(Static(network="fc", batch_size=1024), "cpu") == 1024
    assert microbatch_size(Static(network="lc", batch_size=1024), "cpu") == 1024
    assert microbatch_rule("cpu").startswith("cnn batches larger than 32 in blocks of 32")
    assert microbatch_rule("gpu") == "whole batches"
    assert environment()[1]["microbatch"] == microbatch_rule(jax.devices()[0].platform)
    if jax.devices()[0].platform == "cpu":  # the CPU tactics' constants, recorded with a result
        assert environment()[1]["cpu_tactics"] == (
            f"member chunks within {cpu_cache_bytes() / 2**20:g} MiB of cache, up to "
            f"{cpu_lane_limit()} at once; LC patches and products and CNN convolutions by "
            f"{kernels.status()}; LC forward as "
            "summed products up to batch 16 where the kernels do not run it, kernel gradient as "
            "row products up to batch 16 (both for layers of 128+ features), patch gradient "
            "batch-innermost up to batch 32; dense products and kernel gradients by the kernels "
            "from batch 512; "
            "parameter tensors of 1,048,576+ floats updated by the kernels")


def test_same_seed_is_bit_identical(small):
    train = jax.jit(make_train(Static(network="fc", epochs=2), small))
    hp = make_hparams(lr=0.01)
    _, a = train(jax.random.key(7), hp)
    _, b = train(jax.random.key(7), hp)
    _, c = train(jax.random.key(8), hp)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def frozen_parts(state):
    """What a diverged member must never change: parameters, statistics, optimizer state."""
    return (state.params, state.batch_stats, state.opt_state)


@pytest.mark.parametrize("batchnorm, hp", [("after", make_hparams(lr=50.0)),
                                           ("after", make_hparams(lr=50.0, momentum=0.9)),
                                           ("none", make_hparams(lr=1e-3, init_scale=1e5)),
                                           ("none", make_hparams(lr=50.0, momentum=0.9,
                                                                 weight_decay=0.01))],
                         ids=["lr50-batchnorm", "lr50-momentum-batchnorm", "init1e5",
                              "lr50-weight-decay"])
def test_divergent_member_is_never_updated_again(small, batchnorm, hp):
    static = Static(network="fc", batch_size=16, epochs=3, batchnorm=batchnorm)
    step = jax.jit(partial(train_step, static))
    state = init_members(static, jax.random.key(0), hp, 512)
    frozen, steps = None, 12
    for i in range(steps):
        x, y = small.x_train[16 * i: 16 * (i + 1)], small.y_train[16 * i: 16 * (i + 1)]
        new, _, _, healthy = step(state, hp, x, y, jax.random.key(i))
        if frozen is None and not healthy:
            frozen = state
        if frozen is None:
            assert int(new.diverged) == 0
            assert not np.array_equal(new.params["Dense_0"]["kernel"],
                                      state.params["Dense_0"]["kernel"])
        else:  # from the first non-finite loss on: marked, and not one bit changes again
            assert int(new.diverged) == 1
            jax.tree.map(np.testing.assert_array_equal, frozen_parts(new), frozen_parts(frozen))
        state = new
    assert frozen is not None, "the member did not diverge"


def test_divergent_neighbours_change_nothing_beyond_rounding(small):
    static = Static(network="fc", batch_size=16, epochs=3)
    healthy = [make_hparams(lr=0.01, momentum=0.9), make_hparams(lr=0.001)]
    divergent = [make_hparams(lr=50.0), make_hparams(lr=1e-3, init_scale=1e5)]
    keys = jnp.stack([jax.random.key(i) for i in range(4)])
    epoch = jax.jit(jax.vmap(partial(train_epoch, static), in_axes=(0, 0, None)))

    def run(keys, hps):
        state, curves, after_first = init_members(static, keys, hps, 512), [], None
        for _ in range(static.epochs):
            state, metrics = epoch(state, hps, small)
            curves.append(metrics)
            after_first = after_first or state
        return after_first, state, np.stack(curves, 1)

    mixed_hps = population.stack(healthy + divergent)
    first, last, mixed = run(keys, mixed_hps)
    _, alone_state, alone = run(keys[:2], population.stack(healthy))
    assert np.all(np.isfinite(alone))
    assert_curves_match(mixed[:2], alone, small.x_test.shape[0])
    assert_params_match(jax.tree.map(lambda x: x[:2], last.params), alone_state.params)
    div = np.asarray(last.diverged)
    assert list(div) == [0, 0, 1, 1]  # both blow up in their first epoch
    for i in (2, 3):  # NaN curves from the divergence on; the state of epoch 1 never changes
        assert np.all(np.isnan(mixed[i]))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b[i]),
                     frozen_parts(first), frozen_parts(last))


def test_bootstrap_resamples_with_replacement_per_member(small):
    static = Static(network="fc", bootstrap=True)
    hp = population.stack([make_hparams()] * 3)
    keys = jnp.stack([population.member_key(0, bag) for bag in (1, 2, 3)])
    idx = np.asarray(init_members(static, keys, hp, 512).train_idx)
    again = np.asarray(init_members(static, keys, hp, 512).train_idx)
    np.testing.assert_array_equal(idx, again)
    for row in idx:
        assert row.shape == (512,) and row.min() >= 0 and row.max() < 512
        # With replacement: about 1 - 1/e of the samples are drawn at least once.
        assert 0.58 < len(np.unique(row)) / 512 < 0.68
    assert not np.array_equal(idx[0], idx[1]) and not np.array_equal(idx[1], idx[2])
    plain = init_members(Static(network="fc"), jax.random.key(0), make_hparams(), 512)
    np.testing.assert_array_equal(plain.train_idx, np.arange(512))


def test_dropout_matches_hand_computation():
    class Drop(FC):
        def __call__(self, x, *, train, rates=(0.0, 0.0)):
            return dropout(self, x, rates[1], train)

    x = jnp.arange(1.0, 1001.0).reshape(10, 100)
    key = jax.random.key(3)
    rate = jnp.float32(0.25)
    y = Drop().apply({}, x, train=True, rates=(0.0, rate), rngs={"dropout": key})
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert 0.70 < kept.mean() < 0.80
    np.testing.assert_array_equal(Drop().apply({}, x, train=False, rates=(0.0, rate)), x)
    np.testing.assert_array_equal(
        Drop().apply({}, x, train=True, rates=(0.0, 0.0), rngs={"dropout": key}), x)


def test_l1_activity_penalty_matches_keras_semantics():
    static = Static(network="fc", l1_at="hidden")
    params, _ = initial_params(static, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (8, 256))
    _, _, penalty = compiled_forward(static, params, {}, x, make_hparams(), train=False)
    # By hand: sum over hidden layers of sum |relu(activation)|, divided by the batch size.
    h, expected = x, 0.0
    for name in ["Dense_0", "Dense_1", "Dense_2", "Dense_3", "Dense_4"]:
        h = jax.nn.relu(h @ params[name]["kernel"] + params[name]["bias"])
        expected += float(jnp.sum(jnp.abs(h))) / 8
    assert float(penalty) == pytest.approx(expected, rel=1e-5)
    last = Static(network="fc", l1_at="last")
    _, _, p_last = compiled_forward(last, params, {}, x, make_hparams(), train=False)
    assert float(p_last) == pytest.approx(float(jnp.sum(jnp.abs(h))) / 8, rel=1e-5)
    none = Static(network="fc")
    assert float(compiled_forward(none, params, {}, x, make_hparams(),
                                  train=False)[2]) == 0.0


def test_batchnorm_statistics_are_per_member_and_eval_uses_running_averages(small):
    static = Static(network="fc", batchnorm="before", epochs=1, batch_size=64, bn_momentum=0.9)
    keys = jnp.stack([jax.random.key(0), jax.random.key(1)])
    hps = population.stack([make_hparams(lr=0.05), make_hparams(lr=0.001)])
    epoch = jax.jit(jax.vmap(partial(train_epoch, static), in_axes=(0, 0, None)))
    state, _ = epoch(init_members(static, keys, hps, 512), hps, small)
    mean0 = state.batch_stats["BatchNorm_0"]["mean"]
    assert not np.allclose(mean0[0], mean0[1])  # each member its own statistics
    assert not np.allclose(mean0[0], 0.0)       # running averages were updated
    single_epoch = jax.jit(partial(train_epoch, static))  # one program for both members
    for i in range(2):  # member i equals its own single run
        hp_i = make_hparams(lr=[0.05, 0.001][i])
        single, _ = single_epoch(init_members(static, keys[i], hp_i, 512), hp_i, small)
        np.testing.assert_allclose(mean0[i], single.batch_stats["BatchNorm_0"]["mean"],
                                   rtol=1e-4, atol=1e-6)
    # Evaluation uses the running averages: a batch of one gives the same logits as in a batch.
    member = jax.tree.map(lambda v: v[0], state)
    hp = make_hparams()
    x = small.x_test[:16]
    params, stats = member.params, member.batch_stats
    full = compiled_forward(static, params, stats, x, hp, train=False)[0]
    one = compiled_forward(static, params, stats, x[:1], hp, train=False)[0]
    np.testing.assert_allclose(full[:1], one, rtol=1e-5, atol=1e-6)
    # ... whereas training mode normalizes by the batch's own statistics.
    trained = compiled_forward(static, params, stats, x, hp, train=True, key=jax.random.key(0))[0]
    assert not np.allclose(trained, full, atol=1e-3)
    assert isinstance(hp, Hparams)


def test_cosine_schedule_scales_the_learning_rate(small):
    x, y, key = small.x_train[:16], small.y_train[:16], jax.random.key(0)
    cosine, constant = Static(network="fc", lr_schedule="cosine"), Static(network="fc")
    step = jax.jit(train_step, static_argnums=0)
    state = init_members(constant, jax.random.key(1), make_hparams(lr=0.1), 512)
    # Halfway through, cosine decay has halved the rate: the same step as lr 0.05 constant.
    half, *_ = step(cosine, state, make_hparams(lr=0.1), x, y, key, 0.5)
    # The learning rate lives in the optimizer state: start a member at lr 0.05 (same params).
    state_05 = init_members(constant, jax.random.key(1), make_hparams(lr=0.05), 512)
    slow, *_ = step(constant, state_05, make_hparams(lr=0.05), x, y, key, 0.0)
    for a, b in zip(jax.tree.leaves(half.params), jax.tree.leaves(slow.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    start, *_ = step(cosine, state, make_hparams(lr=0.1), x, y, key, 0.0)
    full, *_ = step(constant, state, make_hparams(lr=0.1), x, y, key, 0.0)
    for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_shift_images_translates_each_image_by_its_own_offset(small):
    x = small.x_train[:64]
    shifted = np.asarray(shift_images(x, jax.random.key(3), 2))
    images = np.pad(np.asarray(x).reshape(-1, 16, 16), ((0, 0), (2, 2), (2, 2)))
    seen = set()
    for image, out in zip(images, shifted.reshape(-1, 16, 16)):
        # The one window of the zero-padded image this output is: its offset in [-2, 2]^2.
        hits = [(dy - 2, dx - 2) for dy in range(5) for dx in range(5)
                if np.array_equal(image[dy:dy + 16, dx:dx + 16], out)]
        assert hits, "output is not a whole-pixel translation of its input"
        seen.add(hits[0])
    assert len(seen) > 5  # offsets differ between images
    np.testing.assert_array_equal(shift_images(x, jax.random.key(3), 2), shifted)
    assert not np.array_equal(shift_images(x, jax.random.key(4), 2), shifted)


def test_initialization_compiled_for_one_run_draws_the_same_bits():
    """The initialization program is compiled at a lower LLVM level (`compiler_options(...,
    once=True)`) to compile faster; its parameters are the default compile's, bit for bit."""
    static = Static(network="fc")
    keys = jnp.stack([population.member_key(s) for s in range(2)])
    hps = population.stack([make_hparams(init_scale=1.5), make_hparams()])
    lowered = jax.jit(jax.vmap(partial(init_member, static, n_train=64))).lower(keys, hps)
    platform = jax.devices()[0].platform
    default, once = (lowered.compile(compiler_options(platform, once=o))(keys, hps)
                     for o in (False, True))
    for a, b in zip(jax.tree.leaves(default.params), jax.tree.leaves(once.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("active", [True, False])
def test_large_tensors_updated_in_one_pass_equal_the_optimizer_s_update(active):
    # A tensor of KERNEL_UPDATE_FLOATS or more goes through `kernels.sgd_update` on a CPU where
    # the kernels run (no tensor is that large at an infinite limit: optax's update alone):
    # optax's numbers to float32 rounding; a frozen member's, bit for bit.
    hp = make_hparams(lr=0.1, momentum=0.9, weight_decay=0.01)
    keys = jax.random.split(jax.random.key(0), 6)
    shapes = {"large": (KERNEL_UPDATE_FLOATS // 64, 64), "small": (3, 64)}
    params, grads, trace = ({name: jax.random.normal(k, s) for (name, s), k in
                             zip(shapes.items(), pair)} for pair in (keys[:2], keys[2:4], keys[4:]))
    optimizer = make_optimizer(hp)
    state = optax.tree_utils.tree_set(optimizer.init(params), trace=trace)

    @jax.jit
    def step(params, state):
        rate = state.hyperparams["learning_rate"]
        return tuple(sgd_step(optimizer, grads, params, state, jnp.asarray(active), rate, floats)
                     for floats in (float("inf"), KERNEL_UPDATE_FLOATS))

    (by_optax, optax_state), (ours, our_state) = step(params, state)
    lowered = step.lower(params, state).as_text()
    assert ("uspsjax_sgd_update" in lowered) == kernels.built()
    trace_optax, trace_ours = (optax.tree_utils.tree_get(s, "trace")
                               for s in (optax_state, our_state))
    np.testing.assert_array_equal(ours["small"], by_optax["small"])
    np.testing.assert_array_equal(trace_ours["small"], trace_optax["small"])
    if not active:
        np.testing.assert_array_equal(ours["large"], params["large"])
        np.testing.assert_array_equal(trace_ours["large"], trace["large"])
    np.testing.assert_allclose(ours["large"], by_optax["large"], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(trace_ours["large"], trace_optax["large"], rtol=2e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(by_optax["large"] - params["large"]))) > 0.01 or not active
