"""The validation split: held out once per sweep, reported beside train and test, and what
the report selects on."""

from dataclasses import replace

import numpy as np
import pytest

from conftest import assert_curves_match
from test_paths import run_cli
from test_results import make_bagging_run, make_run
from uspsjax import data, grid, population, report, results, sweep, train
from uspsjax.errors import InputError

SWEEP = """
name = "held"
networks = ["fc"]
seeds = 2
[base]
epochs = 2
batch_size = 32
lr = 0.05
[evaluation]
validation = 200
validation_seed = 3
"""


def test_split_is_disjoint_fixed_by_its_seed_and_keeps_the_order(dataset):
    a = data.split_validation(dataset, 500, seed=1)
    assert a.x_val.shape == (500, 256) and len(a.y_train) == len(dataset.y_train) - 500
    assert a.x_test is dataset.x_test
    # Every training image is in exactly one part, the training part in its original order.
    rows = {r.tobytes(): i for i, r in enumerate(dataset.x_train)}
    train_idx = [rows[r.tobytes()] for r in a.x_train]
    val_idx = [rows[r.tobytes()] for r in a.x_val]
    assert train_idx == sorted(train_idx) and not set(train_idx) & set(val_idx)
    assert len(set(train_idx) | set(val_idx)) == len(dataset.y_train)
    np.testing.assert_array_equal(a.y_val, dataset.y_train[val_idx])
    again, other = data.split_validation(dataset, 500, seed=1), data.split_validation(dataset, 500, 2)
    np.testing.assert_array_equal(again.x_val, a.x_val)
    assert not np.array_equal(other.x_val, a.x_val)
    assert data.split_validation(dataset, 0) is dataset
    with pytest.raises(InputError, match="expected 0 <= n < 7291"):
        data.split_validation(dataset, 7291)


def test_a_sweep_reports_validation_beside_train_and_test(tmp_path, subset_h5, capsys, dataset):
    path = tmp_path / "held.toml"
    path.write_text(SWEEP)
    code, out, err = run_cli(capsys, path, "--data", subset_h5, "--out", tmp_path / "out",
                             "--checkpoints", tmp_path / "ck", "--quiet")
    assert code == 0, err
    run = results.read_metrics(tmp_path / "out" / "held" / "metrics.h5")
    assert run.metrics == ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
                              "test_acc")
    assert (run.n_train, run.validation, run.validation_seed) == (824, 200, 3)
    assert np.isfinite(run.curves).all() and run.curves.shape == (2, 2, 6)
    summary = (tmp_path / "out" / "held" / "summary.md").read_text()
    assert "Validation: 200 training images held out (seed 3" in summary
    assert "| train acc | val acc | test acc | train loss | val loss | test loss |" in summary
    # The validation curves are the member's own on the held-out images: one split for both
    # seeds, drawn from the training images, not the test set.
    small = data.Dataset(dataset.x_train[:1024], dataset.y_train[:1024], dataset.x_test[:256],
                         dataset.y_test[:256])
    first = grid.expand(grid.load_sweep(str(path)))[0]
    _, curves = train.train_members(first.static,
                                    train.as_data(data.split_validation(small, 200, 3)),
                                    population.member_key(first.seed),
                                    train.make_hparams(**first.hparams))
    assert_curves_match(run.curves[0], np.asarray(curves), n_test=200)


def test_validation_settings_are_checked(tmp_path):
    for table, fragment in [("validation = -1", "integer >= 0"),
                            ("validation = true", "integer >= 0"),
                            ("validation = 7291", "leaves no training images"),
                            ("validation_seed = 1.5", "integer >= 0"),
                            ("holdout = 10", "evaluation takes")]:
        path = tmp_path / "v.toml"
        path.write_text(f'name = "v"\nnetworks = ["fc"]\n[evaluation]\n{table}\n')
        with pytest.raises(InputError, match=fragment):
            grid.load_sweep(str(path))


def with_validation(run: dict) -> dict:
    """`run` with validation curves (loss and accuracy 0.5, NaN where the test curves are)
    between its train and test columns."""
    curves = run.curves
    val = np.where(np.isnan(curves[..., 2:]), np.nan, 0.5)
    return replace(run, curves=np.concatenate([curves[..., :2], val, curves[..., 2:]], axis=-1),
                   metrics=train.metric_names(True))


def test_the_report_selects_on_validation_when_there_is_one():
    run = replace(with_validation(make_run()), validation=1000)
    # cnn: lr=0.001 (members 6-8) ahead on the validation split, lr=50 (9-11) on the test set.
    curves = run.curves
    curves[6:9, -1, 3], curves[6:9, -1, 5] = 0.99, 0.20
    curves[9:11, -1, 3], curves[9:11, -1, 5] = 0.10, 0.95  # member 11 diverged
    on_val = report.Study(run)
    assert on_val.on == "val" and report.Study(make_run()).on == "test"
    assert on_val.acc("cnn", "lr=0.001") == pytest.approx(0.99)
    assert report.best_on_validation(on_val, "cnn") == (["lr=0.001"], "lr=0.001")
    assert on_val.beats("cnn", "lr=0.001", "lr=50") is True
    # The tables still show test accuracy: what was chosen, reported on data it never saw.
    assert on_val.rows[("cnn", "lr=50")]["test_acc_mean"] == pytest.approx(0.95)
    assert on_val.cell("cnn", "lr=0.001").startswith("20.00 ± 0.00")


def test_merging_results_with_other_curves_is_refused(tmp_path):
    path = tmp_path / "held.toml"
    path.write_text(SWEEP)
    old = make_run()  # curves without validation
    with pytest.raises(InputError, match="cannot merge"):
        sweep.check_mergeable(grid.load_sweep(str(path)), old, ["fc"])


def test_the_beyond_section_chooses_on_validation_and_tests_the_choice_once(tmp_path):
    search = with_validation(make_run(robust=False))
    search.curves[9:11, -1, 3] = 0.9  # cnn lr=50 best on validation (member 11 diverged)
    search = replace(search, name="beyond", validation=1000)
    final = make_bagging_run()
    final = replace(final, name="beyond-final",
                    settings=[dict(s, network="cnn", label="lr=50", lr=50.0)
                              for s in final.settings])
    out = tmp_path / "results"
    results.write_results(out, search)
    results.write_results(out, final)
    assert "beats the default training of Task 1" not in report.build_report(out)
    baseline = make_run(robust=False)
    baseline = replace(baseline, name="baseline", settings=[dict(s, label="default")
                                                            for s in baseline.settings])
    baseline.curves[:, -1, 3] = 0.5  # every baseline member: 50 % test accuracy
    results.write_results(out, baseline)
    text = report.build_report(out)
    assert ("Chosen on the CNN's validation (1000 held-out training images): **lr=50**, 1,800 "
            "of 2,000 validation images (90.00 %)" in text)
    assert "| lr=50 | 3 | diverged | diverged (3/3) |" in text  # the FC beside it
    assert "For the FC the best on validation is **lr=0.001**" in text
    assert "- The retrained recipe is the one chosen on validation: lr=50." in text
    assert "| uspsjax CNN, 3-member ensemble (mean ± std over 2) |" in text
    assert "target: the CNN ensemble's test error is at most 2.2 %" in text
    assert ("- CNN: one member trained with the recipe beats the default training of Task 1: "
            "**holds** — 85.44 % ± 13.22 vs 50.00 % ± 0.00 (train accuracy on the recipe's "
            "augmented images ") in text
    assert "![beyond-final bagging](beyond-final/bagging.png)" in text
