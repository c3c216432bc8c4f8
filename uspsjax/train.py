"""Training one member: a pure `train(key, hparams) -> (state, curves)` built from static settings.

`Static` holds what changes the compiled program (network, batch size, epochs, initializer
family, where batch norm / dropout / L1 sit, adversarial training); `Hparams` holds the numbers
that are traced and can be vmapped over a population (learning rate, momentum, initializer
scale, dropout rates, L1 coefficient, adversarial epsilon). Nothing here knows about populations:
`population` vmaps these functions over a leading member axis.

Curves have one row per epoch and the columns of `metric_names` (`METRICS`, and `VAL_METRICS`
when a validation split is held out). Train loss and accuracy are the running means over the
epoch's batches (as Keras reports them, dropout on); validation and test loss and accuracy are
evaluated after the epoch with dropout off and batch-norm running averages.
"""

import dataclasses
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from uspsjax import attacks, kernels
from uspsjax.models import (BATCHNORM, L1_AT, LC_FANS, LC_LOWERINGS, NETWORKS,
                            draw_kernel)

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
VAL_METRICS = ("val_loss", "val_acc")  # between train and test when a validation split exists
ADVERSARIAL = ("none", "fgsm", "pgd")
LR_SCHEDULES = ("constant", "cosine", "onecycle")
ONECYCLE_WARMUP = 0.3  # the share of the run over which "onecycle" warms up
DTYPES = ("float32", "bfloat16")


INF = float("inf")
DROPOUT_AT = ("none", "conv", "dense", "both")


def setting(default, doc: str, *, choices: tuple | None = None,
            bounds: tuple | None = None):
    """A setting's one declaration, as a field of `Static` or `Hparams`: its default, one line
    of doc, and its choices or its bounds (lowest, highest, lowest allowed, highest allowed).
    Validation (`uspsjax.sweep`), defaults, `--help` and the README's settings table all read
    it (`settings_schema`); a field's type says int, float, bool or str."""
    return dataclasses.field(default=default,
                             metadata={"doc": doc, "choices": choices, "bounds": bounds})


@dataclasses.dataclass(frozen=True)
class Static:
    """Settings that change shapes or the program: one compiled program per distinct value."""

    network: str = "fc"  # not a setting of a sweep file: its `networks` list
    batch_size: int = setting(16, "samples per step (at most the training images)",
                              bounds=(1, INF, True, False))
    epochs: int = setting(20, "epochs of training", bounds=(1, INF, True, False))
    init: str = setting("glorot_uniform", "kernel initializer family, a name such as "
                        "`he_normal` or `constant(v)`; its scale is the dynamic `init_scale`")
    lc_fans: str = setting("position", "how LC kernels' fans are counted (see *LC fans*)",
                           choices=LC_FANS)
    lc_lowering: str = setting("auto", "how LC layers run, the same numbers (see *LC on CPU*)",
                               choices=LC_LOWERINGS)
    batchnorm: str = setting("none", "batch normalization before or after each hidden "
                             "activation", choices=BATCHNORM)
    bn_momentum: float = setting(0.99, "batch norm's running-average momentum",
                                 bounds=(0, 1, True, False))
    dropout_at: str = setting("none", "where dropout sits", choices=DROPOUT_AT)
    l1_at: str = setting("none", "where the L1 activity penalty sits", choices=L1_AT)
    lr_schedule: str = setting("constant", "constant, cosine decay to 0, or onecycle (a linear "
                               "warm-up over the first 30 %, then a cosine to 0)",
                               choices=LR_SCHEDULES)
    adversarial: str = setting("none", "adversarial training: FGSM with a random start, or "
                               "PGD", choices=ADVERSARIAL)
    adv_steps: int = setting(7, "PGD steps in adversarial training",
                             bounds=(1, INF, True, False))
    bootstrap: bool = setting(False, "train each member on its own bootstrap resample")
    augment: int = setting(0, "random shifts of each training image by up to this many whole "
                           "pixels (0: off)", bounds=(0, 15, True, True))
    affine: bool = setting(False, "random rotations and scalings of each training image, "
                           "inside the jitted step (strengths: `rotate`, `scale`)")
    dtype: str = setting("float32", "compute dtype; parameters stay float32", choices=DTYPES)
    microbatch: int = setting(0, "samples a step works through at a time, 0: as the platform "
                              "prefers (see *CNN on CPU in blocks*)",
                              bounds=(0, INF, True, False))


@struct.dataclass
class Hparams:
    """Per-member numbers, traced (each a scalar; a population stacks them on a leading axis).
    The defaults are those of a member whose sweep does not set them (`make_hparams`)."""

    lr: jax.Array = setting(1e-3, "learning rate", bounds=(0, INF, False, False))
    momentum: jax.Array = setting(0.0, "SGD momentum", bounds=(0, 1, True, False))
    init_scale: jax.Array = setting(1.0, "the initializer's scale (from `init`)",
                                    bounds=(-INF, INF, False, False))
    dropout_conv: jax.Array = setting(0.0, "dropout rate after the convolutions",
                                      bounds=(0, 1, True, False))
    dropout_dense: jax.Array = setting(0.0, "dropout rate after the dense layers",
                                       bounds=(0, 1, True, False))
    l1: jax.Array = setting(0.0, "L1 activity penalty λ", bounds=(0, INF, True, False))
    adv_eps: jax.Array = setting(0.0, "adversarial training's ε (pixels in [0, 1])",
                                 bounds=(0, 1, True, True))
    weight_decay: jax.Array = setting(0.0, "L2 weight decay added to the gradient (optax)",
                                      bounds=(0, INF, True, False))
    label_smoothing: jax.Array = setting(0.0, "label smoothing of the training targets (optax)",
                                         bounds=(0, 1, True, False))
    rotate: jax.Array = setting(0.0, "with `affine`: the largest rotation in degrees",
                                bounds=(0, 180, True, True))
    scale: jax.Array = setting(0.0, "with `affine`: the largest relative change of size",
                               bounds=(0, 1, True, False))


HPARAM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Hparams)}


def settings_schema() -> dict[str, dict]:
    """Every setting a sweep file may set, by name: `kind` ("static" or "dynamic"), `type`
    (int, float, bool or str), `default`, `choices`, `bounds` and `doc`, from the fields of
    `Static` and `Hparams`."""
    schema = {}
    for kind, cls in (("static", Static), ("dynamic", Hparams)):
        for f in dataclasses.fields(cls):
            if "doc" in f.metadata:
                kinds = {"int": int, "float": float, "bool": bool, "str": str}
                schema[f.name] = {"kind": kind, "type": float if kind == "dynamic"
                                  else kinds.get(f.type, f.type), "default": f.default,
                                  **{k: f.metadata[k] for k in ("choices", "bounds", "doc")}}
    return schema


def settings_table() -> str:
    """The settings as a Markdown table (name, static or dynamic, default, choices or range,
    doc): the README's table and `python -m uspsjax.sweep --help` both show it."""
    def allowed(spec):
        if spec["choices"]:
            return " / ".join(f"`{c}`" for c in spec["choices"])
        if spec["bounds"]:
            lo, hi, lo_ok, hi_ok = spec["bounds"]
            return f"{'[' if lo_ok else '('}{lo:g}, {hi:g}{']' if hi_ok else ')'}"
        return "true / false" if spec["type"] is bool else ""

    lines = ["| setting | kind | default | allowed | what it does |", "|---|---|---|---|---|"]
    for name, spec in settings_schema().items():
        default = str(spec["default"]).lower() if spec["type"] is bool else f"{spec['default']}"
        lines.append(f"| `{name}` | {spec['kind']} | `{default}` | {allowed(spec)} | "
                     f"{spec['doc']} |")
    return "\n".join(lines)


def make_hparams(**values) -> Hparams:
    """Hparams from keyword values (missing ones take `HPARAM_DEFAULTS`), as float32 arrays."""
    merged = {**HPARAM_DEFAULTS, **values}
    return Hparams(**{k: jnp.asarray(v, jnp.float32) for k, v in merged.items()})


@struct.dataclass
class MemberState:
    """Everything one member carries from epoch to epoch."""

    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    key: jax.Array          # shuffles and dropout; split off the member's seed key
    train_idx: jax.Array    # (N,) indices of its training set: arange, or a bootstrap resample
    epoch: jax.Array        # completed epochs
    diverged: jax.Array     # epoch (1-based) in which the loss became non-finite, 0 if never


class Data(NamedTuple):
    """The arrays training reads; shared by every member (never vmapped)."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    x_val: jax.Array | None = None
    y_val: jax.Array | None = None


def make_model(static: Static):
    """The Flax module for `static.network` with its static options."""
    only_lc = {"lowering": static.lc_lowering} if static.network == "lc" else {}
    return NETWORKS[static.network](batchnorm=static.batchnorm, bn_momentum=static.bn_momentum,
                                    dropout_at=static.dropout_at, l1_at=static.l1_at, **only_lc)


def _sgd(learning_rate, momentum, weight_decay):
    """SGD with momentum on the gradient plus `weight_decay` times the parameters."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate=learning_rate, momentum=momentum))


# Parameter tensors of at least this many floats are updated by `kernels.sgd_update` on a CPU,
# trace and parameters in one pass: XLA makes two (the trace, then the parameters), reading the
# parameters in both; the LC's first two layers hold 99 and 25 MB (results/bench/NOTES.md §35).
KERNEL_UPDATE_FLOATS = 2**20


def make_optimizer(hp: Hparams) -> optax.GradientTransformation:
    """SGD with momentum and weight decay, its learning rate, momentum and decay held as
    optimizer state (`inject_hyperparams`), so one transformation serves a whole population."""
    return optax.inject_hyperparams(_sgd)(learning_rate=hp.lr, momentum=hp.momentum,
                                          weight_decay=hp.weight_decay)


def sgd_step(optimizer: optax.GradientTransformation, grads, params, opt_state,
             active: jax.Array, learning_rate: jax.Array,
             kernel_floats: float = KERNEL_UPDATE_FLOATS):
    """`params` and `opt_state` (`optimizer`'s, from `make_optimizer`) after one update by
    `grads` at `learning_rate`; a member not `active` (diverged) keeps both as they were. Each
    parameter tensor of `kernel_floats` or more and its momentum trace are updated by
    `kernels.sgd_update` on a CPU where the kernels run: optax's numbers to float32 rounding."""
    # Freezing happens inside the update's own elementwise passes (a select where each tensor
    # is written anyway), not as a select over whole old and new states, which costs the LC
    # net an extra pass over its weights: a zero gradient under momentum 1 leaves the momentum
    # trace exactly as it was, and the parameters keep their old values.
    masked = jax.tree.map(lambda g: jnp.where(active, g, 0.0), grads)
    stored = opt_state.hyperparams
    step_hparams = {**stored, "learning_rate": learning_rate,
                    "momentum": jnp.where(active, stored["momentum"], 1.0),
                    "weight_decay": jnp.where(active, stored["weight_decay"], 0.0)}
    updates, new = optimizer.update(masked, opt_state._replace(hyperparams=step_hparams), params)
    new = new._replace(hyperparams=stored, count=jnp.where(active, new.count, opt_state.count))
    stepped = jax.tree.map(lambda p, u: jnp.where(active, p + u, p), params, updates)
    hyper = jnp.stack([learning_rate, stored["momentum"], stored["weight_decay"],
                       active]).astype(jnp.float32)

    def leaf(g, p_old, t_old, p, t):
        runs = g.size >= kernel_floats and g.dtype == jnp.float32 and kernels.built()
        return kernels.on_cpu(runs, kernels.sgd_update, lambda *_: (t, p), g, t_old, p_old,
                              hyper)

    trees = (grads, params, optax.tree_utils.tree_get(opt_state, "trace"), stepped,
             optax.tree_utils.tree_get(new, "trace"))
    updated = [leaf(*parts) for parts in zip(*map(jax.tree.leaves, trees))]
    treedef = jax.tree.structure(params)
    return (treedef.unflatten([p for _, p in updated]),
            optax.tree_utils.tree_set(new, trace=treedef.unflatten([t for t, _ in updated])))


def init_params(static: Static, key: jax.Array, init_scale: jax.Array):
    """Flax variables with every kernel drawn from `static.init` times `init_scale`, biases zero
    (the Keras defaults the study relied on)."""
    model = make_model(static)
    variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                               jnp.zeros((1, 256), jnp.float32))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda path, v: jnp.ones_like(v) if path[-1].key == "var" else v,
            variables["batch_stats"])

    def draw(path, leaf, leaf_key):
        name = path[-1].key
        if name == "kernel":
            per_position = leaf.ndim == 3 and static.lc_fans == "position"
            return draw_kernel(static.init, leaf_key, leaf.shape, init_scale, per_position)
        if name == "scale":  # batch-norm gain
            return jnp.ones_like(leaf)
        return leaf

    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables["params"])
    keys = jax.random.split(key, len(leaves))
    params = treedef.unflatten([draw(p, v, k) for (p, v), k in zip(leaves, keys)])
    return params, variables.get("batch_stats", {})


def init_member(static: Static, key: jax.Array, hp: Hparams, n_train: int) -> MemberState:
    """A fresh member from its seed key: parameters, optimizer state, its training indices."""
    k_init, k_boot, k_run = jax.random.split(key, 3)
    params, batch_stats = init_params(static, k_init, hp.init_scale)
    if static.bootstrap:
        train_idx = jax.random.randint(k_boot, (n_train,), 0, n_train)
    else:
        train_idx = jnp.arange(n_train)
    return MemberState(params=params, batch_stats=batch_stats,
                       opt_state=make_optimizer(hp).init(params), key=k_run,
                       train_idx=train_idx.astype(jnp.int32), epoch=jnp.zeros((), jnp.int32),
                       diverged=jnp.zeros((), jnp.int32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing,
                           batch: int | None = None) -> jax.Array:
    """Cross-entropy against one-hot targets smoothed towards uniform by `smoothing`, summed
    and divided by `batch` (by default the number of samples: the mean)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(losses) / (batch or losses.shape[0])


def forward(static: Static, params, batch_stats, x, hp: Hparams, *, train: bool, key=None,
            rows=None):
    """Logits, updated batch statistics and the L1 activity penalty for a batch `x` (rows
    `rows = (start, batch)` of a larger batch, for its dropout masks)."""
    model = make_model(static)
    dtype = jnp.dtype(static.dtype)
    if dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits, updates = model.apply(
        variables, x.astype(dtype), train=train, rates=(hp.dropout_conv, hp.dropout_dense),
        rows=rows, rngs={"dropout": key} if train else {}, mutable=["batch_stats", "losses"])
    penalty = sum(jnp.sum(v) for v in jax.tree.leaves(updates.get("losses", {})))
    return logits, updates.get("batch_stats", batch_stats), jnp.asarray(penalty, jnp.float32)


def adversarial_batch(static: Static, params, batch_stats, x, y, hp: Hparams, key):
    """The batch `x` attacked at `hp.adv_eps` (FGSM with random start, or PGD) against the
    member's current parameters, in evaluation mode."""
    # The attack is not differentiated: its result's gradient is stopped anyway, and with the
    # parameters held constant the attack's own gradients (C kernels on a CPU, which have no
    # derivatives) are only evaluated.
    params, batch_stats = jax.lax.stop_gradient((params, batch_stats))

    def loss_fn(x_in):
        logits, _, _ = forward(static, params, batch_stats, x_in, hp, train=False)
        return jnp.sum(cross_entropy(logits, y))

    if static.adversarial == "fgsm":
        return attacks.fgsm(loss_fn, x, hp.adv_eps, key=key, random_start=True)
    return attacks.pgd(loss_fn, x, hp.adv_eps, steps=static.adv_steps,
                       step_size=2.5 * hp.adv_eps / static.adv_steps, key=key)


def shift_images(x: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Each 16x16 image of `x` `(B, 256)` translated by its own random whole-pixel offset in
    [-max_shift, max_shift] along each axis, the uncovered border filled with 0 (background)."""
    side = 16
    images = jnp.pad(x.reshape(-1, side, side), ((0, 0), (max_shift,) * 2, (max_shift,) * 2))
    offsets = jax.random.randint(key, (x.shape[0], 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1]), (side, side))

    return jax.vmap(crop)(images, offsets).reshape(x.shape)


def schedule(name: str, progress: jax.Array) -> jax.Array:
    """The learning rate's factor at `progress` in [0, 1) of the run: "cosine" decays from 1 to
    0; "onecycle" rises linearly from 0.04 to 1 over the first 30 %, then decays as a cosine."""
    if name == "cosine":
        return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    warm = ONECYCLE_WARMUP
    rise = 0.04 + 0.96 * progress / warm
    fall = 0.5 * (1.0 + jnp.cos(jnp.pi * (progress - warm) / (1 - warm)))
    return jnp.where(progress < warm, rise, fall)


def affine_images(x: jax.Array, key: jax.Array, rotate: jax.Array, scale: jax.Array) -> jax.Array:
    """Each 16x16 image of `x` `(B, 256)` rotated by its own random angle in [-rotate, rotate]
    degrees and resized by a random factor in [1 - scale, 1 + scale] (`warp_images`)."""
    k_rot, k_scale = jax.random.split(key)
    angle = jnp.deg2rad(rotate) * jax.random.uniform(k_rot, (x.shape[0],), minval=-1, maxval=1)
    factor = 1 + scale * jax.random.uniform(k_scale, (x.shape[0],), minval=-1, maxval=1)
    return warp_images(x, angle, factor)


def warp_images(x: jax.Array, angle: jax.Array, factor: jax.Array) -> jax.Array:
    """Each 16x16 image of `x` `(B, 256)` rotated about its centre by `angle` (radians, `(B,)`;
    positive turns clockwise as the image is shown, row 0 on top) and resized by `factor`
    `(B,)`, by bilinear interpolation, 0 (background) outside the image."""
    side = 16
    centre = (side - 1) / 2
    rows, cols = jnp.meshgrid(jnp.arange(side) - centre, jnp.arange(side) - centre,
                              indexing="ij")

    def warp(image, a, f):
        # Where each output pixel comes from: the inverse rotation and scaling of its position.
        cos, sin = jnp.cos(a) / f, jnp.sin(a) / f
        src = (cos * rows - sin * cols + centre, sin * rows + cos * cols + centre)
        return jax.scipy.ndimage.map_coordinates(image, src, order=1, mode="constant")

    return jax.vmap(warp)(x.reshape(-1, side, side), angle, factor).reshape(x.shape)


def needs_whole_batch(static: Static) -> bool:
    """Whether a step must see its whole batch at once: batch norm's statistics and the attacks'
    random starts of adversarial training are drawn over the batch."""
    return static.batchnorm != "none" or static.adversarial != "none"


def microbatch_size(static: Static, platform: str) -> int:
    """How many samples of a batch a training step on `platform` ("cpu", "gpu", ...) works
    through at a time, summing their gradients: `static.microbatch` when set; with 0, on a CPU
    the network's `cpu_block` where the batch divides into such blocks (models.CNN: a block's
    patches and gradients stay in the cache, results/bench/NOTES.md §15); otherwise the whole
    batch, and always where a step `needs_whole_batch`."""
    batch = static.batch_size
    if static.microbatch:
        return min(static.microbatch, batch)
    block = NETWORKS[static.network].cpu_block if platform == "cpu" else None
    if block and batch > block and batch % block == 0 and not needs_whole_batch(static):
        return block
    return batch


def microbatch_rule(platform: str) -> str:
    """What `microbatch = 0` runs on `platform` (`microbatch_size`), for the record of a result."""
    blocks = [f"{name} batches larger than {net.cpu_block} in blocks of {net.cpu_block}"
              for name, net in NETWORKS.items() if net.cpu_block]
    if platform != "cpu" or not blocks:
        return "whole batches"
    return "; ".join(blocks) + " (not with batch norm or adversarial training)"


def train_step(static: Static, state: MemberState, hp: Hparams, x, y, key, progress=0.0):
    """One SGD step on batch (x, y). Returns the new state, the batch loss and accuracy.

    `progress` in [0, 1) is how far the run is, for the learning-rate `schedule`. With
    `static.affine` the batch is first rotated and scaled at random (`affine_images`), with
    `static.augment` shifted (`shift_images`). The objective is the cross-entropy against
    targets smoothed by `hp.label_smoothing`; with adversarial training, half clean and half
    adversarial (Goodfellow et al. 2015). The reported loss is the plain cross-entropy. The
    batch's gradient is summed over blocks of `microbatch_size` samples, each block with its
    rows of the whole batch's dropout masks: the same numbers as the whole batch at once, to
    float32 rounding.

    A member whose loss is not finite is marked diverged (`state.diverged`, the 1-based epoch)
    and frozen from that step on: its parameters, batch statistics and optimizer state never
    change again. `healthy` says whether this step's loss was finite.
    """
    if static.affine:
        key, k_affine = jax.random.split(key)
        x = affine_images(x, k_affine, hp.rotate, hp.scale)
    if static.augment:
        key, k_shift = jax.random.split(key)
        x = shift_images(x, k_shift, static.augment)
    k_adv, k_drop = jax.random.split(key)
    batch = x.shape[0]

    def objective(params, xb, yb, start):
        # Sums over the block divided by the whole batch: blocks add up to the batch's means.
        logits, batch_stats, penalty = forward(static, params, state.batch_stats, xb, hp,
                                               train=True, key=k_drop, rows=(start, batch))
        ce = jnp.sum(cross_entropy(logits, yb)) / batch
        loss = smoothed_cross_entropy(logits, yb, hp.label_smoothing, batch)
        if static.adversarial != "none":
            x_adv = adversarial_batch(static, params, state.batch_stats, xb, yb, hp, k_adv)
            adv_logits, _, _ = forward(static, params, state.batch_stats, x_adv, hp, train=True,
                                       key=k_drop, rows=(start, batch))
            loss = 0.5 * loss + 0.5 * smoothed_cross_entropy(adv_logits, yb,
                                                             hp.label_smoothing, batch)
        acc = jnp.sum(jnp.argmax(logits, -1) == yb) / batch
        return loss + hp.l1 * penalty * (xb.shape[0] / batch), (ce, acc, batch_stats)

    def gradients(block):
        # The whole batch at once, or block by block with the gradients and metrics summed.
        gradient = jax.grad(objective, has_aux=True)
        if block == batch:
            grads, (ce, acc, batch_stats) = gradient(state.params, x, y, 0)
            return grads, ce, acc, batch_stats

        def accumulate(total, part):
            grads, (ce, acc, _) = gradient(state.params, *part)
            return jax.tree.map(jnp.add, total, (grads, ce, acc)), None

        parts = (x.reshape(-1, block, x.shape[1]), y.reshape(-1, block),
                 jnp.arange(0, batch, block))
        zero = jax.tree.map(jnp.zeros_like, (state.params, 0.0, 0.0))
        return *jax.lax.scan(accumulate, zero, parts)[0], state.batch_stats

    on_cpu, elsewhere = microbatch_size(static, "cpu"), microbatch_size(static, "gpu")
    if on_cpu == elsewhere:
        grads, ce, acc, batch_stats = gradients(on_cpu)
    else:
        grads, ce, acc, batch_stats = jax.lax.platform_dependent(
            cpu=lambda: gradients(on_cpu), default=lambda: gradients(elsewhere))
    healthy = jnp.isfinite(ce)
    diverged = jnp.where((state.diverged == 0) & ~healthy, state.epoch + 1, state.diverged)
    active = diverged == 0
    learning_rate = state.opt_state.hyperparams["learning_rate"]
    if static.lr_schedule != "constant":
        learning_rate = hp.lr * schedule(static.lr_schedule, progress)
    params, opt_state = sgd_step(make_optimizer(hp), grads, state.params, state.opt_state,
                                 active, learning_rate)
    batch_stats = jax.tree.map(lambda n, o: jnp.where(active, n, o), batch_stats,
                               state.batch_stats)
    new = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                        diverged=diverged)
    return new, ce, acc, healthy


def evaluate(static: Static, state: MemberState, hp: Hparams, x, y, chunk: int = 512):
    """Mean loss, accuracy and softmax probabilities `(N, 10)` over (x, y), in evaluation mode,
    in chunks of `chunk` samples so the LC network's activations stay small."""
    n = x.shape[0]
    pad = -n % chunk
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[1])

    def logits_of(xb):
        return forward(static, state.params, state.batch_stats, xb, hp, train=False)[0]

    logits = jax.lax.map(logits_of, xs).reshape(-1, 10)[:n].astype(jnp.float32)
    loss = jnp.mean(cross_entropy(logits, y))
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return loss, acc, jax.nn.softmax(logits)


def train_steps(static: Static, state: MemberState, hp: Hparams, data: Data, batches: jax.Array,
                keys: jax.Array, on_step: Callable | None = None, every: jax.Array | int = 1):
    """`S = batches.shape[0]` training steps on the sample indices `batches (S, B)`, one key per
    step from `keys (S,)`, the S steps counted as the member's epoch `state.epoch` for the
    learning-rate schedule. Returns the new state and per-step `(loss, accuracy)`, each `(S,)`.

    With `on_step`, the host function `on_step(steps_done)` is called after every `every`
    steps (a `jax.debug.callback`: no value of the loop waits for it), so progress can be shown
    inside long epochs. `every` may be traced: the host can space the calls out between epochs
    without recompiling (each call costs about 0.1 ms on a CPU).
    """
    steps = batches.shape[0]

    def body(st, inputs):
        idx, key, i = inputs
        progress = (state.epoch * steps + i) / (static.epochs * steps)
        st, loss, acc, _ = train_step(static, st, hp, data.x_train[idx], data.y_train[idx], key,
                                      progress)
        if on_step is not None:
            jax.lax.cond((i + 1) % every == 0, lambda: jax.debug.callback(on_step, i + 1),
                         lambda: None)
        return st, (loss, acc)

    return jax.lax.scan(body, state, (batches, keys, jnp.arange(steps)))


def train_epoch(static: Static, state: MemberState, hp: Hparams, data: Data,
                every: jax.Array | int = 1, on_step: Callable | None = None):
    """One epoch: a new shuffle of the member's training indices, full batches only (the last
    partial batch is dropped; the next shuffle covers it), then evaluation on the validation
    split (when `data` holds one) and the test set.
    `on_step` and `every` are passed to `train_steps`.

    Returns the new state and this epoch's metrics (`metric_names`); NaN once diverged.
    """
    n = state.train_idx.shape[0]
    steps = n // static.batch_size
    epoch_key = jax.random.fold_in(state.key, state.epoch)
    k_perm, k_steps = jax.random.split(epoch_key)
    order = jax.random.permutation(k_perm, state.train_idx)[: steps * static.batch_size]
    batches = order.reshape(steps, static.batch_size)
    state, (losses, accs) = train_steps(static, state, hp, data, batches,
                                        jax.random.split(k_steps, steps), on_step, every)
    state = state.replace(epoch=state.epoch + 1)
    held_out = [(data.x_test, data.y_test)]
    if data.x_val is not None:
        held_out.insert(0, (data.x_val, data.y_val))
    metrics = [jnp.mean(losses), jnp.mean(accs)]
    for x, y in held_out:
        metrics += evaluate(static, state, hp, x, y)[:2]
    return state, jnp.where(state.diverged > 0, jnp.nan, jnp.stack(metrics))


def metric_names(validation: bool) -> tuple[str, ...]:
    """The curves' columns: `METRICS`, with `VAL_METRICS` after the train pair when a
    validation split is held out."""
    return METRICS[:2] + VAL_METRICS + METRICS[2:] if validation else METRICS


def compiler_options(platform: str, once: bool = False) -> dict:
    """XLA options for the training programs on `platform` ("cpu", "gpu", ...). On CPU, copy
    insertion with region analysis: without it XLA:CPU copies every loop-carried weight tensor
    once a step before updating it in place (the LC net: 1.15x at batch 16,
    results/bench/NOTES.md §11). Buffers only: the same numbers.

    `once`: for a program that runs once per chunk of members (their initialization). On CPU
    it is compiled at LLVM optimization level 1: 3-4 times faster to compile (two members: FC
    9.2 -> 2.9 s, CNN 8.4 -> 2.0 s, LC 9.1 -> 3.5 s), as fast to run, bit-identical output
    (results/bench/NOTES.md §18). The training programs keep the default level: their compile
    gains little from it, and the CNN's numbers change."""
    if platform != "cpu":
        return {}
    if once:
        return {"xla_backend_optimization_level": 1}
    return {"xla_cpu_copy_insertion_use_region_analysis": True}


def compile_program(fn, *args, platform: str, once: bool = False):
    """`fn` (a `jax.jit`-wrapped function) lowered for `args` and compiled as the engine compiles
    its programs on `platform` (`compiler_options`; `once` for a program that runs once)."""
    return fn.lower(*args).compile(compiler_options(platform, once))


def train_epochs(static: Static, state: MemberState, hp: Hparams, data: Data):
    """`static.epochs` epochs of one member from `state`: `(state, curves)`, curves of shape
    `(epochs, len(metric_names(...)))`."""
    return jax.lax.scan(lambda st, _: train_epoch(static, st, hp, data), state, None,
                        length=static.epochs)


def make_train(static: Static, data: Data):
    """A pure `train(key, hp) -> (state, curves)`: `static.epochs` epochs from the seed key
    (`init_member`, then `train_epochs`). It can be jitted and vmapped over (key, hp)."""
    n_train = data.x_train.shape[0]

    def train(key: jax.Array, hp: Hparams):
        return train_epochs(static, init_member(static, key, hp, n_train), hp, data)

    return train


def _platform(keys: jax.Array) -> str:
    return next(iter(keys.devices())).platform


def init_members(static: Static, keys: jax.Array, hps: Hparams, n_train: int) -> MemberState:
    """Fresh members from their seed keys, computed as `population.run_group` computes them (one
    program, compiled `once`): one member for a single key (a typed key, `jax.random.key`) and
    `Hparams` of scalars, else the members stacked along a leading axis."""
    init = partial(init_member, static, n_train=n_train)
    init = jax.jit(jax.vmap(init) if jnp.ndim(keys) else init)
    return compile_program(init, keys, hps, platform=_platform(keys), once=True)(keys, hps)


def train_members(static: Static, data: Data, keys: jax.Array, hps: Hparams):
    """`static.epochs` epochs of members from their seed keys, compiled as `population.run_group`
    compiles them (their initialization once, their epochs as one program), without its chunks,
    checkpoints or progress: `(state, curves)` as `make_train`'s `train` returns them, for one
    member (a single key) or stacked members (stacked keys, vmapped)."""
    state = init_members(static, keys, hps, data.x_train.shape[0])
    epochs = partial(train_epochs, static)
    epochs = jax.jit(jax.vmap(epochs, in_axes=(0, 0, None)) if jnp.ndim(keys) else epochs)
    return compile_program(epochs, state, hps, data, platform=_platform(keys))(state, hps, data)


def as_data(dataset, on_device: bool = True) -> Data:
    """A `Data` from a `uspsjax.data.Dataset` (or any object with its four fields, and
    optionally `x_val`/`y_val`): device arrays, or with `on_device=False` host (numpy) arrays,
    for a caller that places them itself (`population.run_group` puts them on its mesh, so
    they cross from the host once)."""
    fields = (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test,
              getattr(dataset, "x_val", None), getattr(dataset, "y_val", None))
    place = jnp.asarray if on_device else (lambda a: a)
    return Data(*(None if a is None else place(np.asarray(a)) for a in fields))
