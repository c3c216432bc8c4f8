"""Tests for uspsjax.results on small synthetic runs (no training, no data file)."""

import dataclasses
import math
from dataclasses import replace

import h5py
import numpy as np
import pytest

from uspsjax import results

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
EPOCHS, N_TEST = 4, 40


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make_run(*, robust=True):
    """2 networks x 2 labels x 3 seeds x 4 epochs.

    fc lr=50 diverges in every seed (epochs 1, 2, 2); cnn lr=50 diverges in seed 2 only (epoch 3).
    The final fc lr=0.001 values are set by hand: test_acc 0.90/0.92/0.94, train_loss 0.1/0.2/0.3.
    """
    rng = np.random.default_rng(0)
    settings, diverged = [], []
    for net in ("fc", "cnn"):
        for lr, label in ((0.001, "lr=0.001"), (50, "lr=50")):
            for seed in range(3):
                settings.append({"network": net, "seed": seed, "bag": 0, "label": label,
                                 "group": 0 if net == "fc" else 1, "epochs": EPOCHS,
                                 "lr": lr, "batch_size": 16, "init": "glorot_uniform",
                                 "adversarial": net == "cnn", "dropout": 0.25})
                bad = {("fc", 50): (1, 2, 2)[seed], ("cnn", 50): 3 if seed == 2 else 0}
                diverged.append(bad.get((net, lr), 0))
    m = len(settings)
    curves = np.empty((m, EPOCHS, 4), np.float32)
    curves[..., 0::2] = rng.uniform(0.05, 2.0, (m, EPOCHS, 2))  # losses
    curves[..., 1::2] = rng.uniform(0.1, 0.99, (m, EPOCHS, 2))  # accuracies
    curves[:3, -1, 3] = [0.90, 0.92, 0.94]
    curves[:3, -1, 0] = [0.1, 0.2, 0.3]
    diverged = np.array(diverged, np.int32)
    for i, d in enumerate(diverged):
        if d:
            curves[i, d - 1:] = np.nan
    probs = _softmax(rng.normal(size=(m, N_TEST, 10)) * 3).astype(np.float32)
    probs[diverged > 0] = np.nan
    return results.Run(
        name="lr", description="Learning rate study.", sweep_text='name = "lr"\n',
        overrides={"epochs": EPOCHS}, metrics=METRICS, settings=settings,
        curves=curves, diverged=diverged, test_probs=probs,
        y_test=rng.integers(0, 10, N_TEST).astype(np.int32), n_train=7291,
        validation=0, validation_seed=0,
        robust=rng.uniform(0, 1, (m, 2, 2)).astype(np.float32) if robust else None,
        attack_eps=[0.05, 0.1] if robust else [], ensemble=0,
        study={"fc": {"test_acc": 0.9357, "test_loss": 0.4535}},
        device="cpu: test", versions={"jax": "0.0", "numpy": np.__version__},
        wall_time_s=12.3, programs=2,
        groups=[{"label": "fc", "members": 6, "wall_time_s": 3.2, "chunks": 1,
                 "device": "cpu: test", "versions": {"jax": "0.0"}, "recorded": True},
                {"label": "cnn", "members": 6, "wall_time_s": 9.1, "chunks": 2,
                 "device": "cpu: test", "versions": {"jax": "0.1"}, "recorded": True}],
        data_sha256="5e" * 32)


# Two-class softmax rows for 4 samples (y = 0, 1, 0, 1); the other 8 classes are 0.
# Averaging A, B, C gets 3/4 right; A alone 2/4, B alone 1/4, C alone 3/4, A+B 2/4, A+C 4/4.
Y4 = np.array([0, 1, 0, 1])
PROBS_ABC = np.zeros((3, 4, 10), np.float32)
PROBS_ABC[:, :, :2] = [
    [[.9, .1], [.6, .4], [.3, .7], [.2, .8]],  # A
    [[.4, .6], [.6, .4], [.3, .7], [.2, .8]],  # B
    [[.4, .6], [.1, .9], [.8, .2], [.2, .8]],  # C
]


def make_bagging_run():
    """fc, one label, 2 seeds x bags 1..3; in seed 1, bag 2 diverged (NaN softmax)."""
    run = make_run(robust=False)
    settings = [{"network": "fc", "seed": s, "bag": b, "label": "bagging", "group": 0,
                 "epochs": EPOCHS, "lr": 0.001} for s in (0, 1) for b in (1, 2, 3)]
    probs = np.concatenate([PROBS_ABC, PROBS_ABC])
    probs[4] = np.nan
    diverged = np.array([0, 0, 0, 0, 2, 0], np.int32)
    curves = run.curves[:6].copy()
    curves[4] = run.curves[6]
    curves[4, 1:] = np.nan
    return replace(run, name="bagging", settings=settings, test_probs=probs, diverged=diverged,
                   curves=curves, y_test=Y4.astype(np.int32), ensemble=3, groups=run.groups[:1])


def _tree_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_h5_round_trip(tmp_path):
    run = make_run()
    folder = results.write_results(tmp_path, run)
    assert folder == tmp_path / "lr"
    back = results.read_metrics(folder / "metrics.h5")
    assert back.schema_version == 1 and back.created and back.path == folder
    for field in dataclasses.fields(results.Run):
        key, value = field.name, getattr(run, field.name)
        if key in ("created", "path"):
            continue
        if isinstance(value, np.ndarray):
            assert getattr(back, key).dtype == value.dtype, key
            if key == "test_probs":  # stored as float16
                np.testing.assert_allclose(back.test_probs, value, rtol=1e-3, atol=1e-4)
            else:
                np.testing.assert_array_equal(getattr(back, key), value)
        else:
            assert getattr(back, key) == value, key
            assert type(getattr(back, key)) is type(value), key
    for mine, theirs in zip(run.settings, back.settings):
        assert list(theirs) == list(mine)  # key order kept
        assert {k: type(v) for k, v in theirs.items()} == {k: type(v) for k, v in mine.items()}
    for mine, theirs in zip(run.groups, back.groups):
        assert {k: type(v) for k, v in theirs.items()} == {k: type(v) for k, v in mine.items()}
    with h5py.File(folder / "metrics.h5") as f:
        assert f["test_probs"].dtype == np.float16
        assert f["curves"].compression == "gzip"
        assert "robust" in f and list(f["robust"].attrs["attacks"]) == ["fgsm", "pgd20"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "accuracy.png", "loss.png", "metrics.h5", "robust.png", "summary.md"]


def test_round_trip_without_robust(tmp_path):
    run = make_run(robust=False)
    back = results.read_metrics(results.write_results(tmp_path, run) / "metrics.h5")
    assert back.robust is None and back.attack_eps == []
    assert not (tmp_path / "lr" / "robust.png").exists()


@pytest.mark.parametrize("victim", ["_plot_curves", "write_metrics"])
def test_write_is_atomic(tmp_path, monkeypatch, victim):
    run = make_run(robust=False)
    folder = results.write_results(tmp_path, run)
    before = _tree_bytes(folder)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as m:
        m.setattr(results, victim, boom)
        with pytest.raises(RuntimeError, match="disk on fire"):
            results.write_results(tmp_path, replace(run, description="Second try."))
    assert _tree_bytes(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["lr"]  # no temp or backup folder left

    results.write_results(tmp_path, replace(run, description="Second try."))
    assert "Second try." in (folder / "summary.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["lr"]


def test_summarize_rows():
    rows = results.summarize(make_run())
    assert [(r["network"], r["label"]) for r in rows] == [
        ("fc", "lr=0.001"), ("fc", "lr=50"), ("cnn", "lr=0.001"), ("cnn", "lr=50")]
    first = rows[0]
    assert first["n"] == 3 and first["n_diverged"] == 0
    assert first["test_acc_mean"] == pytest.approx(0.92)
    assert first["test_acc_std"] == pytest.approx(np.std([0.90, 0.92, 0.94], ddof=1), rel=1e-5)
    assert first["study_test_acc"] == 0.9357
    assert rows[1]["n_diverged"] == 3 and math.isnan(rows[1]["test_acc_mean"])
    assert rows[1]["diverged_epochs"] == [1, 2, 2]
    assert rows[3]["n_diverged"] == 1 and rows[3]["study_test_acc"] is None
    # A partly diverged setting: statistics over the two healthy members' last epoch.
    run = make_run()
    healthy = run.curves[9:11, -1, 3].astype(np.float64)
    assert rows[3]["test_acc_mean"] == pytest.approx(healthy.mean())


def test_final_epoch_is_last_finite():
    curves = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    curves[1, 2:] = np.nan  # a member with only 2 epochs
    final = results._final(curves)
    np.testing.assert_array_equal(final[0], curves[0, 3])
    np.testing.assert_array_equal(final[1], curves[1, 1])


def test_summary_markdown(tmp_path):
    run = make_run()
    text = (results.write_results(tmp_path, run) / "summary.md").read_text()
    assert text.startswith("# Sweep lr\n\nLearning rate study.\n")
    assert "Overrides: epochs=4." in text
    fc_row = next(line for line in text.splitlines() if line.startswith("| fc | lr=0.001 |"))
    cells = [c.strip() for c in fc_row.strip("|").split("|")]
    assert cells[2] == "3"
    assert cells[4] == "92.00 ± 2.00"  # test acc: mean and sample std of 90, 92, 94 %
    assert cells[5] == "0.200 ± 0.100"  # train loss: 0.1, 0.2, 0.3
    assert cells[8] == "93.57"  # the study's test accuracy
    assert "| fc | lr=50 | 3 | diverged (3/3) |" in text
    cnn_row = next(line for line in text.splitlines() if line.startswith("| cnn | lr=50 |"))
    assert "3 (1/3 diverged)" in cnn_row and cnn_row.endswith("| — |")
    assert "| network | setting | clean | FGSM@0.05 | FGSM@0.1 | PGD-20@0.05 | PGD-20@0.1 |" in text


def test_summary_is_deterministic(tmp_path):
    run = make_run()
    first = (results.write_results(tmp_path / "a", run) / "summary.md").read_bytes()
    second = (results.write_results(tmp_path / "b", run) / "summary.md").read_bytes()
    assert first == second
    # Regenerating from metrics.h5 alone (as the report does) gives the same bytes.
    back = results.read_metrics(tmp_path / "a" / "lr" / "metrics.h5")
    assert results.summary_markdown(back).encode("utf-8") == first


def test_ensemble_accuracy():
    assert results.ensemble_accuracy(PROBS_ABC, Y4, np.ones(3, bool)) == 0.75
    assert results.ensemble_accuracy(PROBS_ABC, Y4, [True, False, False]) == 0.5
    with_nan = np.concatenate([PROBS_ABC, np.full((1, 4, 10), np.nan, np.float32)])
    assert results.ensemble_accuracy(with_nan, Y4, [True, True, True, False]) == 0.75
    assert math.isnan(results.ensemble_accuracy(PROBS_ABC, Y4, np.zeros(3, bool)))


def test_ensemble_table_and_bagging_outputs(tmp_path):
    run = make_bagging_run()
    rows = results.ensemble_table(run)
    got = [(r["k"], r["single_mean"], r["single_std"], r["ensemble_mean"], r["ensemble_std"],
            r["left_out"], r["n_members"]) for r in rows]
    assert got == [
        (1, 0.5, 0.0, 0.5, 0.0, 0, 2),
        (2, 0.25, 0.0, 0.5, 0.0, 1, 4),  # seed 1's bag 2 diverged: its single is left out too
        (3, 0.75, 0.0, 0.875, np.std([0.75, 1.0], ddof=1), 1, 6),  # seed 0: A+B+C = 3/4, seed 1: A+C = 4/4
    ]
    assert results.ensemble_table(make_run()) == []
    # A network whose ensembles a sweep's [cpu] table shrank to one member: only k = 1.
    lc = replace(run, settings=[dict(x, network="lc" if x["seed"] == 1 else "fc",
                                  bag=1 if x["seed"] == 1 else x["bag"])
                             for x in run.settings[:4]], test_probs=run.test_probs[:4],
              diverged=run.diverged[:4])
    assert [(r["network"], r["k"]) for r in results.ensemble_table(lc)] == [
        ("fc", 1), ("fc", 2), ("fc", 3), ("lc", 1)]
    folder = results.write_results(tmp_path, run)
    assert (folder / "bagging.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (folder / "summary.md").read_text()
    assert "| fc | bagging | 3 | 75.00 ± 0.00 | 87.50 ± 17.68 | 1/6 |" in text


def test_rejects_unstorable_settings(tmp_path):
    run = make_run()
    run = replace(run, settings=[dict(s, schedule=None) for s in run.settings])
    with pytest.raises(TypeError, match="schedule"):
        results.write_results(tmp_path, run)
    assert list(tmp_path.iterdir()) == []


def test_merge_keeps_the_networks_the_new_run_did_not_train(tmp_path):
    old = make_run()
    new = make_run()
    keep_cnn = [i for i, s in enumerate(new.settings) if s["network"] == "fc"]
    new = replace(new, settings=[dict(new.settings[i], extra=1) for i in keep_cnn],
               curves=new.curves[keep_cnn, :2], diverged=new.diverged[keep_cnn],
               test_probs=new.test_probs[keep_cnn], robust=new.robust[keep_cnn],
               groups=[dict(new.groups[0], device="gpu: test")], programs=1,
               device="gpu: test", wall_time_s=1.0)
    merged = results.merge_runs(old, new, defaults={"extra": 0})
    nets = [s["network"] for s in merged.settings]
    assert nets == ["cnn"] * 6 + ["fc"] * 6
    assert [s["extra"] for s in merged.settings] == [0] * 6 + [1] * 6
    assert merged.curves.shape == (12, EPOCHS, 4)
    assert np.all(np.isnan(merged.curves[6:, 2:]))  # the new run had 2 epochs
    assert merged.device == "cpu: test; gpu: test" and merged.programs == 2
    assert [g["device"] for g in merged.groups] == ["cpu: test", "gpu: test"]
    # The FC trained again on the CPU: the device list names the devices of the groups kept
    # and of the new run, each once (not the GPU, whose group the new run replaced).
    on_cpu = replace(new, device="cpu: test", groups=[dict(new.groups[0], device="cpu: test")])
    again = results.merge_runs(merged, on_cpu, defaults={})
    assert again.device == "cpu: test"
    assert [g["device"] for g in again.groups] == ["cpu: test", "cpu: test"]
    folder = results.write_results(tmp_path, merged)
    back = results.read_metrics(folder / "metrics.h5")
    assert [s["group"] for s in back.settings] == [0] * 6 + [1] * 6
    # summary.md names what the merge kept, not the earlier sweep file's text.
    assert back.overrides["merged"]["sweep_text"] == old.sweep_text
    assert ("Overrides: epochs=4, merged with the earlier cnn members from cpu: test "
            "(overrides epochs=4).") in (folder / "summary.md").read_text()


def test_a_merge_of_merges_names_where_each_kept_network_ran():
    # An LC run merged into a file whose CNN had been rerun (cpu-a, then cpu-b) beside an FC
    # kept from a GPU run: each kept network is named with its own run's device and overrides,
    # never the earlier file's (cpu-a trained nothing that is kept).
    overrides = {"networks": ["lc"], "merged": {
        "networks": ["cnn", "fc"], "device": "gpu; cpu-a; cpu-b", "overrides": {
            "networks": ["cnn"], "merged": {"networks": ["fc"], "device": "gpu",
                                            "overrides": {"networks": ["fc", "cnn"]}}}}}
    assert results.describe_overrides(overrides) == (
        "networks=['lc'], merged with the earlier cnn members from cpu-b (overrides "
        "networks=['cnn']) and fc members from gpu (overrides networks=['fc', 'cnn'])")
    assert results.merge_origin(overrides, "cpu-c", "lc") == ("cpu-c", {"networks": ["lc"]}, False)


def test_groups_of_an_older_merged_file_stay_not_recorded(tmp_path):
    # A file from before per-group devices and versions: its groups ran on its device, unless
    # it was merged from runs on several; a later merge must not record a guess as a fact.
    run = make_run()
    merged = {"networks": ["fc"], "device": "gpu: test", "overrides": {}, "sweep_text": ""}
    folder = results.write_results(tmp_path, replace(run, overrides={"merged": merged}))
    with h5py.File(folder / "metrics.h5", "r+") as f:
        del f["groups/device"], f["groups/versions"]
    back = results.read_metrics(folder / "metrics.h5")
    newest = (run.device, run.versions)  # the cnn group: the run that wrote the file
    assert [(g["device"], g["versions"]) for g in back.groups] == [(None, None), newest]
    again = results.read_metrics(results.write_results(tmp_path, back) / "metrics.h5")
    assert [(g["device"], g["versions"]) for g in again.groups] == [(None, None), newest]
    plain = results.write_results(tmp_path / "plain", run)
    with h5py.File(plain / "metrics.h5", "r+") as f:
        del f["groups/device"], f["groups/versions"]
    back = results.read_metrics(plain / "metrics.h5")
    assert {g["device"] for g in back.groups} == {run.device}
    assert all(g["versions"] == run.versions for g in back.groups)


def test_a_kept_group_shows_its_versions_only_where_its_run_recorded_them(tmp_path):
    # The CNN trained with jax 0.1, then the FC again with jax 0.2 and merged beside it: the
    # report shows each network's own versions. A file from before the `recorded` mark may
    # hold the newest run's values for a kept group (as some merges wrote): not recorded.
    from uspsjax import report
    fc = [i for i, s in enumerate(make_run().settings) if s["network"] == "fc"]

    def only_fc(run, jax_version):
        versions = {"jax": jax_version}
        return replace(run, settings=[run.settings[i] for i in fc], curves=run.curves[fc],
                       diverged=run.diverged[fc], test_probs=run.test_probs[fc],
                       robust=run.robust[fc], groups=[dict(run.groups[0], versions=versions)],
                       programs=1, versions=versions)

    first = replace(make_run(), versions={"jax": "0.1"},
                    groups=[dict(g, versions={"jax": "0.1"}) for g in make_run().groups])
    written = results.read_metrics(results.write_results(tmp_path / "a", first) / "metrics.h5")
    merged = results.merge_runs(written, only_fc(make_run(), "0.2"), defaults={})
    folder = results.write_results(tmp_path / "b", merged)
    study = report.Study(results.read_metrics(folder / "metrics.h5"))
    assert [g["recorded"] for g in study.run.groups] == [True, True]
    assert report.provenance(study, "cnn")[1] == {"jax": "0.1"}
    assert report.provenance(study, "fc")[1] == {"jax": "0.2"}
    with h5py.File(folder / "metrics.h5", "r+") as f:
        del f["groups/recorded"]
    study = report.Study(results.read_metrics(folder / "metrics.h5"))
    assert [g["recorded"] for g in study.run.groups] == [False, True]
    assert report.provenance(study, "cnn")[1] is None
    assert report.provenance(study, "fc")[1] == {"jax": "0.2"}


def test_setting_values_compare_by_value():
    """`same_value`: how a sweep file wrote a number does not matter; its kind of value does."""
    assert results.same_value(1e-3, 0.001) and results.same_value(50, 50.0)
    assert results.same_value(0.1 + 0.2, 0.3) and not results.same_value(0.3, 0.3001)
    assert results.same_value(32, 32) and not results.same_value(32, 33)
    assert not results.same_value(True, 1) and not results.same_value(0.0, False)
    assert not results.same_value("0.001", 0.001) and results.same_value("none", "none")
