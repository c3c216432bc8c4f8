"""The report: rebuilt byte for byte from results/, verdicts computed from the data."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from uspsjax import grid, report, results
from test_results import make_bagging_run, make_run

ROOT = Path(__file__).resolve().parents[1]


def fixture_results(tmp_path):
    out = tmp_path / "results"
    results.write_results(out, make_run())
    results.write_results(out, make_bagging_run())
    return out


def test_report_regenerates_byte_for_byte(tmp_path, capsys):
    out = fixture_results(tmp_path)
    assert report.main(["--results", str(out)]) == 0
    first = (out / "REPORT.md").read_bytes()
    assert report.main(["--results", str(out)]) == 0
    assert (out / "REPORT.md").read_bytes() == first
    text = first.decode()
    assert "Not run yet: `python -m uspsjax.sweep baseline`" in text
    # lr: fc's lr 0.001 members reach 90/92/94 %; lr 50 diverged in all 3 fc seeds.
    assert "| FC | lr=50 | 3 | diverged (3/3) | — |" in text
    assert "| FC | lr=0.001 | 3 | 92.00 ± 2.00 | — |" in text
    assert "- FC: lr=0.001 gives the best accuracy: **holds**" in text
    assert "![lr accuracy](lr/accuracy.png)" in text
    assert "(1 left out here)" in text  # the bagging fixture's diverged member


def test_stale_running_averages_are_blamed_only_when_stale():
    """Two batch-norm settings with train 97 % and test 50 %: at momentum 0.99 and 8 updates
    (4 epochs x 32 // 16) 92 % of the initial statistics remain; at 0.1 none do."""
    run = make_run()
    run = replace(run, n_train=32, curves=np.nan_to_num(run.curves, nan=0.5))
    for s in run.settings:
        s.update(batchnorm="before", bn_momentum=0.99 if s["label"] == "lr=0.001" else 0.1)
    run.diverged[:] = 0
    run.curves[:, -1, 1], run.curves[:, -1, 3] = 0.97, 0.50
    cautions = report.stale_running_averages(report.Study(run), "cnn")
    assert len(cautions) == 2
    stale, fresh = cautions
    assert "lr=0.001" in stale and "8 updates, so 92 % of their initial values remained: the " \
        "test number measures stale statistics" in stale
    assert "lr=50" in fresh and "so 0 % of their initial values remained: staleness does " \
        "not explain the gap" in fresh
    run.curves[:, -1, 3] = 0.80  # a 17-point gap: no caution
    assert report.stale_running_averages(report.Study(run), "cnn") == []


def test_report_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert report.main(["--results", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    # A full disk: the earlier report stays, no temporary file is left (`cli.write_text`).
    (tmp_path / "REPORT.md").write_text("earlier")
    write = Path.write_text

    def full(path, text, *args, **kwargs):
        write(path, text[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    assert report.main(["--results", str(tmp_path)]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "No space left" in err
    assert [p.name for p in tmp_path.iterdir()] == ["REPORT.md"]
    assert (tmp_path / "REPORT.md").read_text() == "earlier"


def test_committed_report_matches_committed_results():
    committed = ROOT / "results" / "REPORT.md"
    assert committed.read_text() == report.build_report(ROOT / "results")


def test_judge_is_the_one_rule():
    a, b = report.Stat(0.95, 0.01, 3), report.Stat(0.90, 0.01, 3)
    assert report.judge(a, b) is True and report.judge(b, a) is False
    assert report.judge(report.Stat(0.91, 0.01, 3), b) is None  # 0.01 apart, noise 0.014
    assert report.judge(report.Stat(0.95, 0.0, 1), b) is None  # one seed: no spread to judge by
    assert report.judge(report.Stat(None), b) is False and report.judge(b, report.Stat(None)) is True
    assert report.judge(report.Stat(None), report.Stat(None)) is None
    # A target is a fixed number: the interval mean ± std must clear it.
    assert report.judge(report.Stat(0.9751, 0.0017, 48), report.Stat(0.975)) is None
    assert report.judge(report.Stat(0.9756, 0.0010, 3), report.Stat(0.978)) is False


def test_origin_follows_the_merge_chain():
    """A CNN rerun on a CPU merged into a file that had itself merged FC and LC from a GPU run."""
    run = replace(make_run(), device="gpu; cpu; cpu", overrides={"networks": ["cnn"], "merged": {
        "networks": ["fc", "lc"], "device": "gpu; cpu", "overrides": {"networks": ["cnn"], "merged": {
            "networks": ["fc", "lc"], "device": "gpu", "overrides": {}}}}})
    assert report.origin(run, "fc") == ("gpu", True)
    assert report.origin(run, "cnn") == ("cpu", False)
    assert report.origin(replace(run, device="cpu", overrides={}), "fc") == ("cpu", False)


PLANTED = (0.96, 0.99)  # every setting's seeds spread evenly over this range: mean 0.975


def plant(run: dict) -> dict:
    """`run` with every member healthy and every accuracy (curves, test softmax, robust) set by
    its seed alone, evenly from PLANTED[0] to PLANTED[1]: every setting has the same mean and
    spread, so every comparison and target (0.975, 0.978, the study's number set to 0.975) is
    within the noise."""
    settings, metrics = run.settings, list(run.metrics)
    seeds = {net: sorted({s["seed"] for s in settings if s["network"] == net})
             for net in {s["network"] for s in settings}}
    acc = np.array([np.interp(seeds[s["network"]].index(s["seed"]),
                              [0, max(len(seeds[s["network"]]) - 1, 1)], PLANTED)
                    for s in settings])
    curves = np.full(run.curves.shape, 0.1, np.float32)
    for j, m in enumerate(metrics):
        if m.endswith("_acc"):
            curves[..., j] = acc[:, None]
    y = run.y_test
    n_right = np.round(acc * len(y)).astype(int)
    guess = np.where(np.arange(len(y))[None, :] < n_right[:, None], y, (y + 1) % 10)
    robust = None if run.robust is None else np.broadcast_to(
        acc[:, None, None], run.robust.shape).astype(np.float32)
    return replace(run, curves=curves, diverged=np.zeros_like(run.diverged), robust=robust,
                test_probs=np.eye(10, dtype=np.float32)[guess],
                study={net: {"test_acc": 0.975} for net in run.study},
                # Files written before n_train was recorded read it back as None.
                n_train=run.n_train or 7291)


def test_every_section_calls_a_planted_within_noise_difference_undecided(tmp_path):
    for folder in sorted((ROOT / "results").glob("*/metrics.h5")):
        out = tmp_path / folder.parent.name / "metrics.h5"
        out.parent.mkdir()
        run = plant(results.read_metrics(folder))
        if folder.parent.name == "batchnorm":  # as if its LC had run 1 of its 20 epochs
            run = replace(run, settings=[dict(s, epochs=1) if s["network"] == "lc" else s
                                         for s in run.settings])
        results.write_metrics(out, run)
    text = report.build_report(tmp_path)
    sections = text.split("\n## ")[2:]  # past the header and the coverage table
    assert len(sections) == len(report.SECTIONS)
    for section in sections:
        claims = [line for line in section.splitlines() if line.startswith("- ") and "**" in line]
        assert any("**undecided**" in c for c in claims), section.splitlines()[0]
        assert not [c for c in claims if "**holds**" in c or "**does not hold**" in c]
    # Reduced scale is never judged, and the equal validation scores are one tie.
    assert "**not judged** (batchnorm LC ran 1 of 20 epochs)" in text
    assert "**not judged** (beyond-final LC ran 1 of 16 members)" in text
    assert "a 12-way tie at 1,950 of 2,000 validation images" in text
    assert "was used: **shifts, cosine label_smoothing=0.0 weight_decay=0.0**" in text



SHIPPED_LR = "lr = [1e-6, 1e-3, 50.0]"  # the axis of sweeps/lr.toml


def lr_sweep_text(values: str) -> str:
    """sweeps/lr.toml with its axis written `lr = VALUES`."""
    text = (ROOT / "sweeps" / "lr.toml").read_text()
    assert SHIPPED_LR in text
    return text.replace(SHIPPED_LR, f"lr = {values}")


def expand(tmp_path, text: str) -> list:
    """The members `grid` expands from a sweep file holding `text`."""
    path = tmp_path / f"sweep{len(list(tmp_path.glob('*.toml')))}.toml"
    path.write_text(text)
    return grid.expand(grid.load_sweep(str(path)))


def test_a_respelled_axis_changes_the_labels_not_the_values(tmp_path):
    """The premise of reading settings by value: the same learning rates written another way
    get other labels, with every setting equal."""
    plain = expand(tmp_path, lr_sweep_text("[1e-6, 0.001, 50.0]"))
    short = expand(tmp_path, lr_sweep_text("[1e-6, 1e-3, 50]"))
    assert [m.label for m in plain] != [m.label for m in short]
    assert list(dict.fromkeys(m.label for m in short)) == ["lr=1e-06", "lr=0.001", "lr=50"]

    def values(m):
        return {k: v for k, v in grid.member_settings(m).items() if k != "label"}
    assert [values(m) for m in plain] == [values(m) for m in short]


def relabel(run: dict, label) -> dict:
    """`run` with every member's label replaced by `label(its settings)`."""
    return replace(run, settings=[dict(s, label=label(s)) for s in run.settings])


def sections(runs: dict) -> dict[str, list[str]]:
    """The lines of every section of `report.SECTIONS` whose sweep is in `runs`."""
    studies = {name: report.Study(run) for name, run in runs.items()}
    return {name: section(studies[name], *(studies.get(p) for p in report.PARTNERS.get(name, ())))
            for name, _, section, _ in report.SECTIONS if name in studies}


def verdicts(lines: list[str]) -> list[str]:
    """The verdict of each claim among `lines`, in order: holds, does not hold, undecided, not
    judged or not run."""
    return [line.split("**")[1] for line in lines if line.startswith("- ") and "**" in line]


def test_respelled_labels_change_no_verdict(tmp_path):
    """Every committed run with its labels as another sweep file would have spelled them. With
    the lr axis written [1e-6, 1e-3, 50] (`grid` labels lr 50 "lr=50") the report reads the same,
    in that spelling. With an explicit label for every setting of every sweep (`{label = "...",
    ...}`; beyond and beyond-final's same recipe labelled differently) every section reads the
    same verdicts in the same order, and no claim reads a setting as not run."""
    runs = {folder.parent.name: results.read_metrics(folder)
            for folder in sorted((ROOT / "results").glob("*/metrics.h5"))}
    original = sections(runs)
    assert sum(map(len, map(verdicts, original.values()))) > 50

    short = lr_sweep_text("[1e-6, 1e-3, 50]")
    spelled = {m.hparams["lr"]: m.label for m in expand(tmp_path, short)}
    assert "lr=50" in spelled.values()
    by_grid = sections(dict(runs, lr=replace(relabel(runs["lr"], lambda s: spelled[s["lr"]]),
                                          sweep_text=short)))
    assert {name: [line.replace("lr=50", "lr=50.0") for line in lines]
            for name, lines in by_grid.items()} == original

    def explicit(run):
        names = {label: f"{run.name} recipe {k}" for k, label in
                 enumerate(dict.fromkeys(s["label"] for s in run.settings))}
        return relabel(run, lambda s: names[s["label"]])
    by_label = sections({name: explicit(run) for name, run in runs.items()})
    assert by_label.keys() == original.keys()
    for name, lines in by_label.items():
        assert verdicts(lines) == verdicts(original[name]), name
        assert not [line for line in lines if "not run" in line or "None" in line], name
    # The recipe beyond-final retrained is still found among beyond's (tied for the best).
    assert choice(by_label["beyond"]) == choice(original["beyond"]) == "is tied for the best"


def choice(lines: list[str]) -> str:
    """What the beyond section says of the recipe that beyond-final retrained."""
    [line] = [line for line in lines if line.startswith("- The retrained recipe")]
    return next(kind for kind in ("is the one chosen", "is tied for the best",
                                  "is not among the best") if kind in line)


def test_a_network_the_report_does_not_know_shows_up(tmp_path):
    """A result holding a network that `models.NETWORKS` lacks (written by a newer version): its
    rows, claims and coverage column are shown, after the known networks."""
    run = make_run()
    run = replace(run, settings=[dict(s, network={"cnn": "mlp"}.get(s["network"], s["network"]))
                                 for s in run.settings])
    (tmp_path / "lr").mkdir()
    results.write_metrics(tmp_path / "lr" / "metrics.h5", run)
    text = report.build_report(tmp_path)
    assert "| sweep | FC | LC | CNN | MLP |\n|---|---|---|---|---|" in text
    assert "| MLP | lr=0.001 | 3 |" in text and "- MLP: lr=0.001 gives the best accuracy" in text


def test_a_setting_is_found_by_its_values():
    """`Study.label`: floats within a relative 1e-9 (an int 50 is the float 50.0), None for no
    match, an error for values that several settings share or for a setting never recorded."""
    s = report.Study(make_run())  # lr 0.001 labelled "lr=0.001", the int 50 labelled "lr=50"
    assert s.label("fc", lr=1e-3) == s.label("fc", lr=0.001 * (1 + 1e-12)) == "lr=0.001"
    assert s.label("fc", lr=50.0) == "lr=50" and s.label("cnn", lr=50, batch_size=16) == "lr=50"
    assert s.label("fc", lr=0.0011) is None and s.label("lc", lr=1e-3) is None
    with pytest.raises(ValueError, match=r"batch_size=16 is ambiguous: 2 settings match "
                                         r"\(lr=0.001; lr=50\)"):
        s.label("fc", batch_size=16)
    with pytest.raises(ValueError, match="no setting 'learning_rate'"):
        s.label("fc", learning_rate=1e-3)


def test_a_claim_on_a_setting_the_run_lacks_is_not_run():
    """No setting with lr 1e-3 (here its members trained at 2e-3): the claim about it says so,
    naming the setting by value, instead of reading it as diverged."""
    run = relabel(make_run(), lambda s: s["label"].replace("0.001", "0.002"))
    for s in run.settings:
        s["lr"] = 0.002 if s["lr"] == 0.001 else s["lr"]
    [claim] = [line for line in report.section_lr(report.Study(run)) if line.startswith("- FC:")]
    assert claim.startswith("- FC: lr=0.001 gives the best accuracy: **not run** (a setting it "
                            "compares is not in lr FC) — lr=0.002 92.00 % ± 2.00, lr=50 diverged")


def test_every_section_is_written_in_the_study_order():
    """The report's sections follow `grid.STUDY_ORDER` (what `sweep all` runs), its own section
    last, and none is left out of the order."""
    from uspsjax.grid import STUDY_ORDER
    assert set(report.SECTION_OF) == {*STUDY_ORDER, "beyond"}
    assert [name for name, *_ in report.SECTIONS] == [*STUDY_ORDER, "beyond"]
