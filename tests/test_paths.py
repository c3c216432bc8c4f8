"""Every path the README claims runs here, small: adversarial training and robust evaluation,
`--merge`, `--dtype bfloat16`, `sweep all --resume`, `--devices N` and batch norm after the
activation."""

import os
import subprocess
import sys
import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from conftest import assert_curves_match, initial_params
from uspsjax import population, results, sweep
from uspsjax.train import (Data, Static, forward, init_members, make_hparams, train_members,
                           train_step)


def write_sweep(folder, name, networks=("fc",), axes="", seeds=1):
    """A tiny sweep file: one epoch, batch 64, SGD with momentum."""
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""
        name = "{name}"
        networks = {list(networks)!r}
        seeds = {seeds}
        [base]
        epochs = 1
        batch_size = 64
        lr = 0.02
        momentum = 0.9
        """) + axes)
    return path


def run_cli(capsys, *argv):
    """`python -m uspsjax.sweep ARGV` in this process: (exit status, stdout, stderr)."""
    code = sweep.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- adversarial training and robust evaluation -------------------------------------------

def test_adversarial_training_gains_robust_accuracy(dataset):
    # 2048 images, 2 epochs, 256 attacked: under PGD-20 at eps 0.2 standard FCs keep 3-5 %,
    # FCs trained with FGSM (random start) or PGD-7 at eps 0.2 keep 27-36 %; under FGSM 10-21 %
    # against 37-43 % (measured, seeds 0-2).
    data = Data(*(jnp.asarray(a) for a in (dataset.x_train[:2048], dataset.y_train[:2048],
                                           dataset.x_test[:256], dataset.y_test[:256])))
    evaluation = population.Evaluation(attack_eps=(0.2,), attack_samples=256)
    keys = jnp.stack([population.member_key(s) for s in range(2)])
    hps = population.stack([make_hparams(lr=0.05, momentum=0.9, adv_eps=0.2)] * 2)
    robust = {}
    for adversarial in ("none", "fgsm", "pgd"):
        static = Static(network="fc", epochs=2, batch_size=32, adversarial=adversarial)
        res = population.run_group(static, keys, hps, data, evaluation=evaluation)
        assert np.all(np.isfinite(res.curves)) and not res.diverged.any()
        robust[adversarial] = res.robust[:, :, 0]  # (member, attack): FGSM, PGD-20
    for i in range(2):  # per seed: PGD-20 is at least as strong as FGSM here ...
        assert all(robust[a][i, 1] <= robust[a][i, 0] + 0.02 for a in robust), robust
        for adversarial in ("fgsm", "pgd"):  # ... and adversarial training resists both
            assert robust[adversarial][i, 0] > robust["none"][i, 0] + 0.1, robust
            assert robust[adversarial][i, 1] > robust["none"][i, 1] + 0.15, robust


def attacked_update(static, small, **hparams):
    """One training step of `static` at adversarial eps 0 and 0.1 from the same state, one
    compiled program: asserts both steps ran and report the same (clean) loss; returns how far
    each parameter's update moved between them."""
    batch = static.batch_size
    x, y, key = small.x_train[:batch], small.y_train[:batch], jax.random.key(1)
    hps = [make_hparams(lr=0.05, adv_eps=e, **hparams) for e in (0.0, 0.1)]
    state = init_members(static, jax.random.key(0), hps[0], 512)
    step = jax.jit(partial(train_step, static))
    (a, loss_a, _, ok_a), (b, loss_b, _, ok_b) = (step(state, hp, x, y, key) for hp in hps)
    assert ok_a and ok_b and float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
    return [float(jnp.max(jnp.abs(p - q))) for p, q in
            zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))]


def test_pgd_training_reaches_the_cnn_update(small):
    # One PGD-7 step of the real CNN: at eps 0 the attacked batch is the clean one; at eps 0.1
    # the attacked half of the objective changes the update, while the reported loss stays the
    # clean one.
    diff = attacked_update(Static(network="cnn", batch_size=32, dropout_at="both",
                                  adversarial="pgd"), small, dropout_conv=0.25, dropout_dense=0.5)
    assert max(diff) > 1e-4 and all(np.isfinite(diff))


def test_fgsm_training_reaches_the_lc_update(small):
    # The attack's gradients run through the LC's C kernels on a CPU, which have no derivatives
    # of their own: the attack is evaluated, never differentiated, and still moves the update.
    diff = attacked_update(Static(network="lc", batch_size=16, adversarial="fgsm"), small)
    assert max(diff) > 1e-6 and all(np.isfinite(diff))


# --- --merge through the command line -----------------------------------------------------

def test_merge_keeps_the_first_run_byte_for_byte(tmp_path, capsys, subset_h5):
    path = write_sweep(tmp_path, "pair", networks=("fc", "cnn"))
    common = ["--data", subset_h5, "--out", tmp_path / "out", "--checkpoints", tmp_path / "ck",
              "--quiet"]
    code, _, err = run_cli(capsys, path, "--networks", "fc", *common)
    assert code == 0, err
    first = results.read_metrics(tmp_path / "out" / "pair" / "metrics.h5")
    code, _, err = run_cli(capsys, path, "--networks", "cnn", "--merge", *common)
    assert code == 0, err
    merged = results.read_metrics(tmp_path / "out" / "pair" / "metrics.h5")
    nets = [s["network"] for s in merged.settings]
    assert sorted(nets) == ["cnn", "fc"]
    fc = [i for i, n in enumerate(nets) if n == "fc"]
    for key in ("curves", "test_probs", "diverged"):
        assert getattr(merged, key)[fc].tobytes() == getattr(first, key).tobytes(), key
    cnn = nets.index("cnn")
    assert np.all(np.isfinite(merged.curves[cnn]))


# --- --dtype bfloat16 ---------------------------------------------------------------------

def matmul_operand_dtypes(jaxpr) -> set:
    """The operand dtypes of every matrix product and convolution in `jaxpr`, sub-programs
    (custom gradients, platform branches, loops) included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found |= {str(v.aval.dtype) for v in eqn.invars}
        for sub in jaxprs_in_params(eqn.params):
            found |= matmul_operand_dtypes(sub)
    return found


@pytest.mark.parametrize("network", ["fc", "cnn", "lc"])
def test_bfloat16_computes_in_bfloat16(small, network):
    x, hp = small.x_test[:64], make_hparams()
    params, stats = initial_params(Static(network=network), jax.random.key(0))
    logits, dtypes = {}, {}
    for dtype in ("float32", "bfloat16"):
        static = Static(network=network, dtype=dtype)
        fn = lambda p, xx, static=static: forward(static, p, stats, xx, hp, train=False)[0]
        dtypes[dtype] = matmul_operand_dtypes(jax.make_jaxpr(fn)(params, x).jaxpr)
        logits[dtype] = np.asarray(jax.jit(fn)(params, x), np.float32)
    assert dtypes == {"float32": {"float32"}, "bfloat16": {"bfloat16"}}
    # The same parameters give logits apart by bfloat16's rounding (8 mantissa bits), no more.
    gap = np.max(np.abs(logits["bfloat16"] - logits["float32"]))
    assert 1e-4 < gap / np.max(np.abs(logits["float32"])) < 5e-2


def test_bfloat16_training_step_computes_in_bfloat16(small):
    static = Static(network="fc", dtype="bfloat16", batch_size=16)
    hp = make_hparams(lr=0.01)
    state = init_members(static, jax.random.key(0), hp, 512)
    step = partial(train_step, static)
    args = (state, hp, small.x_train[:16], small.y_train[:16], jax.random.key(1))
    assert matmul_operand_dtypes(jax.make_jaxpr(step)(*args).jaxpr) == {"bfloat16"}
    new, loss, _, healthy = jax.jit(step)(*args)
    assert healthy and loss.dtype == jnp.float32
    # Parameters stay float32 and are updated.
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))
    assert not np.array_equal(new.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])


# --- sweep all --resume -------------------------------------------------------------------

def test_all_resume_skips_finished_sweeps(tmp_path, capsys, monkeypatch, subset_h5):
    first, second = write_sweep(tmp_path, "first"), write_sweep(tmp_path, "second")
    monkeypatch.setattr(sweep, "STUDY_ORDER", [str(first), str(second)])
    common = ["--data", subset_h5, "--out", tmp_path / "out", "--checkpoints", tmp_path / "ck"]
    code, _, err = run_cli(capsys, first, *common)
    assert code == 0, err
    done = tmp_path / "out" / "first"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in done.iterdir()}
    code, out, err = run_cli(capsys, "all", "--resume", *common)
    assert code == 0, err
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and skipped[0].startswith("sweep first:"), err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in done.iterdir()} == before
    assert (tmp_path / "out" / "second" / "metrics.h5").is_file()


# --- --devices N --------------------------------------------------------------------------

# The command line run twice, `--devices 1` then `--devices 2`, with `population.run_group`
# wrapped to report how each epoch's parameters were laid out over the devices (the
# `members_per_device` it passes to its progress callback).
DEVICES_CLI = textwrap.dedent("""
    import sys
    from uspsjax import population, sweep
    run_group = population.run_group

    def recording(*args, on_epoch=None, **kwargs):
        def record(info):
            print("LAYOUT", n, info["members_per_device"])
            on_epoch(info)
        return run_group(*args, on_epoch=record, **kwargs)

    population.run_group = recording
    population.cpu_lane_limit = lambda: 1  # one chunk at a time: the layout is the devices' alone
    for n in (1, 2):
        argv = sys.argv[1:] + ["--devices", n, "--out", f"out{n}", "--checkpoints", f"ck{n}"]
        assert sweep.main([str(a) for a in argv]) == 0
""")


def test_devices_shards_the_members_over_n_devices(tmp_path, subset_h5):
    path = write_sweep(tmp_path, "sharded", seeds=3, axes="[axes]\nlr = [0.02, 0.005]\n")
    script = tmp_path / "cli.py"
    script.write_text(DEVICES_CLI)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, str(script), str(path), "--data", str(subset_h5),
                           "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    # 6 members in one static group, one epoch: all on one device, or 3 on each of two.
    layouts = [line for line in proc.stdout.splitlines() if line.startswith("LAYOUT")]
    assert layouts == ["LAYOUT 1 [6]", "LAYOUT 2 [3, 3]"]
    one, two = (results.read_metrics(tmp_path / f"out{n}" / "sharded" / "metrics.h5")
                for n in (1, 2))
    assert_curves_match(two.curves, one.curves, 256)
    np.testing.assert_allclose(two.test_probs, one.test_probs, rtol=0, atol=2e-3)


# --- batch norm after the activation ------------------------------------------------------

@pytest.mark.parametrize("network", ["fc", "cnn"])
def test_batchnorm_after_the_activation_trains(small, network):
    static = Static(network=network, batchnorm="after", bn_momentum=0.9, epochs=2,
                    batch_size=32)
    hp, key = make_hparams(lr=0.05, momentum=0.9), jax.random.key(0)
    start = init_members(static, key, hp, small.x_train.shape[0])
    state, curves = train_members(static, small, key, hp)
    curves = np.asarray(curves)
    assert np.all(np.isfinite(curves)) and int(state.diverged) == 0
    assert curves[1, 0] < curves[0, 0] < np.log(10)  # train loss falls from chance
    assert curves[-1, 3] > 0.6
    for layer, stats in state.batch_stats.items():
        init = start.batch_stats[layer]
        assert not np.allclose(stats["mean"], init["mean"]), layer
        assert not np.allclose(stats["var"], init["var"]), layer
        # After the ReLU, every running mean averages non-negative activations.
        assert np.all(np.asarray(stats["mean"]) >= 0) and np.any(np.asarray(stats["mean"]) > 0)
