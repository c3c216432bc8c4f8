"""L-infinity adversarial attacks (FGSM, PGD) on pixels in [0, 1], as pure JAX functions.

Every function is jit- and vmap-friendly: eps and step_size may be traced scalars, so one compiled
attack can be vmapped over a grid of eps values or over a population of models. Only the flags
(random_start, steps) are static Python values.
"""

import jax
import jax.numpy as jnp

# The attacks a sweep's evaluation measures accuracy under, in the order of the `robust` array's
# attack axis (`population.robust_accuracy`; metrics.h5's `robust` attribute `attacks`): FGSM,
# and PGD with 20 steps.
ATTACKS = ("fgsm", "pgd20")


def project(x_adv, x, eps):
    """Clip x_adv into the L-infinity eps-ball around x, then into the valid pixel range [0, 1]."""
    # Ball first, box second: since x itself lies in [0, 1] the result stays inside both sets.
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def _random_start(key, x, eps):
    # Project the uniform start too, otherwise the first gradient is taken at an invalid image.
    if key is None:
        raise ValueError("random_start=True needs a PRNG key")
    noise = jax.random.uniform(key, x.shape, x.dtype, minval=-1.0, maxval=1.0)
    return project(x + eps * noise, x, eps)


def fgsm(loss_fn, x, eps, *, key=None, random_start=False, step_size=None):
    """Fast gradient sign method on pixels in [0, 1].

    loss_fn(x) -> scalar, the summed loss of the batch, so each sample's gradient is its own.
    Without random_start: one step of size step_size (default eps) from x. With random_start
    (needs key): start from x + U(-eps, eps) and take one step of size step_size (default
    1.25 * eps, Wong et al. 2020, "Fast is better than free"). The result is projected back into
    the eps-ball around x and [0, 1]. Returns x_adv, same shape as x, with its gradient stopped.
    """
    if random_start:
        x0 = _random_start(key, x, eps)
        step = 1.25 * eps if step_size is None else step_size
    else:
        x0 = x
        step = eps if step_size is None else step_size
    grad = jax.grad(loss_fn)(x0)
    return jax.lax.stop_gradient(project(x0 + step * jnp.sign(grad), x, eps))


def pgd(loss_fn, x, eps, *, steps, step_size, key=None, random_start=True):
    """Projected gradient descent, L-infinity (Madry et al. 2018).

    Takes `steps` (a static int) sign-gradient ascent steps of size step_size on loss_fn (the
    summed batch loss, as for fgsm), projecting onto the eps-ball around x and [0, 1] after each
    step. With random_start (needs key) it starts from a uniform point of the ball, else from x.
    Returns x_adv, same shape as x, with its gradient stopped.
    """
    x0 = _random_start(key, x, eps) if random_start else x
    grad_fn = jax.grad(loss_fn)

    def body(_, x_adv):
        return project(x_adv + step_size * jnp.sign(grad_fn(x_adv)), x, eps)

    # fori_loop keeps the compiled graph one step long whatever `steps` is.
    return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, x0))
