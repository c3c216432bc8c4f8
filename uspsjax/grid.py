"""The sweep file's grammar: find, read and check a TOML sweep file, expand it into the grid of
members (network x axes x seed x bag) and group them by static settings (one compiled program
per group). Nothing here trains; `sweep` runs what this describes.

A sweep file (see `sweeps/*.toml`):

    name = "lr"                      # results go to OUT/NAME
    description = "..."
    networks = ["fc", "lc", "cnn"]
    seeds = 3
    [base]                           # settings for every member
    epochs = 20
    lr = 1e-3
    [per_network.lc]                 # settings for one network, over base
    epochs = 30
    [cpu.lc]                         # only when running on a CPU: the LC net is slow there
    epochs = 2                       # (also `seeds`, and `ensemble`: a smaller size); said in
                                     # the output, --epochs/--seeds override
    [axes]                           # the grid: every combination, for every network and seed
    lr = [1e-6, 1e-3, 50]
    dropout = [{label = "rate 0.1", dropout_conv = 0.1, dropout_dense = 0.1}, ...]  # tied settings
    [ensemble]                       # `size` members per (setting, seed): bootstrap resamples
                                     # (bagging) with `bootstrap = true`, else their own seeds
    size = 6
    [evaluation]                     # robust accuracy after training
    attack_eps = [0.05, 0.1]
    validation = 1000                # hold out 1000 training images (seeded by validation_seed,
    validation_seed = 0              # the same for every member): val_loss/val_acc curves
    [study.fc]                       # the study's own numbers, shown beside ours
    test_acc = 0.9357

A setting is any field of `train.Static` (static: one program per distinct combination) or of
`train.Hparams` (dynamic: traced and vmapped), plus `init` as a name such as "constant(1e5)",
which sets the family (static) and scale (dynamic).
"""

import dataclasses
import itertools
import math
import re
import tomllib
from importlib import resources
from pathlib import Path

from uspsjax.data import N_TRAIN
from uspsjax.errors import InputError
from uspsjax.models import NETWORKS, parse_init
from uspsjax.train import HPARAM_DEFAULTS, Static, needs_whole_batch, settings_schema

# The shipped sweep files: the top-level sweeps/ folder, installed as the package uspsjax.sweeps
# (pyproject.toml), so that an installed uspsjax finds them from any working directory.
SWEEPS_DIR = resources.files("uspsjax.sweeps")
TOP_KEYS = {"name", "description", "networks", "seeds", "base", "per_network", "cpu", "axes",
            "ensemble", "evaluation", "study"}
SETTINGS = settings_schema()  # every setting, declared once on train.Static / train.Hparams
SETTING_KEYS = set(SETTINGS)
# What a setting that an older uspsjax did not record was, in effect.
SETTING_DEFAULTS = {**dataclasses.asdict(Static()), **HPARAM_DEFAULTS}
# A name is one plain folder under OUT: no separators, no dots (so no "..", and no clash with the
# LOWER_SCALE folders written beside a result).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# The largest grid a sweep may ask for (the shipped ones have at most 108 members); a bigger one
# is a typo or a runaway product of axes, and would take days before any result appeared.
MAX_MEMBERS = 10_000
STUDY_ORDER = ["baseline", "init", "lr", "batch", "momentum", "bagging", "dropout", "l1",
               "adversarial", "batchnorm"]


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of the grid: its network, seed, bag, label and complete settings."""

    network: str
    seed: int
    bag: int
    label: str
    static: Static
    hparams: dict


@dataclasses.dataclass
class Sweep:
    """A validated sweep file."""

    path: Path
    text: str
    name: str
    description: str
    networks: list
    seeds: int
    base: dict
    per_network: dict
    cpu: dict
    axes: dict
    ensemble: int
    attack_eps: tuple
    attack_samples: int
    study: dict
    validation: int = 0         # training images held out as the validation split
    validation_seed: int = 0


def _check_setting(where: str, key: str, value, n_train: int) -> None:
    """Raise InputError unless `value` is a valid value for setting `key`."""
    if key not in SETTING_KEYS:
        raise InputError(f"{where}: unknown setting {key!r} "
                         f"(known: {', '.join(sorted(SETTING_KEYS))})")
    if key == "init":
        if not isinstance(value, str):
            raise InputError(f"{where}: init must be a string such as \"glorot_uniform\", "
                             f"got {value!r}")
        try:
            parse_init(value)
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None
        return
    spec = SETTINGS[key]
    kind = spec["type"]
    if kind is str:
        if value not in spec["choices"]:
            raise InputError(f"{where}: {key} must be one of {', '.join(spec['choices'])}, "
                             f"got {value!r}")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: {key} must be true or false, got {value!r}")
        return
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: {key} must be an integer, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: {key} must be a number, got {value!r}")
    lo, hi, lo_ok, hi_ok = spec["bounds"]
    if key == "batch_size":
        hi, hi_ok = n_train, True
    bad = (math.isnan(value) or value < lo or value > hi or (value == lo and not lo_ok)
           or (value == hi and not hi_ok))
    if bad:
        lo_s, hi_s = ("[" if lo_ok else "(") + f"{lo}", f"{hi}" + ("]" if hi_ok else ")")
        raise InputError(f"{where}: {key} = {value!r} is impossible, it must lie in {lo_s}, {hi_s}")


def _check_settings(where: str, table, n_train: int) -> dict:
    """Validate a table of settings; returns it as a dict."""
    if not isinstance(table, dict):
        raise InputError(f"{where}: must be a table of settings, got {table!r}")
    for key, value in table.items():
        _check_setting(f"{where}.{key}", key, value, n_train)
    return dict(table)


def _read_text(path: Path) -> str:
    """The text of a sweep file; InputError for bytes that TOML does not allow (which would
    otherwise surface as a decoding traceback or a puzzling parse error)."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    if not blob.strip():
        raise InputError(f"{path}: the sweep file is empty")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {blob[e.start]:#04x})") from None
    if text.startswith("\ufeff"):
        raise InputError(f"{path}: starts with a byte-order mark; save it as UTF-8 without one")
    if "\0" in text:
        raise InputError(f"{path}: contains NUL bytes; a sweep file is UTF-8 text")
    return text


def load_sweep(name_or_path: str, n_train: int = N_TRAIN) -> Sweep:
    """Find (a name in `sweeps/` or a path), parse and validate a sweep file.

    Every problem raises InputError naming the file, the key and the problem.
    """
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or path.exists()):
        path = SWEEPS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(list_sweeps())
        raise InputError(f"{name_or_path}: no such sweep (known: {known}) and no such file")
    text = _read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    where = str(path)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise InputError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                         f"(known: {', '.join(sorted(TOP_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InputError(f"{where}: name must be a non-empty string of letters, digits, '-' "
                         f"and '_' (one folder name, at most 64 characters), got {name!r}")
    networks = raw.get("networks", list(NETWORKS))
    if not isinstance(networks, list) or not networks:
        raise InputError(f"{where}: networks must be a non-empty list, got {networks!r}")
    for net in networks:
        if net not in NETWORKS:
            raise InputError(f"{where}: networks: unknown network {net!r} "
                             f"(known: {', '.join(NETWORKS)})")
    seeds = raw.get("seeds", 3)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise InputError(f"{where}: seeds must be a positive integer, got {seeds!r}")
    base = _check_settings(f"{where}: base", raw.get("base", {}), n_train)
    per_network, cpu = raw.get("per_network", {}), raw.get("cpu", {})
    for key, tables in (("per_network", per_network), ("cpu", cpu)):
        if not isinstance(tables, dict):
            raise InputError(f"{where}: {key} must be a table of network tables")
        for net, table in tables.items():
            if net not in NETWORKS:
                raise InputError(f"{where}: {key}: unknown network {net!r}")
            if not isinstance(table, dict):
                raise InputError(f"{where}: {key}.{net} must be a table of settings")
            table = dict(table)
            for count in ("seeds", "ensemble") if key == "cpu" else ():
                value = table.pop(count, 1)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise InputError(f"{where}: {key}.{net}.{count} must be a positive integer")
            _check_settings(f"{where}: {key}.{net}", table, n_train)
    axes = raw.get("axes", {})
    if not isinstance(axes, dict):
        raise InputError(f"{where}: axes must be a table of lists")
    for axis, values in axes.items():
        at = f"{where}: axes.{axis}"
        if not isinstance(values, list) or not values:
            raise InputError(f"{at}: an axis must be a non-empty list, got {values!r}")
    # Before looking at each value: an axis of a million values is refused at once.
    check_grid_size(where, len(networks) * seeds * math.prod(map(len, axes.values())))
    for axis, values in axes.items():
        at = f"{where}: axes.{axis}"
        for v in values:
            if isinstance(v, dict):
                label = v.get("label")
                if label is not None and not isinstance(label, str):
                    raise InputError(f"{at}: label must be a string, got {label!r}")
                _check_settings(at, {k: x for k, x in v.items() if k != "label"}, n_train)
            else:
                _check_setting(at, axis, v, n_train)
    ensemble = raw.get("ensemble", {})
    size = ensemble.get("size", 0) if isinstance(ensemble, dict) else ensemble
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or (
            isinstance(ensemble, dict) and set(ensemble) - {"size"}):
        raise InputError(f"{where}: ensemble must be a table with an integer size >= 1")
    evaluation = raw.get("evaluation", {})
    if not isinstance(evaluation, dict) or set(evaluation) - {
            "attack_eps", "attack_samples", "validation", "validation_seed"}:
        raise InputError(f"{where}: evaluation takes attack_eps (a list), attack_samples, "
                         "validation and validation_seed")
    held = {k: evaluation.get(k, 0) for k in ("validation", "validation_seed")}
    for key, value in held.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{where}: evaluation.{key} must be an integer >= 0, got {value!r}")
    if held["validation"] >= n_train:
        raise InputError(f"{where}: evaluation.validation = {held['validation']} leaves no "
                         f"training images of {n_train}")
    eps = evaluation.get("attack_eps", [])
    if not isinstance(eps, list) or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e <= 1 for e in eps):
        raise InputError(f"{where}: evaluation.attack_eps must be a list of numbers in (0, 1], "
                         f"got {eps!r}")
    samples = evaluation.get("attack_samples", 2007)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"{where}: evaluation.attack_samples must be a positive integer")
    study = raw.get("study", {})
    if not isinstance(study, dict) or not all(
            isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())
            for v in study.values()):
        raise InputError(f"{where}: study must hold one table of numbers per network")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise InputError(f"{where}: description must be a string")
    return Sweep(path, text, name, description, networks, seeds, base, per_network, cpu, axes, size,
                 tuple(float(e) for e in eps), samples, study, held["validation"],
                 held["validation_seed"])


def check_grid_size(where: str, members: int) -> None:
    """Raise InputError if a grid of `members` models is more than a sweep may train."""
    if members > MAX_MEMBERS:
        raise InputError(f"{where}: the grid has {members:,} members, more than the "
                         f"{MAX_MEMBERS:,} a sweep may train; split it or use fewer values")


def list_sweeps() -> list[str]:
    """The names of the sweeps shipped in `sweeps/`."""
    return sorted(p.name.removesuffix(".toml") for p in SWEEPS_DIR.iterdir()
                  if p.name.endswith(".toml"))


def _axis_points(axis: str, values: list) -> list[tuple[str, dict]]:
    """(label part, settings) for each value of one axis."""
    points = []
    for v in values:
        if isinstance(v, dict):
            settings = {k: x for k, x in v.items() if k != "label"}
            label = v.get("label") or ",".join(f"{k}={x}" for k, x in settings.items())
            points.append((label, settings))
        else:
            points.append((f"{axis}={v}", {axis: v}))
    return points


def cpu_limits(sweep: Sweep, overrides: dict, on_cpu: bool) -> dict:
    """The sweep's `[cpu.NET]` settings that apply: on a CPU, for the networks run, less what the
    command line overrides."""
    if not on_cpu:
        return {}
    nets = overrides.get("networks", sweep.networks)
    limits = {net: {k: v for k, v in table.items() if k not in overrides}
              for net, table in sweep.cpu.items() if net in nets}
    return {net: table for net, table in limits.items() if table}


def expand(sweep: Sweep, overrides: dict | None = None, on_cpu: bool = False) -> list[Member]:
    """Every member of the grid: network x axes x seed (x bag), settings merged in the order
    defaults < network's study defaults < base < per_network < cpu (on a CPU) < axis values
    < overrides."""
    overrides = overrides or {}
    networks = overrides.get("networks", sweep.networks)
    settings_over = {k: v for k, v in overrides.items() if k in SETTING_KEYS}
    limits = cpu_limits(sweep, overrides, on_cpu)
    seeds = {net: overrides.get("seeds", limits.get(net, {}).get("seeds", sweep.seeds))
             for net in networks}
    sizes = {net: min(sweep.ensemble, limits.get(net, {}).get("ensemble", sweep.ensemble))
             for net in networks}
    check_grid_size(str(sweep.path), sum(seeds[n] * (sizes[n] or 1) for n in networks)
                    * math.prod(map(len, sweep.axes.values())))
    grid = list(itertools.product(*(_axis_points(a, v) for a, v in sweep.axes.items())))
    members = []
    for net in networks:
        limit = {k: v for k, v in limits.get(net, {}).items() if k not in ("seeds", "ensemble")}
        for point in grid:
            label = " ".join(part for part, _ in point) or "default"
            settings = {**NETWORKS[net].defaults, **sweep.base, **sweep.per_network.get(net, {}),
                        **limit}
            for _, s in point:
                settings.update(s)
            settings.update(settings_over)
            if settings.get("dropout_at", "none") not in NETWORKS[net].dropout_places and any(
                    "dropout_at" in s for _, s in point):
                continue  # a placement axis reaches layers this network lacks: not its point
            static, hparams = split_settings(net, settings, where=f"{sweep.path}: {net} {label}")
            for seed in range(seeds[net]):
                for bag in range(1, sizes[net] + 1) if sizes[net] else [0]:
                    members.append(Member(net, seed, bag, label, static, hparams))
    for net in networks:
        if not any(m.network == net for m in members):
            raise InputError(f"{sweep.path}: no point of the grid applies to {net}")
    return members


def split_settings(network: str, settings: dict, where: str) -> tuple[Static, dict]:
    """Split merged settings into the static part (a `Static`) and the dynamic part (a dict of
    hyperparameters); `init` contributes to both."""
    settings = dict(settings)
    hparams = {k: float(settings.pop(k, v)) for k, v in HPARAM_DEFAULTS.items()}
    if "init" in settings:
        family, scale = parse_init(settings.pop("init"))
        settings["init"] = family
        hparams["init_scale"] = scale
    static = Static(network=network, **settings)
    if static.dropout_at not in NETWORKS[network].dropout_places:
        raise InputError(f"{where}: dropout_at = {static.dropout_at!r} is impossible for {network} "
                         f"(it has: {', '.join(NETWORKS[network].dropout_places)})")
    if static.microbatch and static.microbatch < static.batch_size and (
            static.batch_size % static.microbatch or needs_whole_batch(static)):
        raise InputError(f"{where}: microbatch = {static.microbatch} must divide batch_size = "
                         f"{static.batch_size}, without batch norm or adversarial training "
                         "(they need the whole batch at once)")
    return static, hparams


def member_settings(m: Member) -> dict:
    """The row of settings a member's results are stored with (its static group aside)."""
    return {"network": m.network, "seed": m.seed, "bag": m.bag, "label": m.label,
            **{k: v for k, v in dataclasses.asdict(m.static).items() if k != "network"},
            **m.hparams}


def group_members(members: list[Member]) -> dict[Static, list[int]]:
    """Member indices by static group, in order of first appearance: one program per group."""
    groups: dict[Static, list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(m.static, []).append(i)
    return groups


def describe_group(static: Static) -> str:
    """A short label for a static group: the network and every static setting not at its
    default."""
    default = Static(network=static.network)
    parts = [f"{f.name}={getattr(static, f.name)}" for f in dataclasses.fields(Static)
             if f.name != "network" and getattr(static, f.name) != getattr(default, f.name)]
    return " ".join([static.network, *parts])
