"""Sweeps split into shards (`--shard I/N`) and gathered (`--gather`): the same result as an
unsharded run, and one-line refusals of a missing, duplicated or foreign shard."""

import shutil
from dataclasses import replace

import numpy as np
import pytest

from conftest import assert_curves_match
from uspsjax import results, shards, sweep

# Three static groups of one member each: every shard runs each member's own program, so a
# gathered result is bit-identical to the unsharded run.
ALONE = """
name = "split"
networks = ["fc"]
seeds = 1
[base]
epochs = 2
lr = 0.02
momentum = 0.9
[axes]
batch_size = [32, 64, 128]
"""


def cli(capsys, *args) -> tuple[int, str]:
    code = sweep.main([str(a) for a in args])
    return code, capsys.readouterr().err


def common(folder, data):
    return ["--data", data, "--out", folder / "out", "--checkpoints", folder / "ck", "--quiet"]


def one_error(err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


def read(folder, name="split"):
    return results.read_metrics(folder / name / "metrics.h5")


@pytest.fixture(scope="module")
def split(tmp_path_factory, subset_h5):
    """The sweep run whole (in `whole/`) and as 2 shards (under `out/`)."""
    tmp = tmp_path_factory.mktemp("split")
    path = tmp / "split.toml"
    path.write_text(ALONE)
    base = ["--data", subset_h5, "--checkpoints", tmp / "ck", "--quiet"]
    assert sweep.main([str(a) for a in (path, "--out", tmp / "whole", *base)]) == 0
    for i in range(2):
        assert sweep.main([str(a) for a in (path, "--shard", f"{i}/2", "--out", tmp / "out",
                                            *base)]) == 0
    return tmp


def test_shards_are_an_equal_share_of_every_group():
    owner = shards.assign([[0, 1, 2, 3, 4], [5, 6, 7], [8]], 3)
    assert owner == {0: 0, 1: 1, 2: 2, 3: 0, 4: 1, 5: 2, 6: 0, 7: 1, 8: 2}
    assert shards.assign([[0, 1, 2, 3, 4], [5, 6, 7], [8]], 3) == owner  # fixed
    counts = np.bincount(list(shards.assign([list(range(15))], 8).values()))
    assert counts.max() - counts.min() <= 1 and counts.sum() == 15


def test_gathered_shards_equal_the_unsharded_run(split, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(split / "out", out)
    shards_dir = out / "split.shards"
    assert sorted(p.name for p in shards_dir.iterdir() if not p.name.startswith(".")) == [
        "0-of-2", "1-of-2"]
    assert [len(read(shards_dir, f"{i}-of-2").settings) for i in range(2)] == [2, 1]
    code, err = cli(capsys, split / "split.toml", "--gather", "--out", out, "--quiet")
    assert code == 0, err
    whole, gathered = read(split / "whole"), read(out)
    for key in ("curves", "test_probs", "diverged", "y_test"):
        np.testing.assert_array_equal(getattr(gathered, key), getattr(whole, key), err_msg=key)
    assert gathered.settings == whole.settings
    assert [(g["label"], g["members"]) for g in gathered.groups] == [
        (g["label"], g["members"]) for g in whole.groups]
    assert gathered.shards["count"] == 2 and whole.shards is None
    # The summary differs only in its provenance: the device line and the shards it came from.
    def body(folder):
        return [line for line in (folder / "split" / "summary.md").read_text().splitlines()
                if not line.startswith(("Device:", "Gathered from"))]
    assert body(out) == body(split / "whole")


def test_vmapped_members_split_into_shards_agree_to_float32_rounding(tmp_path, capsys,
                                                                    subset_h5):
    path = tmp_path / "pop.toml"
    path.write_text(ALONE.replace('name = "split"', 'name = "pop"')
                    .replace("seeds = 1", "seeds = 4").replace("[axes]\nbatch_size = [32, 64, "
                                                               "128]\n", ""))
    code, err = cli(capsys, path, *common(tmp_path, subset_h5), "--out", tmp_path / "whole")
    assert code == 0, err
    for i in range(2):
        code, err = cli(capsys, path, "--shard", f"{i}/2", *common(tmp_path, subset_h5))
        assert code == 0, err
    # Shard 1 as if trained from other code on another host: the one group, split between the
    # shards, records both.
    folder = tmp_path / "out" / "pop.shards" / "1-of-2"
    other = read(folder.parent, "1-of-2")
    ours = other.groups[0]["versions"]
    results.write_metrics(folder / "metrics.h5", replace(other, groups=[dict(
        other.groups[0], versions={**ours, "source": "0123456789abcdef", "malloc": "tuned"})]))
    code, err = cli(capsys, path, "--gather", "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    a, b = read(tmp_path / "whole", "pop"), read(tmp_path / "out", "pop")
    assert a.settings == b.settings
    assert_curves_match(a.curves, b.curves, n_test=256)
    assert b.groups[0]["versions"] == {**ours, "source": f"{ours['source']} / 0123456789abcdef",
                                       "malloc": f"{ours['malloc']} / tuned"}


def refuse(capsys, split, tmp_path, change, fragment):
    """Copy the shards, `change(shards_dir)`, gather: one `error:` line, nothing written."""
    out = tmp_path / "out"
    shutil.copytree(split / "out", out)
    change(out / "split.shards")
    code, err = cli(capsys, split / "split.toml", "--gather", "--out", out, "--quiet")
    assert code == 2
    one_error(err, fragment)
    assert not (out / "split").exists()


def test_a_missing_shard_is_refused(split, tmp_path, capsys):
    refuse(capsys, split, tmp_path, lambda d: shutil.rmtree(d / "1-of-2"),
           "missing shard 1-of-2; run python -m uspsjax.sweep split --shard 1/2")


def test_a_duplicated_shard_is_refused(split, tmp_path, capsys):
    def duplicate(d):
        shutil.rmtree(d / "1-of-2")
        shutil.copytree(d / "0-of-2", d / "1-of-2")
    refuse(capsys, split, tmp_path, duplicate, "a duplicated shard")


def test_a_shard_of_another_split_is_refused(split, tmp_path, capsys):
    refuse(capsys, split, tmp_path, lambda d: shutil.copytree(d / "0-of-2", d / "0-of-3"),
           "shards of 2 and 3-way splits")


def test_a_foreign_shard_is_refused(split, tmp_path, capsys, subset_h5):
    # Shard 1 trained again with other epochs: another computation.
    def foreign(d):
        assert sweep.main([str(a) for a in (split / "split.toml", "--shard", "1/2", "--epochs",
                                            "1", *common(tmp_path, subset_h5))]) == 0
    refuse(capsys, split, tmp_path, foreign,
           "a foreign shard: other command-line settings than 0-of-2")


def test_shards_of_another_sweep_text_are_refused(split, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(split / "out", out)
    edited = tmp_path / "split.toml"
    edited.write_text(ALONE.replace("lr = 0.02", "lr = 0.03"))
    code, err = cli(capsys, edited, "--gather", "--out", out, "--quiet")
    assert code == 2
    one_error(err, "the shards ran another text of the sweep file")


@pytest.mark.parametrize("flag, fragment", [
    ("2/2", "expected I/N with 0 <= I < N"), ("a/b", "expected I/N"),
    ("0/4", "the sweep has 3 members, so at most 3 shards")])
def test_an_impossible_shard_is_refused(tmp_path, capsys, subset_h5, flag, fragment):
    path = tmp_path / "split.toml"
    path.write_text(ALONE)
    code, err = cli(capsys, path, "--shard", flag, *common(tmp_path, subset_h5))
    assert code == 2
    one_error(err, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()
