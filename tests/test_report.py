"""The report: rebuilt byte for byte from results/, verdicts computed from the data."""

from pathlib import Path

import numpy as np

from uspsjax import report, results
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
    run["n_train"] = 32
    for s in run["settings"]:
        s.update(batchnorm="before", bn_momentum=0.99 if s["label"] == "lr=0.001" else 0.1)
    run["diverged"][:] = 0
    run["curves"] = np.nan_to_num(run["curves"], nan=0.5)
    run["curves"][:, -1, 1], run["curves"][:, -1, 3] = 0.97, 0.50
    cautions = report.stale_running_averages(report.Study(run), "cnn")
    assert len(cautions) == 2
    stale, fresh = cautions
    assert "lr=0.001" in stale and "8 updates, so 92 % of their initial values remained: the " \
        "test number measures stale statistics" in stale
    assert "lr=50" in fresh and "so 0 % of their initial values remained: staleness does " \
        "not explain the gap" in fresh
    run["curves"][:, -1, 3] = 0.80  # a 17-point gap: no caution
    assert report.stale_running_averages(report.Study(run), "cnn") == []


def test_report_errors_are_one_line(tmp_path, capsys):
    assert report.main(["--results", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_committed_report_matches_committed_results():
    committed = ROOT / "results" / "REPORT.md"
    assert committed.read_text() == report.build_report(ROOT / "results")
