"""The command line: a real sweep end to end, and a run of lower scale kept beside a larger
result. Bad input, refused in one line: tests/test_bad_input.py."""

import h5py
import numpy as np

from uspsjax import grid, results, sweep

TINY = """
name = "tiny"
description = "a tiny lr sweep"
networks = ["fc"]
seeds = 2
[base]
epochs = 2
batch_size = 64
momentum = 0.9
[axes]
lr = [0.01, 50.0]
"""


def run_main(capsys, *argv):
    code = sweep.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sweep_end_to_end(tmp_path, shared_h5, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    out = tmp_path / "results"
    code, stdout, stderr = run_main(capsys, str(path), "--data", str(shared_h5), "--out",
                                    str(out), "--checkpoints", str(tmp_path / "ck"))
    assert code == 0, stderr
    assert "4 members in 1 static groups -> 1 compiled training programs" in stderr
    assert "samples/s" in stderr and "s left" in stderr
    run = results.read_metrics(out / "tiny" / "metrics.h5")
    assert run.curves.shape == (4, 2, 4) and run.programs == 1
    lr = [s["lr"] for s in run.settings]
    assert lr == [0.01, 0.01, 50.0, 50.0]
    healthy = run.curves[:2, -1, 3]
    assert np.all(healthy > 0.85)  # FC at lr 0.01, momentum 0.9 learns within 2 epochs
    assert np.all(run.diverged[2:] >= 1) and np.all(run.diverged[:2] == 0)
    assert "| fc | lr=50.0 | 2 | diverged (2/2) |" in stdout
    assert sorted(p.name for p in (out / "tiny").iterdir()) == [
        "accuracy.png", "loss.png", "metrics.h5", "summary.md"]
    assert not (tmp_path / "ck" / "tiny").exists()  # checkpoints go once results are written
    # --quiet silences progress; overrides reach every member and are recorded.
    code, _, stderr = run_main(capsys, str(path), "--data", str(shared_h5), "--out", str(out),
                               "--checkpoints", str(tmp_path / "ck"), "--epochs", "1", "--quiet",
                               "--dtype", "bfloat16", "--replace")
    assert code == 0 and stderr == ""
    run = results.read_metrics(out / "tiny" / "metrics.h5")
    assert run.overrides == {"epochs": 1, "dtype": "bfloat16"}
    assert [s["dtype"] for s in run.settings] == ["bfloat16"] * 4
    assert np.all(run.curves[:2, -1, 3] > 0.8)


def test_list(capsys):
    code, out, _ = run_main(capsys, "--list")
    assert code == 0 and "lr " in out and "baseline" in out


def small_h5(path, dataset, n_train=256, n_test=128):
    """The first samples of the real data as a USPS file: a fast sweep that still learns."""
    with h5py.File(path, "w") as f:
        for split, x, y, n in (("train", dataset.x_train, dataset.y_train, n_train),
                               ("test", dataset.x_test, dataset.y_test, n_test)):
            f[f"{split}/data"], f[f"{split}/target"] = x[:n], y[:n]
    return path


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


SCALE = 'name = "scale"\nnetworks = ["fc"]\nseeds = 1\n[base]\nepochs = 2\nbatch_size = 32\n'


def test_a_lower_scale_run_goes_beside_a_larger_result(tmp_path, dataset, capsys):
    path = tmp_path / "scale.toml"
    path.write_text(SCALE)
    out, ours, beside = tmp_path / "results", tmp_path / "results" / "scale", \
        tmp_path / "results" / f"scale{sweep.LOWER_SCALE}"
    common = [str(path), "--data", str(small_h5(tmp_path / "small.h5", dataset)), "--out",
              str(out), "--no-checkpoints", "--quiet"]
    assert run_main(capsys, *common)[0] == 0
    larger = snapshot(ours)
    code, _, stderr = run_main(capsys, *common, "--epochs", "1")
    assert code == 0 and snapshot(ours) == larger  # not a byte of the larger result moved
    notice = (f"sweep scale: {ours}/ holds a larger run (fc 1 seeds x 2 epochs, this run 1 x 1); "
              f"writing {beside}/ instead; --replace to overwrite")
    assert stderr.splitlines() == [notice, notice]  # said at the start and at the end
    assert results.read_metrics(beside / "metrics.h5").curves.shape == (1, 1, 4)
    # With --replace the lower-scale run replaces it; a run of higher scale needs no flag.
    for argv, epochs in ((["--epochs", "1", "--replace"], 1), ([], 2)):
        code, _, stderr = run_main(capsys, *common, *argv)
        assert code == 0 and stderr == ""
        assert results.read_metrics(ours / "metrics.h5").curves.shape == (1, epochs, 4)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "scale", f"scale{sweep.LOWER_SCALE}"]


def rows(members):
    return [grid.member_settings(m) for m in members]


def test_scale_compares_epochs_and_seeds_per_network(tmp_path):
    path = tmp_path / "two.toml"
    path.write_text('name = "two"\nnetworks = ["fc", "lc"]\n')
    two = grid.load_sweep(str(path))
    old = [{"network": "fc", "seed": s, "epochs": 20} for s in range(3)] + [
        {"network": "lc", "seed": s, "epochs": 30} for s in range(3)]
    same = rows(grid.expand(two, {"networks": ["fc", "lc"], "epochs": 20, "seeds": 3}))
    assert sweep.run_scale(same) == {"fc": (20, 3), "lc": (20, 3)}
    assert sweep.larger_result(old, same, merge=False) == "lc 3 seeds x 30 epochs, this run 3 x 20"
    fewer_seeds = rows(grid.expand(two, {"networks": ["fc", "lc"], "epochs": 30, "seeds": 2}))
    assert sweep.larger_result(old, fewer_seeds, merge=False).count("this run 2 x 30") == 2
    fc_only = rows(grid.expand(two, {"networks": ["fc"], "epochs": 20, "seeds": 3}))
    assert sweep.larger_result(old, fc_only, merge=False) == "lc 3 seeds x 30 epochs, this run none"
    assert sweep.larger_result(old, fc_only, merge=True) is None  # --merge keeps lc
    bigger = rows(grid.expand(two, {"networks": ["fc", "lc"], "epochs": 30, "seeds": 5}))
    assert sweep.larger_result(old, bigger, merge=False) is None
