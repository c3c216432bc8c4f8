"""Rebuild `results/REPORT.md` from what is in `results/`, without training anything.

    python -m uspsjax.report [--results results]

For every experiment of the study: its number where it gave one, uspsjax's mean ± std over
seeds, the figures, and one line per claim saying whether it holds, with the evidence. Every
verdict is computed from the committed `metrics.h5` files, so the report is byte-for-byte
reproducible from `results/`.
"""

import math
import os
import sys
from pathlib import Path

import numpy as np

from uspsjax import cli, results
from uspsjax.errors import InputError

NETS = ("fc", "lc", "cnn")
NAMES = {"fc": "FC", "lc": "LC", "cnn": "CNN"}


class Study:
    """One sweep's results with lookups by network and setting label. Comparisons and rankings
    (`acc`, `beats`, `rank`) use the validation split when the sweep held one out (`on` =
    "val"), else the test set, as the study itself compared."""

    def __init__(self, run: dict):
        self.run = run
        self.rows = {(r["network"], r["label"]): r for r in results.summarize(run)}
        self.on = "val" if "val_acc" in run["metrics"] else "test"

    def networks(self) -> list[str]:
        """The networks this sweep ran, in the study's order."""
        return [n for n in NETS if any(net == n for net, _ in self.rows)]

    def labels(self, net: str) -> list[str]:
        """The settings run for `net`, in sweep order."""
        return [label for n, label in self.rows if n == net]

    def acc(self, net: str, label: str) -> float | None:
        """Mean final accuracy of a setting on the `on` split; None when every seed diverged or
        it is absent."""
        row = self.rows.get((net, label))
        if row is None or row["n_diverged"] == row["n"]:
            return None
        return row[f"{self.on}_acc_mean"]

    def beats(self, net: str, a: str, b: str) -> bool | None:
        """Whether setting `a` has a higher final accuracy (on the `on` split) than `b` by more
        than their combined std over seeds; None when the difference is within that noise. A
        setting that diverged in every seed loses to any that did not."""
        acc_a, acc_b = self.acc(net, a), self.acc(net, b)
        if acc_a is None or acc_b is None:
            return None if acc_a is acc_b else acc_b is None
        row_a, row_b = self.rows[(net, a)], self.rows[(net, b)]
        noise = math.hypot(row_a[f"{self.on}_acc_std"], row_b[f"{self.on}_acc_std"])
        return None if abs(acc_a - acc_b) <= noise else acc_a > acc_b

    def cell(self, net: str, label: str) -> str:
        """Test accuracy as 'mean ± std %', or how it diverged."""
        row = self.rows.get((net, label))
        if row is None:
            return "not run"
        if row["n_diverged"] == row["n"]:
            return f"diverged ({row['n']}/{row['n']})"
        text = f"{100 * row['test_acc_mean']:.2f} ± {100 * row['test_acc_std']:.2f}"
        return text + (f" ({row['n_diverged']}/{row['n']} diverged)" if row["n_diverged"] else "")

    def curve(self, net: str, label: str, epoch: int) -> float:
        """Mean test accuracy at a 1-based epoch over the setting's healthy members."""
        idx = [i for i, s in enumerate(self.run["settings"])
               if s["network"] == net and s["label"] == label]
        values = self.run["curves"][idx, epoch - 1, list(self.run["metrics"]).index("test_acc")]
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else math.nan

    def epochs(self, net: str) -> int:
        """The epochs a network's members trained in this sweep."""
        return max(s["epochs"] for s in self.run["settings"] if s["network"] == net)


def pct(x: float | None) -> str:
    """A fraction as a percentage, or 'diverged' when None."""
    return "diverged" if x is None or math.isnan(x) else f"{100 * x:.2f} %"


def verdict(holds: bool | None, claim: str, evidence: str) -> str:
    """One line: the claim, whether it holds, and the numbers that show it."""
    word = {True: "**holds**", False: "**does not hold**",
            None: "**undecided** (the difference is within the spread over seeds)"}[holds]
    return f"- {claim}: {word} — {evidence}."


def rank(study: Study, net: str) -> list[tuple[str, float | None]]:
    """The settings of a network from best to worst final accuracy on the split the study
    selects on (`Study.on`; diverged last)."""
    scored = [(label, study.acc(net, label)) for label in study.labels(net)]
    return sorted(scored, key=lambda t: -1.0 if t[1] is None else t[1], reverse=True)


def evidence_of(pairs) -> str:
    """'a 97.1 % > b 93.0 %' style evidence from (label, accuracy) pairs."""
    return ", ".join(f"{label} {pct(a)}" for label, a in pairs)


def table(study: Study, study_numbers: dict | None = None) -> list[str]:
    """A network x setting table of final test accuracy (mean ± std over seeds)."""
    lines = ["| network | setting | seeds | test accuracy (ours) | study |", "|---|---|---|---|---|"]
    for net in study.networks():
        for label in study.labels(net):
            row = study.rows[(net, label)]
            theirs = (study_numbers or {}).get(net, {}).get("test_acc")
            lines.append(f"| {NAMES[net]} | {label} | {row['n']} | {study.cell(net, label)} | "
                         f"{pct(theirs) if theirs is not None else '—'} |")
    return lines


def figures(name: str, extra: tuple = ()) -> list[str]:
    """Links to a sweep's figures."""
    return [" ".join(f"![{name} {f}]({name}/{f}.png)" for f in ("accuracy", "loss", *extra))]


def section_baseline(s: Study) -> list[str]:
    """Task 1: the three networks against the study's test accuracy."""
    out = table(s, s.run["study"])
    for net in s.networks():
        ours, theirs = s.acc(net, "default"), s.run["study"].get(net, {}).get("test_acc")
        if theirs is not None:
            out.append(verdict(ours is not None and ours >= theirs,
                               f"uspsjax's {NAMES[net]} reaches at least the study's accuracy",
                               f"{pct(ours)} (ours, {s.epochs(net)} epochs) vs {pct(theirs)}"))
    return out


def section_best_worst(s: Study, best: str, worst: str | None, what: str) -> list[str]:
    """Claims of the form 'BEST gives the highest accuracy (and WORST the lowest)' per net."""
    out = table(s)
    for net in s.networks():
        order = rank(s, net)
        out.append(verdict(order[0][0] == best, f"{NAMES[net]}: {best} gives the best {what}",
                           evidence_of(order)))
        if worst:
            out.append(verdict(order[-1][0] == worst,
                               f"{NAMES[net]}: {worst} gives the lowest accuracy",
                               evidence_of(order)))
    return out


def diverged_members(s: Study, label: str) -> tuple[int, int]:
    """(diverged, total) members of a setting, over all networks."""
    rows = [r for (net, lab), r in s.rows.items() if lab == label]
    return sum(r["n_diverged"] for r in rows), sum(r["n"] for r in rows)


def section_init(s: Study) -> list[str]:
    """Task 2.1: initializers."""
    out = section_best_worst(s, "init=glorot_uniform", "init=constant(1e5)", "accuracy")
    d, n = diverged_members(s, "init=constant(1e5)")
    small = [pct(s.acc(net, "init=constant(0.01)")) for net in s.networks()]
    out.append(f"- The study's explanations are wrong. A constant initializer gives every unit "
               f"of a layer the same weights, and gradient descent keeps them identical (the "
               f"symmetry is never broken), so each layer acts as a single unit (for LC: a "
               f"single filter per position, which still learns): Constant(0.01) reaches "
               f"{', '.join(small)} ({', '.join(NAMES[n] for n in s.networks())}) — not because "
               f"it 'learns too fast'. Constant(1e5) is not 'slow': its activations overflow "
               f"and {d} of {n} members diverged (NaN loss).")
    return out


def section_lr(s: Study) -> list[str]:
    """Task 2.2: learning rates."""
    out = section_best_worst(s, "lr=0.001", None, "accuracy")
    if "lc" in s.networks():
        order = rank(s, "lc")
        out.append(verdict(order[-1][0] == "lr=1e-06",
                           "LC: lr 1e-6 gives the lowest LC accuracy", evidence_of(order)))
    d, n = diverged_members(s, "lr=50.0")
    alive = [f"{NAMES[net]} {pct(s.acc(net, 'lr=50.0'))}" for net in s.networks()
             if s.acc(net, "lr=50.0") is not None]
    out.append(f"- lr 50 does not 'converge quickly to a local optimum': {d} of {n} members "
               f"diverged (NaN loss)" + (f"; the others ended at {', '.join(alive)} (chance, "
                                         f"the largest class, is 17.9 %)" if alive else "")
               + f". lr 1e-6 is simply too small to move in {s.epochs(s.networks()[0])} epochs.")
    return out


def section_batch(s: Study) -> list[str]:
    """Task 2.3: batch sizes at equal epochs."""
    out = table(s)
    for net in s.networks():
        other = "batch_size=32" if net == "lc" else "batch_size=1024"
        a, b = s.acc(net, "batch_size=16"), s.acc(net, other)
        out.append(verdict(a is not None and (b is None or a > b),
                           f"{NAMES[net]}: batch 16 beats {other.split('=')[1]} at equal epochs",
                           f"16: {pct(a)}, {other.split('=')[1]}: {pct(b)}"))
    out.append("- At equal epochs a batch of 1024 takes 64 times fewer steps than 16; at a "
               "fixed learning rate that, not 'gradient quality', is why it lags.")
    return out


def section_momentum(s: Study, lr: Study | None) -> list[str]:
    """Task 2.4: momentum, against no momentum (the lr sweep's lr 1e-3, same settings)."""
    out = table(s)
    for net in s.networks():
        e = min(10, s.epochs(net), lr.epochs(net) if lr and net in lr.networks() else 10)
        without = lr.curve(net, "lr=0.001", e) if lr and "lr=0.001" in lr.labels(net) else None
        at = {m: s.curve(net, f"momentum={m}", e) for m in (0.9, 0.99)}
        if without is not None and not math.isnan(without):
            out.append(verdict(all(v > without for v in at.values()),
                               f"{NAMES[net]}: momentum 0.9 and 0.99 beat no momentum by epoch {e}",
                               f"test accuracy at epoch {e}: 0.9 {pct(at[0.9])}, "
                               f"0.99 {pct(at[0.99])}, none (the lr sweep's lr 1e-3) {pct(without)}"))
        a, b = s.acc(net, "momentum=0.99"), s.acc(net, "momentum=0.9")
        out.append(verdict(s.beats(net, "momentum=0.99", "momentum=0.9"),
                           f"{NAMES[net]}: momentum 0.99 beats 0.9 (final)",
                           f"0.99 {pct(a)}, 0.9 {pct(b)}"))
    return out


STUDY_BAGGING = {"fc": [(0.926, 0.926), (0.924, 0.933), (0.928, 0.931), (0.933, 0.934),
                        (0.179, 0.179), (0.917, 0.179)],
                 "cnn": [(0.939, 0.939), (0.947, 0.954), (0.950, 0.955), (0.941, 0.956),
                         (0.944, 0.959), (0.933, 0.958)]}


def section_bagging(s: Study) -> list[str]:
    """Task 3.1: bagging ensembles, k = 1..K, beside the study's table."""
    rows = results.ensemble_table(s.run)
    out = ["| network | k | single (ours) | ensemble (ours) | left out | study single | "
           "study ensemble |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        theirs = STUDY_BAGGING.get(r["network"], [])
        single, ens = theirs[r["k"] - 1] if r["k"] <= len(theirs) else ("—", "—")
        out.append(f"| {NAMES[r['network']]} | {r['k']} | "
                   f"{100 * r['single_mean']:.2f} ± {100 * r['single_std']:.2f} | "
                   f"{100 * r['ensemble_mean']:.2f} ± {100 * r['ensemble_std']:.2f} | "
                   f"{r['left_out']}/{r['n_members']} | "
                   f"{single if single == '—' else pct(single)} | "
                   f"{ens if ens == '—' else pct(ens)} |")
    for net in s.networks():
        mine = [r for r in rows if r["network"] == net]
        if not mine:
            continue
        k = mine[-1]
        out.append(verdict(k["ensemble_mean"] > mine[0]["single_mean"],
                           f"{NAMES[net]}: a {k['k']}-member ensemble beats a single member",
                           f"{100 * k['ensemble_mean']:.2f} % vs "
                           f"{100 * np.mean([r['single_mean'] for r in mine]):.2f} % "
                           f"(mean single)"))
    cnn = [r for r in rows if r["network"] == "cnn"]
    if cnn:
        # The whole ensemble, its size fixed in advance: the best k would be chosen on test.
        whole = cnn[-1]
        out.append(verdict(whole["ensemble_mean"] >= 0.978,
                           "target: a bagged CNN reaches test error <= 2.2 % (tangent distance, "
                           "Keysers et al. 2000)",
                           f"the {whole['k']}-member ensemble {100 * whole['ensemble_mean']:.2f} % "
                           f"± {100 * whole['ensemble_std']:.2f}, error "
                           f"{100 * (1 - whole['ensemble_mean']):.2f} %"))
    left = sum(r["left_out"] for r in rows if r["k"] == max(x["k"] for x in rows))
    out.append(f"- The study's 6-member Dense ensemble at 0.179 is an averaging bug, not a "
               f"property of bagging: its 5th member had diverged (0.179 alone) and was averaged "
               f"in. uspsjax leaves diverged members out and reports them ({left} left out here).")
    return out


def section_dropout(s: Study) -> list[str]:
    """Task 3.2: dropout placement and rate."""
    out = table(s)
    if "cnn" in s.networks():
        conv, dense = (s.acc("cnn", f"dropout_at={p} rate 0.5") for p in ("conv", "dense"))
        out.append(verdict(s.beats("cnn", "dropout_at=dense rate 0.5", "dropout_at=conv rate 0.5"),
                           "CNN: dropout after the dense layer works better than after the "
                           "convolutions (rate 0.5)", f"dense {pct(dense)}, conv {pct(conv)}"))
    for net in s.networks():
        gaps = [(label, s.rows[(net, label)]["loss_gap_mean"]) for label in s.labels(net)]
        text = ", ".join(f"{label} {g:+.3f}" for label, g in gaps if not math.isnan(g))
        out.append(f"- {NAMES[net]}: test − train loss per setting: {text}.")
    return out


def section_l1(s: Study) -> list[str]:
    """Task 3.3: L1 activity penalties."""
    out = table(s)
    for net in s.networks():
        none = s.acc(net, "l1=0.0")
        best = max(((label, s.acc(net, label)) for label in s.labels(net) if label != "l1=0.0"),
                   key=lambda t: -1.0 if t[1] is None else t[1])
        # "Does not improve" holds unless some penalty is clearly (beyond the noise) better.
        out.append(verdict(s.beats(net, best[0], "l1=0.0") is not True,
                           f"{NAMES[net]}: an L1 activity penalty does not improve accuracy",
                           f"no penalty {pct(none)}, best with one ({best[0]}) {pct(best[1])}"))
    return out


def section_adversarial(s: Study) -> list[str]:
    """Task 4: adversarial training, judged by accuracy under attack."""
    out = table(s)
    run, eps = s.run, list(s.run["attack_eps"])
    if run["robust"] is not None and eps:
        head = " | ".join(f"FGSM {e}" for e in eps) + " | " + " | ".join(f"PGD-20 {e}" for e in eps)
        out += ["", f"| network | training | clean | {head} |", "|---|---|---|" + "---|" * 2 * len(eps)]
        for net in s.networks():
            for label in s.labels(net):
                idx = [i for i, st in enumerate(run["settings"])
                       if st["network"] == net and st["label"] == label and run["diverged"][i] == 0]
                rob = run["robust"][idx].mean(axis=0) if idx else np.full((2, len(eps)), np.nan)
                cells = " | ".join(pct(float(v)) for v in rob.reshape(-1))
                out.append(f"| {NAMES[net]} | {label} | {s.cell(net, label)} | {cells} |")
        at = eps.index(0.1) if 0.1 in eps else 0
        for net in s.networks():
            std_idx = _robust(run, net, "standard", at)
            best = max(((label, _robust(run, net, label, at)) for label in s.labels(net)
                        if label != "standard"), key=lambda t: t[1])
            out.append(verdict(best[1] > std_idx,
                               f"{NAMES[net]}: adversarial training raises PGD-20 accuracy at "
                               f"eps {eps[at]}", f"{best[0]} {pct(best[1])}, standard {pct(std_idx)}"))
            clean = {label: s.acc(net, label) for label in s.labels(net)}
            wins = [s.beats(net, label, "standard") for label in clean if label != "standard"]
            holds = True if True in wins else (None if None in wins else False)
            out.append(verdict(holds, f"{NAMES[net]}: adversarial training improves "
                               "clean test accuracy (the study's claim)",
                               evidence_of(clean.items())))
    return out


def _robust(run: dict, net: str, label: str, at: int) -> float:
    """Mean PGD-20 accuracy of a setting's healthy members at eps index `at`."""
    idx = [i for i, st in enumerate(run["settings"])
           if st["network"] == net and st["label"] == label and run["diverged"][i] == 0]
    return float(run["robust"][idx, 1, at].mean()) if idx else math.nan


def section_batchnorm(s: Study) -> list[str]:
    """Batch normalization placements x batch size x learning rate."""
    out = table(s)
    for net in s.networks():
        def a(bn, bs, lr):
            return s.acc(net, f"batchnorm={bn} batch_size={bs} lr={lr}")
        label = lambda bn, bs, lr: f"batchnorm={bn} batch_size={bs} lr={lr}"
        out.append(verdict(s.beats(net, label("before", 1024, 0.001), label("before", 16, 0.001)),
                           f"{NAMES[net]}: with batch norm, batch 1024 (better batch statistics) "
                           "beats batch 16 at equal epochs (lr 1e-3)",
                           f"1024: {pct(a('before', 1024, 0.001))}, "
                           f"16: {pct(a('before', 16, 0.001))}"))
        for bs in (16, 1024):
            best = max(("before", "after"), key=lambda p: a(p, bs, 0.1) or 0.0)
            out.append(verdict(s.beats(net, label(best, bs, 0.1), label("none", bs, 0.1)),
                               f"{NAMES[net]}: batch norm lets the large learning rate 0.1 "
                               f"train better (batch {bs})",
                               f"batch norm {best} {pct(a(best, bs, 0.1))}, "
                               f"without {pct(a('none', bs, 0.1))}"))
        out += stale_running_averages(s, net)
    return out


def stale_running_averages(s: Study, net: str) -> list[str]:
    """A caution for each batch-norm setting whose test accuracy (running averages) lags its
    train accuracy (batch statistics) by over 20 points, with how much of the running averages'
    initial value was still left after training (from the recorded training-set size)."""
    out = []
    for label in s.labels(net):
        row = s.rows[(net, label)]
        member = next(m for m in s.run["settings"] if m["network"] == net and m["label"] == label)
        if member["batchnorm"] == "none" or row["n_diverged"] == row["n"]:
            continue
        if row["train_acc_mean"] - row["test_acc_mean"] > 0.2:
            updates = member["epochs"] * (s.run["n_train"] // member["batch_size"])
            left = member["bn_momentum"] ** updates
            cause = ("the test number measures stale statistics, not what training reached"
                     if left >= 0.01 else "staleness does not explain the gap")
            out.append(f"- Caution, {NAMES[net]} {label}: train accuracy "
                       f"{pct(row['train_acc_mean'])} (batch statistics) but test "
                       f"{pct(row['test_acc_mean'])} (running averages). With momentum "
                       f"{member['bn_momentum']} the running averages had {updates} updates, "
                       f"so {100 * left:.0f} % of their initial values remained: {cause}.")
    return out


# Published test errors on this split (7,291 / 2,007), beside which the CNN's best recipe is set.
PUBLISHED = [("human", "~2.5 %"),
             ("tangent distance, kernel density (Keysers et al. 2000)", "2.2 %"),
             ("LeNet (LeCun et al. 1989)", "~5 %")]


def section_beyond(s: Study, final: Study | None, baseline: Study | None) -> list[str]:
    """Recipes for the study's CNN compared on validation only (and the FC beside it); the chosen
    one retrained on every training image, for the CNN as ensembles of independently seeded
    members, and for the FC and LC as far as the sweep ran them, each tested once and set beside
    the network's default training (`baseline`)."""
    out = []
    for net in s.networks():
        out += [f"{NAMES[net]}:", "",
                "| recipe | members | validation accuracy | test accuracy (not used to choose) |",
                "|---|---|---|---|"]
        for label in s.labels(net):
            row, val = s.rows[(net, label)], s.acc(net, label)
            shown = ("diverged" if val is None
                     else f"{pct(val)} ± {100 * row['val_acc_std']:.2f}")
            out.append(f"| {label} | {row['n']} | {shown} | {s.cell(net, label)} |")
        out.append("")
    order = rank(s, "cnn")
    chosen, runner_up = order[0], order[1] if len(order) > 1 else order[0]
    out += [f"Chosen on the CNN's validation ({s.run['validation']} held-out training images): "
            f"**{chosen[0]}**, {pct(chosen[1])}; next {runner_up[0]}, {pct(runner_up[1])}. One "
            f"validation image is {100 / s.run['validation']:.2f} points, so candidates this "
            f"close are a draw, not a ranking. The search took "
            f"{s.run['wall_time_s'] / 60:.0f} min on {s.run['device']}."]
    for net in (n for n in s.networks() if n != "cnn"):
        best = rank(s, net)[0]
        out.append(f"For the {NAMES[net]} the recipes rank differently: its best on validation "
                   f"is {best[0]} ({pct(best[1])}), the CNN's choice {pct(s.acc(net, chosen[0]))}."
                   if best[0] != chosen[0] else
                   f"The {NAMES[net]}'s best on validation is the same recipe ({pct(best[1])}).")
    out.append("")
    if final is None:
        return out + ["Not retrained yet: `python -m uspsjax.sweep beyond-final`."]
    frun = final.run
    labels = {lab for n in final.networks() for lab in final.labels(n)}
    seeds = len({x["seed"] for x in frun["settings"]})
    ensembles = {(r["network"], r["k"]): r for r in results.ensemble_table(frun)}
    sizes = {net: max(k for n, k in ensembles if n == net) for net in final.networks()}
    out += [verdict(labels == {chosen[0]}, "the retrained recipe is the one chosen on validation",
                    ", ".join(sorted(labels))),
            f"- Retrained on all {frun['n_train']:,} training images, tested once: per network "
            f"{seeds} independent ensembles, each member its own seed, every group trained as one "
            f"vectorized population ({frun['wall_time_s'] / 60:.0f} min on {frun['device']}).",
            "", "| model | test error | test accuracy |", "|---|---|---|"]
    for net in final.networks():
        [label] = final.labels(net)
        row = final.rows[(net, label)]
        out.append(f"| uspsjax {NAMES[net]}, one member (mean ± std over {row['n']}) | "
                   f"{100 * (1 - row['test_acc_mean']):.2f} % | {final.cell(net, label)} |")
        if sizes[net] > 1:
            ens = ensembles[(net, sizes[net])]
            out.append(f"| uspsjax {NAMES[net]}, {sizes[net]}-member ensemble (mean ± std over "
                       f"{seeds}) | {100 * (1 - ens['ensemble_mean']):.2f} % | "
                       f"{100 * ens['ensemble_mean']:.2f} ± {100 * ens['ensemble_std']:.2f} |")
    out += [f"| {name} | {text} | — |" for name, text in PUBLISHED]
    out.append("")
    for net in final.networks() if baseline else ():
        label = final.labels(net)[0]
        ours, base = final.acc(net, label), baseline.acc(net, "default")
        if ours is not None and base is not None:
            row = final.rows[(net, label)]
            noise = math.hypot(row["test_acc_std"], baseline.rows[(net, "default")]["test_acc_std"])
            out.append(verdict(None if abs(ours - base) <= noise else ours > base,
                               f"{NAMES[net]}: one member trained with the recipe beats the "
                               "default training of Task 1",
                               f"{pct(ours)} vs {pct(base)} (train accuracy on the recipe's "
                               f"augmented images {pct(row['train_acc_mean'])})"))
    row = final.rows[("cnn", final.labels("cnn")[0])]
    ens = ensembles[("cnn", sizes["cnn"])]
    out += ["", verdict(1 - ens["ensemble_mean"] <= 0.022,
                        "target: the CNN ensemble's test error is at most 2.2 %",
                        f"{100 * (1 - ens['ensemble_mean']):.2f} % ± "
                        f"{100 * ens['ensemble_std']:.2f}"),
            verdict(1 - row["test_acc_mean"] <= 0.025,
                    "target: one CNN's test error is at most 2.5 %",
                    f"{100 * (1 - row['test_acc_mean']):.2f} % ± {100 * row['test_acc_std']:.2f}")]
    return out + ["", *figures("beyond-final", ("bagging",))]


SECTIONS = [
    ("baseline", "Task 1 — the three networks", section_baseline, ()),
    ("init", "Task 2.1 — parameter initialization", section_init, ()),
    ("lr", "Task 2.2 — learning rate", section_lr, ()),
    ("batch", "Task 2.3 — batch size", section_batch, ()),
    ("momentum", "Task 2.4 — momentum", section_momentum, ()),
    ("bagging", "Task 3.1 — bagging ensembles", section_bagging, ("bagging",)),
    ("dropout", "Task 3.2 — dropout", section_dropout, ()),
    ("l1", "Task 3.3 — L1 activity penalty", section_l1, ()),
    ("adversarial", "Task 4 — adversarial training", section_adversarial, ("robust",)),
    ("batchnorm", "Beyond the study — batch normalization", section_batchnorm, ()),
    ("beyond", "Beyond the study — the CNN at the best published USPS error", section_beyond, ()),
]
# Sections that read other sweeps besides their own (each passed as a Study, or None).
PARTNERS = {"momentum": ("lr",), "beyond": ("beyond-final", "baseline")}


def build_report(root: Path) -> str:
    """The text of REPORT.md from the sweeps and benchmarks under `root`."""
    names = [name for name, *_ in SECTIONS] + [p for ps in PARTNERS.values() for p in ps]
    studies = {name: Study(results.read_metrics(root / name / "metrics.h5"))
               for name in dict.fromkeys(names) if (root / name / "metrics.h5").is_file()}
    lines = ["# uspsjax reproduction report", "",
             "Every number below is read from `results/*/metrics.h5` by `python -m uspsjax.report`; "
             "accuracies are final-epoch test accuracy, mean ± std (sample) over seeds, "
             "diverged members left out and counted.", ""]
    if studies:
        by_device = {}
        for name, st in studies.items():
            by_device.setdefault(st.run["device"], (st.run["versions"], []))[1].append(name)
        total = sum(st.run["wall_time_s"] for st in studies.values())
        for device, (versions, names) in sorted(by_device.items()):
            lines += [f"- Device: {device} ({', '.join(names)}); packages: "
                      + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]
        lines += [f"- Total wall time: {total / 60:.1f} min "
                  + "(" + ", ".join(f"{n} {st.run['wall_time_s']:.0f} s"
                                    for n, st in studies.items()) + ")"]
    benches = sorted(p.name for p in (root / "bench").glob("*.md")) if (root / "bench").is_dir() else []
    if benches:
        lines.append("- Benchmarks: " + ", ".join(f"[{b}](bench/{b})" for b in benches))
    lines.append("")
    for name, title, section, extra in SECTIONS:
        lines += [f"## {title}", ""]
        study = studies.get(name)
        if study is None:
            lines += [f"Not run yet: `python -m uspsjax.sweep {name}`.", ""]
            continue
        run = study.run
        lines += [run["description"], "",
                  f"Settings as run: {_epochs_note(study)}; {run['programs']} compiled programs, "
                  f"{len(run['settings'])} members, {run['wall_time_s']:.0f} s on {run['device']}."
                  + (f" Overrides: {results.describe_overrides(run['overrides'])}."
                     if run["overrides"] else ""), ""]
        lines += section(study, *(studies.get(p) for p in PARTNERS.get(name, ())))
        lines += ["", *figures(name, extra), ""]
    return "\n".join(lines)


def _epochs_note(study: Study) -> str:
    """Epochs and seeds per network, as actually run."""
    parts = []
    for net in study.networks():
        seeds = {s["seed"] for s in study.run["settings"] if s["network"] == net}
        parts.append(f"{NAMES[net]} {study.epochs(net)} epochs × {len(seeds)} seeds")
    return ", ".join(parts)


@cli.command
def main(argv=None) -> int:
    """Write RESULTS/REPORT.md atomically; exit status 2 with a one-line error on bad input."""
    parser = cli.Parser(prog="python -m uspsjax.report", description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results", help="the results folder (default results/)")
    args = parser.parse_args(argv)
    root = Path(args.results)
    if not root.is_dir():
        raise InputError(f"{root}: no such results folder")
    cli.check_out(root)
    try:
        text = build_report(root)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{root}: cannot read the results ({e})") from None
    tmp = root / "REPORT.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, root / "REPORT.md")
    print(root / "REPORT.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
