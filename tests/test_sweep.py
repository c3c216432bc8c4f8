"""Sweep files: validation of bad files, grid expansion and static grouping."""

import pytest

from uspsjax import grid, sweep
from uspsjax.errors import InputError
from uspsjax.train import Static

GOOD = """
name = "t"
networks = ["fc", "cnn"]
seeds = 2
[base]
epochs = 1
batch_size = 64
[axes]
lr = [0.01, 0.1]
"""


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, fragment", [
    ("name = 't'\nbogus = 1", "unknown key 'bogus'"),
    ("name = 't'\nnetworks = ['rnn']", "unknown network 'rnn'"),
    ("name = 't'\nnetworks = []", "networks must be a non-empty list"),
    ("name = 't'\n[base]\ninit = 'glorot'", "unknown initializer 'glorot'"),
    ("name = 't'\n[base]\nlr = -0.1", "lr = -0.1 is impossible"),
    ("name = 't'\n[base]\nlr = 'fast'", "lr must be a number"),
    ("name = 't'\n[base]\nmomentum = 1.0", "momentum = 1.0 is impossible"),
    ("name = 't'\n[base]\nbatch_size = 0", "batch_size = 0 is impossible"),
    ("name = 't'\n[base]\nbatch_size = 99999", "batch_size = 99999 is impossible"),
    ("name = 't'\n[base]\nbatch_size = 16.5", "batch_size must be an integer"),
    ("name = 't'\n[base]\nmicrobatch = -1", "microbatch = -1 is impossible"),
    ("name = 't'\n[base]\nepochs = true", "epochs must be an integer"),
    ("name = 't'\n[base]\nbatchnorm = 'sideways'", "batchnorm must be one of"),
    ("name = 't'\n[base]\nwarmup = 3", "unknown setting 'warmup'"),
    ("name = 't'\n[axes]\nlr = []", "an axis must be a non-empty list"),
    ("name = 't'\n[axes]\nlr = 0.1", "an axis must be a non-empty list"),
    ("name = 't'\n[axes]\nlr = [0.1, -1]", "lr = -1 is impossible"),
    ("name = 't'\nseeds = 0", "seeds must be a positive integer"),
    ("name = 't'\n[base\n", "not valid TOML"),
    ("networks = ['fc']", "name must be a non-empty string"),
    ("name = 't'\n[evaluation]\nattack_eps = [2.0]", "attack_eps must be a list of numbers"),
    ("name = 't'\n[cpu.lc]\nseeds = 0", "cpu.lc.seeds must be a positive integer"),
])
def test_bad_sweep_files_name_file_key_and_problem(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        grid.load_sweep(str(path))
    message = str(err.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_impossible_placement_in_base_is_an_error(tmp_path):
    path = write(tmp_path, "name = 't'\nnetworks = ['fc']\n[base]\ndropout_at = 'conv'")
    with pytest.raises(InputError, match="impossible for fc"):
        grid.expand(grid.load_sweep(str(path)))


@pytest.mark.parametrize("base", ["batch_size = 32\nmicrobatch = 12",
                                  "batch_size = 32\nmicrobatch = 8\nbatchnorm = 'after'",
                                  "batch_size = 32\nmicrobatch = 8\nadversarial = 'fgsm'"])
def test_a_microbatch_that_would_change_the_numbers_is_an_error(tmp_path, base):
    path = write(tmp_path, f"name = 't'\nnetworks = ['cnn']\n[base]\n{base}")
    with pytest.raises(InputError, match="microbatch = .* must divide batch_size = 32, without"):
        grid.expand(grid.load_sweep(str(path)))


def test_unknown_sweep_name():
    with pytest.raises(InputError, match="no such sweep"):
        grid.load_sweep("nonesuch")


def test_shipped_sweeps_are_valid_and_have_the_study_values():
    for name in grid.list_sweeps():
        assert grid.expand(grid.load_sweep(name))
    assert grid.load_sweep("lr").axes["lr"] == [1e-6, 1e-3, 50.0]
    assert grid.load_sweep("init").axes["init"] == ["constant(1e5)", "glorot_uniform",
                                                      "constant(0.01)"]
    assert grid.load_sweep("batch").axes["batch_size"] == [16, 32, 1024]
    momentum = grid.load_sweep("momentum")
    assert momentum.axes["momentum"] == [0.5, 0.9, 0.99]
    assert (momentum.base["init"], momentum.base["lr"], momentum.base["batch_size"]) == (
        "glorot_uniform", 1e-3, 16)
    # Every reported result has error bars over >= 3 seeds; the recipe search (`beyond`)
    # ranks 12 candidates on validation with 2 seeds each, and its pick is retrained with 3.
    assert all(grid.load_sweep(n).seeds >= 3 for n in grid.list_sweeps() if n != "beyond")
    assert grid.load_sweep("beyond").seeds == 2 and grid.load_sweep("beyond-final").seeds == 3


def test_expansion_and_grouping(tmp_path):
    sw = grid.load_sweep(str(write(tmp_path, GOOD)))
    members = grid.expand(sw)
    assert len(members) == 2 * 2 * 2  # networks x lr x seeds
    groups = grid.group_members(members)
    assert len(groups) == 2  # lr is dynamic: one program per network
    assert {s.network for s in groups} == {"fc", "cnn"}
    cnn = next(m for m in members if m.network == "cnn")
    assert cnn.static.dropout_at == "both" and cnn.hparams["dropout_dense"] == 0.5
    over = grid.expand(sw, {"epochs": 3, "seeds": 1, "networks": ["fc"]})
    assert len(over) == 2 and all(m.static.epochs == 3 for m in over)


def test_init_splits_into_static_family_and_dynamic_scale():
    members = grid.expand(grid.load_sweep("init"), {"networks": ["fc"], "seeds": 1})
    assert [(m.static.init, m.hparams["init_scale"]) for m in members] == [
        ("constant", 1e5), ("glorot_uniform", 1.0), ("constant", 0.01)]
    assert len(grid.group_members(members)) == 2


def test_static_axes_make_groups_and_cpu_limits_apply():
    batch = grid.load_sweep("batch")
    assert len(grid.group_members(grid.expand(batch))) == 9
    cpu = grid.expand(batch, on_cpu=True)
    lc = [m for m in cpu if m.network == "lc"]
    assert len(lc) == 3 and all(m.static.epochs == 1 for m in lc)
    assert all(m.static.epochs == 20 for m in cpu if m.network != "lc")
    assert all(m.static.epochs == 20 for m in grid.expand(batch, on_cpu=False))
    forced = grid.expand(batch, {"epochs": 2}, on_cpu=True)
    assert all(m.static.epochs == 2 for m in forced)


def test_cpu_table_may_shrink_one_networks_ensembles():
    final = grid.load_sweep("beyond-final")
    sizes = {net: [sum(m.network == net and m.seed == s for m in members) for s in range(3)]
             for members in [grid.expand(final, on_cpu=True)] for net in ("cnn", "fc", "lc")}
    assert sizes == {"cnn": [16] * 3, "fc": [16] * 3, "lc": [1] * 3}
    full = grid.expand(final, on_cpu=False)
    assert sum(m.network == "lc" for m in full) == 48
    assert {m.bag for m in full} == set(range(1, 17))


def test_placement_axis_skips_networks_without_those_layers():
    members = grid.expand(grid.load_sweep("dropout"), {"seeds": 1})
    fc = {m.static.dropout_at for m in members if m.network == "fc"}
    cnn = {m.static.dropout_at for m in members if m.network == "cnn"}
    assert fc == {"dense"} and cnn == {"dense", "conv", "both"}


def test_describe_group():
    assert grid.describe_group(Static(network="cnn", batch_size=1024)) == "cnn batch_size=1024"


def test_merge_checks_the_kept_members_against_the_sweep(tmp_path):
    from pathlib import Path
    from uspsjax import results
    committed = Path(__file__).resolve().parents[1] / "results" / "baseline" / "metrics.h5"
    old = results.read_metrics(committed)
    sw = grid.load_sweep("baseline")
    sweep.check_mergeable(sw, old, ["cnn"])  # FC and LC were trained as baseline.toml says
    changed = tmp_path / "baseline.toml"
    changed.write_text(sw.text.replace("lr = 0.01", "lr = 0.02"))
    with pytest.raises(InputError, match="not trained with this sweep's settings"):
        sweep.check_mergeable(grid.load_sweep(str(changed)), old, ["cnn"])
