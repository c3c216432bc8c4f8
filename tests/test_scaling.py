"""The on-paper scaling estimate: its rate lookup, its sweep times, its command line."""

import dataclasses
import json

import pytest

from uspsjax import scaling
from uspsjax.sweep import expand, group_members, load_sweep

ROWS = [{"network": "fc", "batch_size": b, "population": p, "member_samples_per_s": r}
        for b, p, r in [(16, 1, 100.0), (16, 8, 400.0), (128, 1, 1000.0)]]


def test_member_rate_takes_the_nearest_batch_and_the_largest_population_not_above():
    assert scaling.member_rate(ROWS, "fc", 16, 1) == 100.0
    assert scaling.member_rate(ROWS, "fc", 16, 7) == 100.0
    assert scaling.member_rate(ROWS, "fc", 32, 64) == 400.0    # 32 is nearer 16 than 128
    assert scaling.member_rate(ROWS, "fc", 1024, 3) == 1000.0
    with pytest.raises(scaling.InputError, match="no cnn row"):
        scaling.member_rate(ROWS, "cnn", 16, 1)


def test_sweep_seconds_follow_the_schedule():
    # baseline's FC group: 3 members, all on one device at the 1-member rate (below 8 members);
    # on 8 devices one member each at the same rate.
    [fc] = [s for s in group_members(expand(load_sweep("baseline"))) if s.network == "fc"]
    b = fc.batch_size
    samples = fc.epochs * (scaling.N_TRAIN // b) * b
    rows = ROWS + [{"network": n, "batch_size": b, "population": 1,
                    "member_samples_per_s": 1e300} for n in ("lc", "cnn")]
    rate = scaling.member_rate(ROWS, "fc", b, 1)
    assert scaling.sweep_seconds("baseline", rows, "gpu", 1) == pytest.approx(3 * samples / rate)
    assert scaling.sweep_seconds("baseline", rows, "gpu", 8) == pytest.approx(samples / rate)
    # Adversarial training pays the attack's forward and backward passes.
    assert scaling.step_factor(fc) == 1
    assert scaling.step_factor(dataclasses.replace(fc, adversarial="fgsm")) == 2
    assert scaling.step_factor(dataclasses.replace(fc, adversarial="pgd", adv_steps=7)) == 8


def test_the_command_prints_both_tables_and_refuses_a_bad_file(tmp_path, capsys):
    bench = {"device": "cpu", "platform": "cpu", "dtype": "float32", "rows": ROWS + [
        {"network": n, "batch_size": 16, "population": 1, "member_samples_per_s": 50.0}
        for n in ("lc", "cnn")]}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(bench))
    assert scaling.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| fc | 16 | 2,585 | 100 (1), 400 (8) |" in out
    assert "| **all** |" in out and "| 1 device | 8 devices | 64 devices |" in out
    (tmp_path / "bad.json").write_text("{}")
    assert scaling.main([str(tmp_path / "bad.json")]) == 2
    assert scaling.main([str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: ") and "not a bench result" in err[0]
    assert "cannot read a bench result" in err[1]
