"""Adding a network touches `models` only (README, "Extending uspsjax"): one registered there
trains through a sweep, is written, read back and benchmarked with no other change."""

import flax.linen as nn
import jax
import numpy as np

import uspsjax
from uspsjax import bench, models

SWEEP = """
name = "tiny-sweep"
description = "a network added in models only"
networks = ["tiny"]
seeds = 2
[base]
epochs = 2
batch_size = 64
[axes]
lr = [0.01, 0.1]
"""


class Tiny(models.Network):
    """Dense 32 (ReLU) -> Dense 10: 8,554 parameters."""

    dropout_places = ("none", "dense")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, rates=(0.0, 0.0), rows=None) -> jax.Array:
        x = self.activate(nn.Dense(32)(x), train, last=True)
        if self.dropout_at == "dense":
            x = models.dropout(self, x, rates[1], train, rows)
        return nn.Dense(10)(x)


def test_a_network_registered_in_models_trains_through_a_sweep(tmp_path, monkeypatch, subset_h5):
    monkeypatch.setitem(models.NETWORKS, "tiny", Tiny)
    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP)
    run = uspsjax.run(path, data=subset_h5, out=tmp_path / "results", no_checkpoints=True,
                      quiet=True)
    assert [s["network"] for s in run.settings] == ["tiny"] * 4
    assert run.curves.shape == (4, 2, 4) and np.isfinite(run.curves).all()
    # lr 0.1 for 2 epochs on 1024 images learns: well above chance (10 %).
    assert run.curve("test_acc", network="tiny", lr=0.1)[:, -1].min() > 0.5
    assert [r["label"] for r in run.summary()] == ["lr=0.01", "lr=0.1"]
    # The bench counts its FLOPs like any other network's: 3 x 2 x (256*32 + 32*10) and the
    # elementwise work.
    assert 6 * (256 * 32 + 32 * 10) < bench.train_flops_per_sample("tiny") < 6 * 8_554 * 1.01
