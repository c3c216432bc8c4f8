"""Rebuild `results/REPORT.md` from what is in `results/`, without training anything.

    python -m uspsjax.report [--results results]

For every experiment of the study: its number where it gave one, uspsjax's mean ± std over
seeds, the figures, and one line per claim with its verdict under the one rule (`judge`, stated
at the top of the report) and the evidence; a coverage table says where, with what and at what
scale each sweep's rows ran. Every verdict is computed from the committed `metrics.h5` files, so
the report is byte-for-byte reproducible from `results/`.
"""

import json
import math
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uspsjax import cli, results
from uspsjax.attacks import ATTACKS
from uspsjax.errors import InputError
from uspsjax.grid import SETTING_DEFAULTS, STUDY_ORDER
from uspsjax.models import NETWORKS

RULE = ("**The verdict rule** (one for every claim below, `report.judge`): a claim holds or fails "
        "only when the difference of the two means is larger than the noise, "
        "sqrt(std_a² + std_b²), with std the sample std (ddof = 1) over seeds (or over members, "
        "for ensembles over independent ensembles); otherwise it is **undecided**. The noise is "
        "the spread of single trainings, not the standard error of their means, because every "
        "claim is about what one training (or one ensemble) of a recipe gives, and because with "
        "2-3 seeds the standard error is itself too poorly known to lean on. A fixed number (the "
        "study's single figure, a target such as test error <= 2.5 %) has no noise of its own: "
        "the interval mean ± std must lie wholly on one side of it. One seed gives no spread, so "
        "it decides nothing; a setting that diverged in every seed loses to one that trained. "
        "A network whose run has fewer epochs, seeds or ensemble members than its sweep file "
        "sets (its `[base]`/`[per_network]` tables and `seeds`, not the `[cpu]` tables) is **not "
        "judged**.")


@dataclass(frozen=True)
class Stat:
    """A mean with its sample std over `n` seeds (or members); `n` = 0 marks a fixed number (a
    target, the study's single figure) and `mean` None a setting that diverged in every seed."""

    mean: float | None
    std: float = 0.0
    n: int = 0

    @classmethod
    def of(cls, values) -> "Stat":
        """The Stat of per-seed values; NaN (diverged) values are left out."""
        x = np.asarray(values, np.float64)
        x = x[np.isfinite(x)]
        if not x.size:
            return cls(None, math.nan, 0)
        return cls(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0, int(x.size))


def judge(a: Stat, b: Stat) -> bool | None:
    """The one verdict rule (`RULE`): True when `a` is above `b` by more than the noise, False
    when below by more, None (undecided) when within it or when either is a single seed."""
    if a.mean is None or b.mean is None:
        return None if a.mean is b.mean else b.mean is None
    if a.n == 1 or b.n == 1:
        return None
    difference = a.mean - b.mean
    return None if abs(difference) <= math.hypot(a.std, b.std) else difference > 0


def all_of(verdicts) -> bool | None:
    """A claim made of several comparisons: holds when all hold, fails when any fails."""
    verdicts = list(verdicts)
    return False if False in verdicts else (None if None in verdicts else True)


def negate(holds: bool | None) -> bool | None:
    """The verdict on the opposite claim (undecided stays undecided)."""
    return None if holds is None else not holds


def full_scale(run: results.Run, net: str) -> dict:
    """What the run's sweep text sets for `net` at full scale: epochs, seeds and ensemble members
    where it sets them (its `[cpu]` tables, a CPU's reduced scale, deliberately ignored)."""
    raw = tomllib.loads(run.sweep_text)
    scale = {"seeds": raw.get("seeds"), "members": raw.get("ensemble", {}).get("size")}
    scale["epochs"] = raw.get("per_network", {}).get(net, {}).get(
        "epochs", raw.get("base", {}).get("epochs"))
    return {k: v for k, v in scale.items() if v is not None}


def net_name(net: str) -> str:
    """A network as the report names it: its key in capitals ('FC', 'LC', 'CNN')."""
    return net.upper()


class Study:
    """One sweep's results with lookups by network and setting. A setting is found by its
    values (`label`), never by the spelling of its label, which the sweep file chose; the label
    found is what the reader is shown. Comparisons use the validation split when the sweep held
    one out (`on` = "val"), else the test set, as the study itself compared."""

    def __init__(self, run: results.Run):
        self.run = run
        self.rows = {(r["network"], r["label"]): r for r in results.summarize(run)}
        self.on = "val" if "val_acc" in run.metrics else "test"

    def networks(self) -> list[str]:
        """The networks this sweep ran, in the order of `models.NETWORKS` (then any network it
        does not know, as `results.summarize` orders them)."""
        return list(dict.fromkeys(net for net, _ in self.rows))

    def settings(self, net: str) -> list[dict]:
        """The settings of `net`'s members, in member order."""
        return [s for s in self.run.settings if s["network"] == net]

    def labels(self, net: str) -> list[str]:
        """The settings run for `net`, in sweep order."""
        return [label for n, label in self.rows if n == net]

    def label(self, net: str, **values) -> str | None:
        """The label of the setting of `net` whose members' settings equal `values` by value
        (`results.same_value`: `lr=1e-3` finds the setting however the sweep file spelled 0.001,
        or whatever label it gave it); with no values, `net`'s one setting. None when no setting
        matches; ValueError when several do (the values do not tell them apart) or a key is not
        a recorded setting."""
        mine = self.settings(net)
        unknown = [k for k in values if mine and k not in mine[0]]
        if unknown:
            raise ValueError(f"{self.run.name}: no setting {unknown[0]!r} recorded")
        found = [label for label in dict.fromkeys(s["label"] for s in mine)
                 if all(results.same_value(s[k], v) for s in mine if s["label"] == label
                        for k, v in values.items())]
        if len(found) > 1:
            asked = spell(values) or "the one setting"
            raise ValueError(f"{self.run.name} {net_name(net)}: {asked} is ambiguous: "
                             f"{len(found)} settings match ({'; '.join(found)})")
        return found[0] if found else None

    def axes(self, net: str) -> list[str]:
        """The settings whose values differ between `net`'s settings: the sweep's axes as run."""
        mine = self.settings(net)
        return [k for k in mine[0] if k in SETTING_DEFAULTS  # settings, not seed, bag, label
                and any(not results.same_value(s[k], mine[0][k]) for s in mine)]

    def acc(self, net: str, label: str) -> float | None:
        """Mean final accuracy of a setting on the `on` split; None when every seed diverged or
        it is absent."""
        return self.stat(net, label).mean

    def stat(self, net: str, label: str, split: str | None = None) -> Stat:
        """Final accuracy of a setting on `split` (default: the `on` split) as a Stat over its
        healthy seeds; mean None when every seed diverged or the setting is absent."""
        row = self.rows.get((net, label))
        if row is None or row["n_diverged"] == row["n"]:
            return Stat(None)
        split = split or self.on
        return Stat(row[f"{split}_acc_mean"], row[f"{split}_acc_std"], row["n"] - row["n_diverged"])

    def beats(self, net: str, a: str, b: str) -> bool | None:
        """`judge` on the final accuracies of settings `a` and `b`."""
        return judge(self.stat(net, a), self.stat(net, b))

    def members(self, net: str, label: str | None) -> list[int]:
        """Indices of the healthy members of a setting (none for None, a setting not run)."""
        return [i for i, s in enumerate(self.run.settings) if s["network"] == net
                and s["label"] == label and self.run.diverged[i] == 0]

    def cell(self, net: str, label: str) -> str:
        """Test accuracy as 'mean ± std %', or how it diverged."""
        row = self.rows.get((net, label))
        if row is None:
            return "not run"
        if row["n_diverged"] == row["n"]:
            return f"diverged ({row['n']}/{row['n']})"
        text = f"{100 * row['test_acc_mean']:.2f} ± {100 * row['test_acc_std']:.2f}"
        return text + (f" ({row['n_diverged']}/{row['n']} diverged)" if row["n_diverged"] else "")

    def curve(self, net: str, label: str, epoch: int) -> Stat:
        """Test accuracy at a 1-based epoch over the setting's healthy members."""
        idx = self.members(net, label)
        metric = list(self.run.metrics).index("test_acc")
        return Stat.of(self.run.curves[idx, epoch - 1, metric])

    def epochs(self, net: str) -> int:
        """The epochs a network's members trained in this sweep."""
        return max(s["epochs"] for s in self.settings(net))

    def as_run(self, net: str) -> dict:
        """Epochs, seeds and ensemble members (the largest bag; 0 when not bagging) of `net`."""
        mine = self.settings(net)
        return {"epochs": self.epochs(net), "seeds": len({s["seed"] for s in mine}),
                "members": max(s["bag"] for s in mine)}

    def reduced(self, net: str) -> str | None:
        """'ran 1 of 20 epochs' (and so on) where `net` ran below its sweep's full scale, else
        None."""
        ran, full = self.as_run(net), full_scale(self.run, net)
        short = [f"ran {ran[k]} of {count(full[k], k)}" for k in ("epochs", "seeds", "members")
                 if k in full and ran[k] < full[k]]
        return ", ".join(short) or None


def spell(values: dict) -> str:
    """Settings by value as 'lr=0.001 momentum=0.0', for a setting that has no label to show."""
    return " ".join(f"{k}={v}" for k, v in values.items())


def pct(x: float | None) -> str:
    """A fraction as a percentage, or 'diverged' when None."""
    return "diverged" if x is None or math.isnan(x) else f"{100 * x:.2f} %"


def spread(x: Stat) -> str:
    """A Stat as 'mean % ± std'."""
    return pct(x.mean) + (f" ± {100 * x.std:.2f}" if x.mean is not None and x.n > 1 else "")


def verdict(holds: bool | None, claim: str, evidence: str, *scoped: tuple) -> str:
    """One line: the claim, its verdict under the rule, and the numbers that show it. `scoped`
    are the (Study, network, label, ...) the claim rests on, with the labels of the settings it
    compares (None for one the run lacks): if a setting was not run the claim is not run; if a
    network ran below its sweep's full scale the claim is not judged."""
    absent = [f"{s.run.name} {net_name(net)}" for s, net, *labels in scoped if None in labels]
    short = [f"{s.run.name} {net_name(net)} {note}" for s, net, *_ in scoped
             if (note := s.reduced(net))]
    if absent:
        word = f"**not run** (a setting it compares is not in {', '.join(absent)})"
    elif short:
        word = f"**not judged** ({'; '.join(short)})"
    else:
        word = {True: "**holds**", False: "**does not hold**",
                None: "**undecided** (within the noise)"}[holds]
    return f"- {claim}: {word} — {evidence}."


def evidence_of(study: Study, net: str, labels) -> str:
    """'a 97.10 % ± 0.20, b 93.00 % ± 0.40' for settings of a network, in sweep order."""
    return ", ".join(f"{label} {spread(study.stat(net, label))}" for label in labels
                     if label is not None)


def table(study: Study, study_numbers: dict | None = None) -> list[str]:
    """A network x setting table of final test accuracy (mean ± std over seeds)."""
    lines = ["| network | setting | seeds | test accuracy (ours) | study |",
             "|---|---|---|---|---|"]
    for net in study.networks():
        for label in study.labels(net):
            row = study.rows[(net, label)]
            theirs = (study_numbers or {}).get(net, {}).get("test_acc")
            lines.append(f"| {net_name(net)} | {label} | {row['n']} | {study.cell(net, label)} | "
                         f"{pct(theirs) if theirs is not None else '—'} |")
    return lines


def figures(name: str, extra: tuple = ()) -> list[str]:
    """Links to a sweep's figures."""
    return [" ".join(f"![{name} {f}]({name}/{f}.png)" for f in ("accuracy", "loss", *extra))]


def section_baseline(s: Study) -> list[str]:
    """Task 1: the three networks against the study's test accuracy."""
    out = table(s, s.run.study)
    for net in s.networks():
        default = s.label(net)  # the sweep's one setting
        ours, theirs = s.stat(net, default), s.run.study.get(net, {}).get("test_acc")
        if theirs is not None:
            out.append(verdict(judge(ours, Stat(theirs)),
                               f"uspsjax's {net_name(net)} reaches more than the study's accuracy",
                               f"{spread(ours)} (ours, {s.epochs(net)} epochs) vs {pct(theirs)}",
                               (s, net, default)))
    return out


def section_best_worst(s: Study, best: dict, worst: dict | None, what: str) -> list[str]:
    """Claims of the form 'BEST gives the highest accuracy (and WORST the lowest)' per net, the
    settings given by value: BEST must beat every other setting under the rule (WORST lose to
    every other)."""
    out = table(s)
    for net in s.networks():
        top = s.label(net, **best)
        others = [label for label in s.labels(net) if label != top]
        out.append(verdict(all_of(s.beats(net, top, o) for o in others),
                           f"{net_name(net)}: {top or spell(best)} gives the best {what}",
                           evidence_of(s, net, s.labels(net)), (s, net, top)))
        if worst:
            low = s.label(net, **worst)
            others = [label for label in s.labels(net) if label != low]
            out.append(verdict(all_of(s.beats(net, o, low) for o in others),
                               f"{net_name(net)}: {low or spell(worst)} gives the lowest accuracy",
                               evidence_of(s, net, s.labels(net)), (s, net, low)))
    return out


def diverged_members(s: Study, **values) -> tuple[int, int]:
    """(diverged, total) members of a setting given by value, over all networks."""
    rows = [s.rows[(net, label)] for net in s.networks() if (label := s.label(net, **values))]
    return sum(r["n_diverged"] for r in rows), sum(r["n"] for r in rows)


def section_init(s: Study) -> list[str]:
    """Task 2.1: initializers."""
    huge = {"init": "constant", "init_scale": 1e5}
    out = section_best_worst(s, {"init": "glorot_uniform"}, huge, "accuracy")
    d, n = diverged_members(s, **huge)
    small = [pct(s.acc(net, s.label(net, init="constant", init_scale=0.01)))
             for net in s.networks()]
    out.append(f"- The study's explanations are wrong. A constant initializer gives every unit "
               f"of a layer the same weights, and gradient descent keeps them identical (the "
               f"symmetry is never broken), so each layer acts as a single unit (for LC: a "
               f"single filter per position, which still learns): Constant(0.01) reaches "
               f"{', '.join(small)} ({', '.join(map(net_name, s.networks()))}) — not because "
               f"it 'learns too fast'. Constant(1e5) is not 'slow': its activations overflow "
               f"and {d} of {n} members diverged (NaN loss).")
    return out


def section_lr(s: Study) -> list[str]:
    """Task 2.2: learning rates."""
    out = section_best_worst(s, {"lr": 1e-3}, None, "accuracy")
    if "lc" in s.networks():
        low = s.label("lc", lr=1e-6)
        others = [label for label in s.labels("lc") if label != low]
        out.append(verdict(all_of(s.beats("lc", o, low) for o in others),
                           "LC: lr 1e-6 gives the lowest LC accuracy",
                           evidence_of(s, "lc", s.labels("lc")), (s, "lc", low)))
    d, n = diverged_members(s, lr=50)
    fifty = {net: s.acc(net, s.label(net, lr=50)) for net in s.networks()}
    alive = [f"{net_name(net)} {pct(acc)}" for net, acc in fifty.items() if acc is not None]
    out.append(f"- lr 50 does not 'converge quickly to a local optimum': {d} of {n} members "
               f"diverged (NaN loss)" + (f"; the others ended at {', '.join(alive)} (chance, "
                                         f"the largest class, is 17.9 %)" if alive else "")
               + f". lr 1e-6 is simply too small to move in {s.epochs(s.networks()[0])} epochs.")
    return out


def section_batch(s: Study) -> list[str]:
    """Task 2.3: batch sizes at equal epochs."""
    out = table(s)
    for net in s.networks():
        size = 32 if net == "lc" else 1024
        small, large = s.label(net, batch_size=16), s.label(net, batch_size=size)
        a, b = s.stat(net, small), s.stat(net, large)
        out.append(verdict(judge(a, b), f"{net_name(net)}: batch 16 beats {size} at equal epochs",
                           f"16: {spread(a)}, {size}: {spread(b)}", (s, net, small, large)))
    out.append("- At equal epochs a batch of 1024 takes 64 times fewer steps than 16; at a "
               "fixed learning rate that, not 'gradient quality', is why it lags.")
    return out


def section_momentum(s: Study, lr: Study | None) -> list[str]:
    """Task 2.4: momentum, against no momentum (the lr sweep's lr 1e-3, same settings)."""
    out = table(s)
    for net in s.networks():
        e = min(10, s.epochs(net), lr.epochs(net) if lr and net in lr.networks() else 10)
        plain = lr.label(net, lr=1e-3, momentum=0) if lr and net in lr.networks() else None
        without = lr.curve(net, plain, e) if plain else None
        labels = {m: s.label(net, momentum=m) for m in (0.9, 0.99)}
        at = {m: s.curve(net, label, e) for m, label in labels.items()}
        if without is not None and without.mean is not None:
            out.append(verdict(all_of(judge(v, without) for v in at.values()),
                               f"{net_name(net)}: momentum 0.9 and 0.99 beat no momentum by "
                               f"epoch {e}",
                               f"test accuracy at epoch {e}: 0.9 {spread(at[0.9])}, "
                               f"0.99 {spread(at[0.99])}, none (the lr sweep's lr 1e-3) "
                               f"{spread(without)}", (s, net, *labels.values()), (lr, net, plain)))
        out.append(verdict(s.beats(net, labels[0.99], labels[0.9]),
                           f"{net_name(net)}: momentum 0.99 beats 0.9 (final)",
                           evidence_of(s, net, (labels[0.99], labels[0.9])),
                           (s, net, *labels.values())))
    return out


STUDY_BAGGING = {"fc": [(0.926, 0.926), (0.924, 0.933), (0.928, 0.931), (0.933, 0.934),
                        (0.179, 0.179), (0.917, 0.179)],
                 "cnn": [(0.939, 0.939), (0.947, 0.954), (0.950, 0.955), (0.941, 0.956),
                         (0.944, 0.959), (0.933, 0.958)]}


def ensemble_stat(study: Study, row: dict) -> Stat:
    """A row of `results.ensemble_table` as the Stat of its ensembles (one per seed)."""
    seeds = len({s["seed"] for s in study.run.settings if s["network"] == row["network"]})
    return Stat(row["ensemble_mean"], row["ensemble_std"], seeds)


def section_bagging(s: Study) -> list[str]:
    """Task 3.1: bagging ensembles, k = 1..K, beside the study's table."""
    rows = results.ensemble_table(s.run)
    out = ["| network | k | single (ours) | ensemble (ours) | left out | study single | "
           "study ensemble |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        theirs = STUDY_BAGGING.get(r["network"], [])
        single, ens = theirs[r["k"] - 1] if r["k"] <= len(theirs) else ("—", "—")
        out.append(f"| {net_name(r['network'])} | {r['k']} | "
                   f"{100 * r['single_mean']:.2f} ± {100 * r['single_std']:.2f} | "
                   f"{100 * r['ensemble_mean']:.2f} ± {100 * r['ensemble_std']:.2f} | "
                   f"{r['left_out']}/{r['n_members']} | "
                   f"{single if single == '—' else pct(single)} | "
                   f"{ens if ens == '—' else pct(ens)} |")
    for net in s.networks():
        mine = [r for r in rows if r["network"] == net]
        if not mine:
            continue
        # The whole ensemble, its size fixed in advance (the best k would be chosen on test),
        # against every single member of the sweep.
        whole, [label] = ensemble_stat(s, mine[-1]), s.labels(net)
        single = s.stat(net, label, "test")
        out.append(verdict(judge(whole, single),
                           f"{net_name(net)}: a {mine[-1]['k']}-member ensemble beats a single "
                           "member",
                           f"{spread(whole)} (over {whole.n} ensembles) vs {spread(single)} "
                           f"(over {single.n} single members)", (s, net)))
        if net == "cnn":
            out.append(verdict(judge(whole, Stat(0.978)),
                               "target: a bagged CNN reaches test error <= 2.2 % (tangent "
                               "distance, Keysers et al. 2000)",
                               f"the {mine[-1]['k']}-member ensemble {spread(whole)}, error "
                               f"{100 * (1 - whole.mean):.2f} %", (s, net)))
    left = sum(r["left_out"] for r in rows if r["k"] == max(x["k"] for x in rows))
    out.append(f"- The study's 6-member Dense ensemble at 0.179 is an averaging bug, not a "
               f"property of bagging: its 5th member had diverged (0.179 alone) and was averaged "
               f"in. uspsjax leaves diverged members out and reports them ({left} left out here).")
    return out


def section_dropout(s: Study) -> list[str]:
    """Task 3.2: dropout placement and rate."""
    out = table(s)
    if "cnn" in s.networks():
        dense, conv = (s.label("cnn", dropout_at=at, dropout_conv=0.5, dropout_dense=0.5)
                       for at in ("dense", "conv"))
        out.append(verdict(s.beats("cnn", dense, conv),
                           "CNN: dropout after the dense layer works better than after the "
                           "convolutions (rate 0.5)",
                           evidence_of(s, "cnn", (dense, conv)), (s, "cnn", dense, conv)))
    for net in s.networks():
        gaps = [(label, s.rows[(net, label)]["loss_gap_mean"]) for label in s.labels(net)]
        text = ", ".join(f"{label} {g:+.3f}" for label, g in gaps if not math.isnan(g))
        out.append(f"- {net_name(net)}: test − train loss per setting: {text}.")
    return out


def section_l1(s: Study) -> list[str]:
    """Task 3.3: L1 activity penalties, every penalty against none (no best-of selection)."""
    out = table(s)
    for net in s.networks():
        none = s.label(net, l1=0)
        penalties = [label for label in s.labels(net) if label != none]
        # "Does not improve" holds only when every penalty is worse beyond the noise.
        out.append(verdict(all_of(negate(s.beats(net, p, none)) for p in penalties),
                           f"{net_name(net)}: an L1 activity penalty does not improve accuracy",
                           evidence_of(s, net, s.labels(net)), (s, net, none)))
    return out


def section_adversarial(s: Study) -> list[str]:
    """Task 4: adversarial training, judged by accuracy under attack. Declared in advance: each
    adversarial training is compared with standard training on its own (PGD-20 at eps 0.1, and
    clean accuracy), so no training is picked by its test numbers."""
    out = table(s)
    run, eps = s.run, list(s.run.attack_eps)
    if run.robust is not None and eps:
        head = " | ".join(f"{results.ATTACK_TITLES[a]} {e}" for a in ATTACKS for e in eps)
        out += ["", f"| network | training | clean | {head} |",
                "|---|---|---|" + "---|" * len(ATTACKS) * len(eps)]
        for net in s.networks():
            for label in s.labels(net):
                idx = s.members(net, label)
                rob = (run.robust[idx].mean(axis=0) if idx
                       else np.full(run.robust.shape[1:], np.nan))
                cells = " | ".join(pct(float(v)) for v in rob.reshape(-1))
                out.append(f"| {net_name(net)} | {label} | {s.cell(net, label)} | {cells} |")
        at, pgd = eps.index(0.1) if 0.1 in eps else 0, ATTACKS.index("pgd20")
        for net in s.networks():
            plain = s.label(net, adversarial="none")
            standard = Stat.of(run.robust[s.members(net, plain), pgd, at])
            for label in (lab for lab in s.labels(net) if lab != plain):
                robust = Stat.of(run.robust[s.members(net, label), pgd, at])
                out.append(verdict(judge(robust, standard),
                                   f"{net_name(net)}: {label} training raises "
                                   f"{results.ATTACK_TITLES['pgd20']} accuracy at eps {eps[at]}",
                                   f"{spread(robust)} vs standard {spread(standard)}",
                                   (s, net, plain)))
            for label in (lab for lab in s.labels(net) if lab != plain):
                out.append(verdict(s.beats(net, label, plain),
                                   f"{net_name(net)}: {label} training improves clean test "
                                   "accuracy (the study's claim)",
                                   evidence_of(s, net, (label, plain)), (s, net, plain)))
    return out


def section_batchnorm(s: Study) -> list[str]:
    """Batch normalization placements x batch size x learning rate; each placement is compared
    with none on its own."""
    out = table(s)
    for net in s.networks():
        def label(bn, bs, lr):
            return s.label(net, batchnorm=bn, batch_size=bs, lr=lr)
        pair = label("before", 1024, 1e-3), label("before", 16, 1e-3)
        out.append(verdict(s.beats(net, *pair),
                           f"{net_name(net)}: with batch norm, batch 1024 (better batch "
                           "statistics) beats batch 16 at equal epochs (lr 1e-3)",
                           evidence_of(s, net, pair), (s, net, *pair)))
        for bs in (16, 1024):
            for bn in ("before", "after"):
                pair = label(bn, bs, 0.1), label("none", bs, 0.1)
                out.append(verdict(s.beats(net, *pair),
                                   f"{net_name(net)}: batch norm {bn} the activation lets the "
                                   f"large learning rate 0.1 train better (batch {bs})",
                                   evidence_of(s, net, pair), (s, net, *pair)))
        out += stale_running_averages(s, net)
    return out


def stale_running_averages(s: Study, net: str) -> list[str]:
    """A caution for each batch-norm setting whose test accuracy (running averages) lags its
    train accuracy (batch statistics) by over 20 points, with how much of the running averages'
    initial value was still left after training (from the recorded training-set size)."""
    out = []
    for label in s.labels(net):
        row = s.rows[(net, label)]
        member = next(m for m in s.settings(net) if m["label"] == label)
        if member["batchnorm"] == "none" or row["n_diverged"] == row["n"]:
            continue
        if row["train_acc_mean"] - row["test_acc_mean"] > 0.2:
            updates = member["epochs"] * (s.run.n_train // member["batch_size"])
            left = member["bn_momentum"] ** updates
            cause = ("the test number measures stale statistics, not what training reached"
                     if left >= 0.01 else "staleness does not explain the gap")
            out.append(f"- Caution, {net_name(net)} {label}: train accuracy "
                       f"{pct(row['train_acc_mean'])} (batch statistics) but test "
                       f"{pct(row['test_acc_mean'])} (running averages). With momentum "
                       f"{member['bn_momentum']} the running averages had {updates} updates, "
                       f"so {100 * left:.0f} % of their initial values remained: {cause}.")
    return out


# Published test errors on this split (7,291 / 2,007), beside which the CNN's best recipe is set.
PUBLISHED = [("human", "~2.5 %"),
             ("tangent distance, kernel density (Keysers et al. 2000)", "2.2 %"),
             ("LeNet (LeCun et al. 1989)", "~5 %")]


def correct(study: Study, net: str, label: str) -> int:
    """Validation images a setting classified correctly, summed over its healthy seeds: the
    exact score that recipes are compared on (means in float32 would split ties by rounding)."""
    row = study.rows[(net, label)]
    return round(row["val_acc_mean"] * study.run.validation * (row["n"] - row["n_diverged"]))


def best_on_validation(study: Study, net: str) -> tuple[list[str], str]:
    """(every recipe tied at the best validation score, in sweep order; the one the tie-break
    declared in `sweeps/beyond.toml` takes: the first of them in the sweep file's order)."""
    scores = {label: correct(study, net, label) for label in study.labels(net)
              if study.acc(net, label) is not None}
    tied = [label for label, c in scores.items() if c == max(scores.values())]
    return tied, tied[0]


def describe_choice(study: Study, net: str) -> str:
    """The best recipe on validation, or the tie and how the declared tie-break settled it."""
    tied, chosen = best_on_validation(study, net)
    row = study.rows[(net, chosen)]
    score = (f"{correct(study, net, chosen):,} of "
             f"{study.run.validation * (row['n'] - row['n_diverged']):,} validation images "
             f"({pct(study.acc(net, chosen))})")
    if len(tied) == 1:
        return f"**{chosen}**, {score}"
    # The run's own sweep text tells whether the tie-break was declared before it ran.
    when = ("before this run" if "tie-break" in study.run.sweep_text
            else "after this run (its recorded sweep text has none)")
    return (f"a {len(tied)}-way tie at {score}: {'; '.join(tied)}. The tie-break declared in "
            f"`sweeps/beyond.toml` {when} (the first tied recipe in the sweep file's order, "
            f"which lists every axis's plainest option first) was used: **{chosen}**")


def section_beyond(s: Study, final: Study | None, baseline: Study | None) -> list[str]:
    """Recipes for the study's CNN compared on validation only (and the FC beside it); the chosen
    one retrained on every training image, for the CNN as ensembles of independently seeded
    members, and for the FC and LC as far as the sweep ran them, each tested once and set beside
    the network's default training (`baseline`)."""
    out = []
    for net in s.networks():
        out += [f"{net_name(net)}:", "",
                "| recipe | members | validation accuracy | test accuracy (not used to choose) |",
                "|---|---|---|---|"]
        for label in s.labels(net):
            row, val = s.rows[(net, label)], s.acc(net, label)
            shown = ("diverged" if val is None
                     else f"{pct(val)} ± {100 * row['val_acc_std']:.2f}")
            out.append(f"| {label} | {row['n']} | {shown} | {s.cell(net, label)} |")
        out.append("")
    chosen = best_on_validation(s, "cnn")[1]
    seeds = s.rows[("cnn", chosen)]["n"]
    out += [f"Chosen on the CNN's validation ({s.run.validation} held-out training images): "
            f"{describe_choice(s, 'cnn')}. One validation image is "
            f"{100 / (s.run.validation * seeds):.2f} points of a mean over {seeds} seeds, so "
            f"candidates this close are a draw, not a ranking. The search took "
            f"{s.run.wall_time_s / 60:.0f} min."]
    for net in (n for n in s.networks() if n != "cnn"):
        out.append(f"For the {net_name(net)} the best on validation is {describe_choice(s, net)}; "
                   f"the CNN's choice scores {pct(s.acc(net, chosen))}.")
    out.append("")
    if final is None:
        return out + ["Not retrained yet: `python -m uspsjax.sweep beyond-final`."]
    frun = final.run
    [retrained] = {lab for n in final.networks() for lab in final.labels(n)}
    tied = best_on_validation(s, "cnn")[0]
    # The retrained recipe as the search labelled it: its setting with the same values on the
    # search's axes (the two sweep files may spell it differently).
    recipe = next(m for m in frun.settings if m["label"] == retrained)
    searched = s.label("cnn", **{k: recipe[k] for k in s.axes("cnn")})
    if searched == chosen:
        out.append(f"- The retrained recipe is the one chosen on validation: {retrained}.")
    elif searched in tied:
        out.append(f"- The retrained recipe, {retrained}, is tied for the best on validation but "
                   f"is not the declared tie-break's choice ({chosen}): its test numbers below "
                   f"stand for a recipe tied for best on validation, not for the rule's pick.")
    else:
        out.append(f"- The retrained recipe, {retrained}, is not among the best on validation "
                   f"({chosen}).")
    ensembles = {(r["network"], r["k"]): r for r in results.ensemble_table(frun)}
    sizes = {net: final.as_run(net)["members"] for net in final.networks()}
    out += [f"- Retrained on all {frun.n_train:,} training images, tested once: per network "
            f"independent ensembles, each member its own seed, every group trained as one "
            f"vectorized population ({frun.wall_time_s / 60:.0f} min; devices in the coverage "
            f"table).", "", "| model | test error | test accuracy |", "|---|---|---|"]
    for net in final.networks():
        one = final.stat(net, retrained, "test")
        out.append(f"| uspsjax {net_name(net)}, one member (mean ± std over {one.n}) | "
                   f"{100 * (1 - one.mean):.2f} % | {final.cell(net, retrained)} |")
        if sizes[net] > 1:
            ens = ensemble_stat(final, ensembles[(net, sizes[net])])
            out.append(f"| uspsjax {net_name(net)}, {sizes[net]}-member ensemble (mean ± std over "
                       f"{ens.n}) | {100 * (1 - ens.mean):.2f} % | "
                       f"{100 * ens.mean:.2f} ± {100 * ens.std:.2f} |")
    out += [f"| {name} | {text} | — |" for name, text in PUBLISHED]
    out.append("")
    for net in final.networks() if baseline else ():
        default = baseline.label(net) if net in baseline.networks() else None
        one, base = final.stat(net, retrained, "test"), baseline.stat(net, default)
        if one.mean is not None and base.mean is not None:
            out.append(verdict(judge(one, base),
                               f"{net_name(net)}: one member trained with the recipe beats the "
                               "default training of Task 1",
                               f"{spread(one)} vs {spread(base)} (train accuracy on the recipe's "
                               "augmented images "
                               f"{pct(final.rows[(net, retrained)]['train_acc_mean'])})",
                               (final, net), (baseline, net)))
    for net in final.networks():
        if sizes[net] > 1:
            ens = ensemble_stat(final, ensembles[(net, sizes[net])])
            out.append(verdict(judge(ens, final.stat(net, retrained, "test")),
                               f"{net_name(net)}: a {sizes[net]}-member ensemble beats one member "
                               "(a real gain, not one within the noise)",
                               f"{spread(ens)} vs {spread(final.stat(net, retrained, 'test'))}",
                               (final, net)))
    if "lc" in final.networks() and baseline and "lc" in baseline.networks():
        out.append("- Hypothesis, not tested: the LC, without shared weights, may underfit the "
                   "recipe's shifted and transformed images (its train accuracy on them is "
                   f"{pct(final.rows[('lc', retrained)]['train_acc_mean'])}); the test would be "
                   "the LC with the recipe but without the image transforms, on validation.")
    if "cnn" in final.networks():
        one = final.stat("cnn", retrained, "test")
        ens = ensemble_stat(final, ensembles[("cnn", sizes["cnn"])])
        out += ["", verdict(judge(ens, Stat(0.978)),
                            "target: the CNN ensemble's test error is at most 2.2 %",
                            f"error {100 * (1 - ens.mean):.2f} % ± {100 * ens.std:.2f}",
                            (final, "cnn")),
                verdict(judge(one, Stat(0.975)), "target: one CNN's test error is at most 2.5 %",
                        f"error {100 * (1 - one.mean):.2f} % ± {100 * one.std:.2f}",
                        (final, "cnn"))]
    return out + ["", *figures("beyond-final", ("bagging",))]


# Each sweep's section: its title, how it is written, its extra figures. The study's sweeps come
# in the order `sweep all` runs them (`grid.STUDY_ORDER`), the report's own after them.
SECTION_OF = {
    "baseline": ("Task 1 — the three networks", section_baseline, ()),
    "init": ("Task 2.1 — parameter initialization", section_init, ()),
    "lr": ("Task 2.2 — learning rate", section_lr, ()),
    "batch": ("Task 2.3 — batch size", section_batch, ()),
    "momentum": ("Task 2.4 — momentum", section_momentum, ()),
    "bagging": ("Task 3.1 — bagging ensembles", section_bagging, ("bagging",)),
    "dropout": ("Task 3.2 — dropout", section_dropout, ()),
    "l1": ("Task 3.3 — L1 activity penalty", section_l1, ()),
    "adversarial": ("Task 4 — adversarial training", section_adversarial, ("robust",)),
    "batchnorm": ("Beyond the study — batch normalization", section_batchnorm, ()),
    "beyond": ("Beyond the study — the CNN at the best published USPS error", section_beyond, ()),
}
SECTIONS = [(name, *SECTION_OF[name]) for name in [*STUDY_ORDER, "beyond"]]
# Sections that read other sweeps besides their own (each passed as a Study, or None).
PARTNERS = {"momentum": ("lr",), "beyond": ("beyond-final", "baseline")}


def origin(run: results.Run, net: str) -> tuple[str, bool]:
    """(the device `net`'s rows ran on, whether a `--merge` kept them from an earlier run):
    `results.merge_origin` of the run."""
    device, _, kept = results.merge_origin(run.overrides, run.device, net)
    return device, kept


def provenance(study: Study, net: str) -> tuple[str, dict | None, float]:
    """(device, versions or None where not recorded, wall time in s) of `net`'s rows.

    Versions are shown for the rows the file's newest run trained, and for rows a merge kept
    whose groups are marked `recorded` (their values the run's that trained them). Files written
    before that mark may give a kept group another run's values: they count as not recorded."""
    device, kept = origin(study.run, net)
    run = study.run
    groups = [run.groups[g] for g in dict.fromkeys(
        s["group"] for s in run.settings if s["network"] == net)]
    recorded = not kept or all(g["recorded"] for g in groups)
    versions = groups[0]["versions"] if recorded else None
    return device, versions, sum(g["wall_time_s"] for g in groups)


def count(n: int, things: str) -> str:
    """'1 epoch', '20 epochs': `things` is the plural."""
    return f"{n} {things[:-1] if n == 1 else things}"


def minutes(seconds: float) -> str:
    """A wall time as '45 s' or '12 min'."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def coverage(studies: dict) -> list[str]:
    """The sweep x network table: where and at what scale each network's rows ran, against the
    sweep file's full scale, or 'missing'; then the package versions per cell."""
    # Every network uspsjax knows, then any other that a result holds (from a newer version).
    nets = list(dict.fromkeys([*NETWORKS, *(n for st in studies.values() for n in st.networks())]))
    lines = ["| sweep | " + " | ".join(net_name(n) for n in nets) + " |",
             "|---|" + "---|" * len(nets)]
    version_sets = {}
    for name, st in studies.items():
        planned = tomllib.loads(st.run.sweep_text).get("networks", list(NETWORKS))
        cells = []
        for net in nets:
            if net not in st.networks():
                cells.append("missing" if net in planned else "—")
                continue
            device, versions, wall = provenance(st, net)
            ran = st.as_run(net)
            scale = " × ".join(count(ran[k], k) for k in ("epochs", "seeds", "members")
                               if ran[k])
            note = st.reduced(net)
            jax = (f"jax {versions['jax']}" if versions
                   else "versions not recorded (kept by --merge)")
            shards = st.run.shards
            split = f", {shards['count']} shards" if shards and not origin(st.run, net)[1] else ""
            cells.append(f"{device}{split}, {jax}, {minutes(wall)}: {scale}, "
                         + (f"**reduced** ({note})" if note else "full scale"))
            if versions:
                version_sets.setdefault(json.dumps(versions, sort_keys=True), []).append(
                    f"{name} {net_name(net)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for text, where in version_sets.items():
        versions = json.loads(text)
        lines.append(f"- Packages of {', '.join(where)}: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return lines


def build_report(root: Path) -> str:
    """The text of REPORT.md from the sweeps and benchmarks under `root`."""
    names = [name for name, *_ in SECTIONS] + [p for ps in PARTNERS.values() for p in ps]
    studies = {name: Study(results.read_metrics(root / name / "metrics.h5"))
               for name in dict.fromkeys(names) if (root / name / "metrics.h5").is_file()}
    lines = ["# uspsjax reproduction report", "",
             "Every number below is read from `results/*/metrics.h5` by "
             "`python -m uspsjax.report`; "
             "accuracies are final-epoch test accuracy, mean ± std (sample) over seeds, "
             "diverged members left out and counted.", "", RULE, ""]
    if studies:
        lines += ["## Coverage", "",
                  "Where each sweep's rows ran, with what, how long, and at what scale against "
                  "the sweep file's full scale (a network the sweep file lists but no run "
                  "trained is missing; — : not in the sweep).", "", *coverage(studies)]
        total = sum(st.run.wall_time_s for st in studies.values())
        lines += [f"- Total wall time: {total / 60:.1f} min "
                  + "(" + ", ".join(f"{n} {st.run.wall_time_s:.0f} s"
                                    for n, st in studies.items()) + ")"]
    bench = root / "bench"
    benches = sorted(p.name for p in bench.glob("*.md")) if bench.is_dir() else []
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
        lines += [run.description, "",
                  f"Settings as run: {_epochs_note(study)}; {run.programs} compiled programs, "
                  f"{len(run.settings)} members, {run.wall_time_s:.0f} s."
                  + (f" Overrides: {results.describe_overrides(run.overrides)}."
                     if run.overrides else ""), ""]
        lines += section(study, *(studies.get(p) for p in PARTNERS.get(name, ())))
        lines += ["", *figures(name, extra), ""]
    return "\n".join(lines)


def _epochs_note(study: Study) -> str:
    """Epochs and seeds per network, as actually run."""
    return ", ".join(f"{net_name(net)} {count(study.epochs(net), 'epochs')} × "
                     f"{count(study.as_run(net)['seeds'], 'seeds')}" for net in study.networks())


@cli.command
def main(argv=None) -> int:
    """Write RESULTS/REPORT.md atomically; a one-line error and exit status 2 on bad input, 1
    when the write fails (the earlier report untouched)."""
    parser = cli.Parser(prog="python -m uspsjax.report", description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results",
                        help="the results folder (default results/)")
    args = parser.parse_args(argv)
    root = Path(args.results)
    if not root.is_dir():
        raise InputError(f"{root}: no such results folder")
    cli.check_out(root)
    try:
        text = build_report(root)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{root}: cannot read the results ({e})") from None
    cli.write_text(root / "REPORT.md", text)
    print(root / "REPORT.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
