"""Shared pytest fixtures, and the suite's one statement of the engine's numeric guarantee."""

import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest

# Across population sizes, chunks and devices the engine guarantees results equal up to the
# float32 rounding of a differently blocked computation (README, "Numbers"): XLA may split a
# batched product differently for another member count or another CPU, which moves a short
# training run's losses by ~1e-7 relative (3.6e-7 at most, measured). These tolerances leave
# fifty times that margin, while a real coupling between members (a shared update, a wrong
# slice, a divergent neighbour leaking NaN) moves them by far more or turns them NaN. An
# accuracy may move by one sample: a test image whose two largest logits tie to rounding.
LOSS_RTOL, LOSS_ATOL = 2e-5, 2e-6
PARAM_RTOL, PARAM_ATOL = 1e-4, 2e-5


def assert_curves_match(a, b, n_test: int) -> None:
    """Curves `(..., epochs, 4)` (train loss, train acc, test loss, test acc) equal up to the
    engine's float32-rounding guarantee: losses to `LOSS_RTOL`/`LOSS_ATOL`, accuracies to one
    test sample out of `n_test`; NaN where the other is NaN."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a[..., 0::2], b[..., 0::2], rtol=LOSS_RTOL, atol=LOSS_ATOL)
    np.testing.assert_allclose(a[..., 1::2], b[..., 1::2], rtol=0, atol=1.01 / n_test)


def assert_params_match(a, b) -> None:
    """Two parameter pytrees equal up to the engine's float32-rounding guarantee."""
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=PARAM_RTOL, atol=PARAM_ATOL)


def initial_params(static, key, init_scale=1.0):
    """`init_params(static, key, init_scale)` computed as the engine computes a member's
    initialization (one program, compiled once: `train.init_members`), not op by op, which
    compiles each random draw at full optimization."""
    from uspsjax.train import init_members, make_hparams
    state = init_members(static, key, make_hparams(init_scale=init_scale), 1)
    return state.params, state.batch_stats


@cache
def _forward_program():
    import jax
    from uspsjax import train
    return jax.jit(train.forward, static_argnums=0, static_argnames="train")


def compiled_forward(static, params, batch_stats, x, hp, *, train, key=None):
    """`train.forward` as one compiled program with its arrays passed in (one jitted function
    for the suite, so a setting traces once): not op by op (each operation compiled alone) nor
    jitted with the parameters closed over (compiled in as constants: the LC net's 133 MB take
    seconds)."""
    return _forward_program()(static, params, batch_stats, x, hp, train=train, key=key)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the whole suite (every pytest-xdist worker,
    and the processes they start, through the environment): many tests compile the same small
    programs, and a cached executable is the same program, so nothing asserted changes. An
    entry another process is still writing reads as damaged, which JAX answers by compiling
    again."""
    import jax
    base = tmp_path_factory.getbasetemp()
    # Each xdist worker has a base folder of its own inside the run's: share the run's.
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla-cache"
    folder.mkdir(exist_ok=True)
    folder = str(folder)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    yield
    for var in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        os.environ.pop(var, None)


@pytest.fixture(scope="session")
def shared_h5() -> Path:
    """The shared USPS copy: $USPSJAX_DATA if set, else ../shared/data/usps.h5 next to the repo."""
    env = os.environ.get("USPSJAX_DATA")
    path = Path(env) if env else Path(__file__).parents[2] / "shared/data/usps.h5"
    if not path.is_file():
        pytest.fail(f"shared USPS file not found: {path}")
    return path


@pytest.fixture(scope="session")
def dataset(shared_h5):
    """The real USPS data, loaded once."""
    from uspsjax.data import load
    return load(str(shared_h5))


@pytest.fixture(scope="session")
def small(dataset):
    """A small real subset (512 train, 256 test) as device arrays, for fast training tests."""
    from uspsjax.train import Data
    import jax.numpy as jnp
    return Data(jnp.asarray(dataset.x_train[:512]), jnp.asarray(dataset.y_train[:512]),
                jnp.asarray(dataset.x_test[:256]), jnp.asarray(dataset.y_test[:256]))


@pytest.fixture(scope="session")
def subset_h5(dataset, tmp_path_factory):
    """A small USPS file (1024 training, 256 test images) for fast command-line runs."""
    import h5py
    path = tmp_path_factory.mktemp("data") / "usps-small.h5"
    with h5py.File(path, "w") as f:
        f["train/data"], f["train/target"] = dataset.x_train[:1024], dataset.y_train[:1024]
        f["test/data"], f["test/target"] = dataset.x_test[:256], dataset.y_test[:256]
    return path
