"""Tests for uspsjax.attacks against a small MLP trained here on the real USPS data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uspsjax.attacks import fgsm, pgd, project

EPSILONS = (0.05, 0.1, 0.3)
PGD_STEPS = 20
N_ATTACK = 500


def _logits(params, x):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _summed_xent(params, x, y):
    # Summed, not mean, so each sample's input gradient is its own gradient.
    logp = jax.nn.log_softmax(_logits(params, x))
    return -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))


def _train(xtr, ytr, steps=300, lr=1e-2):
    """Full-batch Adam on a 256-64-10 MLP: a couple of seconds on CPU, ~93 % test accuracy."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {
        "w1": jax.random.normal(k1, (256, 64)) * (2.0 / 256) ** 0.5,
        "b1": jnp.zeros(64),
        "w2": jax.random.normal(k2, (64, 10)) * (1.0 / 64) ** 0.5,
        "b2": jnp.zeros(10),
    }
    zeros = jax.tree.map(jnp.zeros_like, params)
    b1, b2, n = 0.9, 0.999, xtr.shape[0]

    def step(carry, t):
        p, m, v = carry
        g = jax.grad(lambda q: _summed_xent(q, xtr, ytr) / n)(p)
        m = jax.tree.map(lambda a, b: b1 * a + (1 - b1) * b, m, g)
        v = jax.tree.map(lambda a, b: b2 * a + (1 - b2) * b * b, v, g)
        mh, vh = 1 - b1 ** (t + 1.0), 1 - b2 ** (t + 1.0)
        p = jax.tree.map(lambda a, mm, vv: a - lr * (mm / mh) / (jnp.sqrt(vv / vh) + 1e-8), p, m, v)
        return (p, m, v), None

    (params, _, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, zeros, zeros), jnp.arange(steps)))(params)
    return params


@pytest.fixture(scope="module")
def setup(dataset):
    xtr, ytr, xte, yte = dataset[:4]
    params = _train(jnp.asarray(xtr, jnp.float32), jnp.asarray(ytr, jnp.int32))
    x, y = jnp.asarray(xte[:N_ATTACK], jnp.float32), jnp.asarray(yte[:N_ATTACK], jnp.int32)

    def loss_fn(xx):
        return _summed_xent(params, xx, y)

    def accuracy(xx):
        return float(jnp.mean(jnp.argmax(_logits(params, xx), axis=1) == y))

    full_acc = float(jnp.mean(jnp.argmax(_logits(params, jnp.asarray(xte)), axis=1) == jnp.asarray(yte)))
    key = jax.random.PRNGKey(1)
    # eps is traced, so each attack compiles once and serves every eps.
    attacks = {
        "fgsm": jax.jit(lambda e: fgsm(loss_fn, x, e)),
        "fgsm_rs": jax.jit(lambda e: fgsm(loss_fn, x, e, key=key, random_start=True)),
        "pgd": jax.jit(lambda e: pgd(loss_fn, x, e, steps=PGD_STEPS, step_size=2.5 * e / PGD_STEPS, key=key)),
        "pgd_x0": jax.jit(
            lambda e: pgd(loss_fn, x, e, steps=PGD_STEPS, step_size=2.5 * e / PGD_STEPS, random_start=False)
        ),
    }
    adv = {(name, e): atk(jnp.float32(e)) for name, atk in attacks.items() for e in EPSILONS}
    acc = {k: accuracy(v) for k, v in adv.items()}
    print(f"\nclean acc: full test {full_acc:.4f}, attack subset {accuracy(x):.4f}")
    for e in EPSILONS:
        print(f"eps={e}: " + ", ".join(f"{n} {acc[(n, e)]:.4f}" for n in attacks))
    return dict(loss_fn=loss_fn, x=x, accuracy=accuracy, full_acc=full_acc, adv=adv, acc=acc, key=key)


def test_model_is_good(setup):
    assert setup["full_acc"] > 0.85
    assert setup["accuracy"](setup["x"]) > 0.85


@pytest.mark.parametrize("name", ["fgsm", "fgsm_rs", "pgd", "pgd_x0"])
@pytest.mark.parametrize("eps", EPSILONS)
def test_stays_in_ball_and_box(setup, name, eps):
    x_adv, x = setup["adv"][(name, eps)], setup["x"]
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
    assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
    # The attack actually moves pixels: not a degenerate no-op.
    assert float(jnp.max(jnp.abs(x_adv - x))) > 0.5 * eps


def test_fgsm_reduces_accuracy(setup):
    clean = setup["accuracy"](setup["x"])
    assert setup["acc"][("fgsm", 0.1)] < clean - 0.05
    assert setup["acc"][("fgsm_rs", 0.1)] < clean - 0.05


@pytest.mark.parametrize("eps", EPSILONS)
def test_pgd_not_weaker_than_fgsm(setup, eps):
    # Fixed keys make this deterministic; no slack is needed since PGD-20 is far stronger here.
    acc = setup["acc"]
    assert acc[("pgd", eps)] <= acc[("fgsm", eps)]
    assert acc[("pgd", eps)] <= acc[("fgsm_rs", eps)]
    assert acc[("pgd_x0", eps)] <= acc[("fgsm", eps)]


def test_accuracy_falls_with_eps(setup):
    acc = setup["acc"]
    for name in ("fgsm", "pgd"):
        assert acc[(name, 0.05)] >= acc[(name, 0.1)] >= acc[(name, 0.3)]


def test_vmap_over_eps_matches_single_calls(setup):
    loss_fn, x, key = setup["loss_fn"], setup["x"], setup["key"]
    epss = jnp.array([0.05, 0.1])
    single = {
        "fgsm": lambda e: fgsm(loss_fn, x, e),
        "fgsm_rs": lambda e: fgsm(loss_fn, x, e, key=key, random_start=True),
        "pgd": lambda e: pgd(loss_fn, x, e, steps=3, step_size=e / 2, key=key),
    }
    for name, f in single.items():
        batched = jax.vmap(f)(epss)
        assert batched.shape == (2,) + x.shape
        for i, e in enumerate(epss):
            np.testing.assert_allclose(batched[i], f(e), atol=1e-6, err_msg=name)


def test_eps_zero_leaves_x_unchanged(setup):
    loss_fn, x, key = setup["loss_fn"], setup["x"], setup["key"]
    for x_adv in (
        fgsm(loss_fn, x, 0.0),
        fgsm(loss_fn, x, 0.0, key=key, random_start=True),
        pgd(loss_fn, x, 0.0, steps=2, step_size=0.01, key=key),
    ):
        np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x))


def test_gradient_is_stopped(setup):
    loss_fn, x = setup["loss_fn"], setup["x"]
    g = jax.grad(lambda xx: jnp.sum(fgsm(loss_fn, xx, 0.1)))(x)
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_random_start_needs_key(setup):
    with pytest.raises(ValueError, match="key"):
        fgsm(setup["loss_fn"], setup["x"], 0.1, random_start=True)
    with pytest.raises(ValueError, match="key"):
        pgd(setup["loss_fn"], setup["x"], 0.1, steps=1, step_size=0.01)


def test_project():
    x = jnp.array([0.0, 0.5, 1.0, 0.95])
    out = project(jnp.array([-1.0, 0.9, 2.0, 0.0]), x, 0.1)
    np.testing.assert_allclose(out, [0.0, 0.6, 1.0, 0.85], atol=1e-7)
