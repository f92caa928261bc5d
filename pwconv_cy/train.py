"""Train the paper's classifier (SPEC §1) on a labelled ``.npz`` point-cloud set.

    python -m pwconv_cy.train --data TRAIN.npz --epochs N --out DIR [options]

A stratified validation split (``--val-fraction``, seeded) is carved out of the data.  Every
epoch writes, into DIR:

* ``last.npz``: model weights, optimiser state, random-generator state and the metrics so far
  (``--resume`` continues from it and ends bit-identical to an uninterrupted run);
* ``best.npz``: the model with the best validation overall accuracy so far (the last epoch
  when there is no validation split);
* ``metrics.csv`` / ``metrics.json``: one row per epoch; ``curves.png``: the loss and accuracy
  curves (needs matplotlib, the ``plot`` extra).

Every file is written atomically (temporary file + ``os.replace``): an interrupted run (Ctrl-C,
``--time-limit``, a kill) leaves the last complete epoch usable.  ``--device cuda`` trains on a
CUDA device (CuPy): the data stays on the host, where it is shuffled, resampled and augmented,
and each batch is copied to the device; the checkpoints are the same files (a run resumes on
either device, bit-identically on the one it was trained on).  ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from pwconv_cy import _cli, data, models, nn, optim
from pwconv_cy._arrays import cupy_device_context, host_scalars
from pwconv_cy._atomic import atomic_open
from pwconv_cy.evaluate import evaluate

__all__ = ["build_parser", "main", "train_step"]

STATE_SCHEMA = "pwconv-train-1"
_OPTIM_PREFIX = "optimizer/"

# Run options that decide the trajectory: --resume must get the same values.
_TRAJECTORY_OPTIONS = ("batch_size", "lr", "optimizer", "momentum", "schedule", "decay_rate",
                       "decay_steps", "warmup_steps", "weight_decay", "clip_norm",
                       "val_fraction", "seed", "augment", "rotate", "scale_shift", "limit",
                       "num_points", "voxel_size", "dilations", "channels", "hidden", "dropout",
                       "logits_selu")
# Options added later, with the value that checkpoints written before them were trained with.
_OLD_CHECKPOINT_DEFAULTS = {"rotate": True, "scale_shift": False}
SCALE_RANGE, SHIFT = (2.0 / 3.0, 1.5), 0.2  # --scale-shift


class _UsageError(Exception):
    """A bad argument, reported argparse-style before any work."""


def _dilations(text: str) -> tuple:
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers such as "
                                         f"1,2,3,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = _cli.command_parser(
        "python -m pwconv_cy.train", "Train the pointwise-CNN classifier (Hua et al., CVPR "
        "2018) on a labelled .npz ('points' (S, n, 3), 'labels' (S,), optional 'class_names').",
        checkpoint=False)
    p.add_argument("--data", required=True, metavar="TRAIN.npz", help="training data")
    p.add_argument("--epochs", required=True, type=_cli.positive_int, help="epochs to train")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for checkpoints, metrics and plots")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_cli.positive_int, default=32, help="shapes per step")
    g.add_argument("--lr", type=_cli.positive_float, default=0.001, help="(peak) learning rate")
    g.add_argument("--optimizer", choices=("momentum", "sgd", "nesterov", "adam", "adamw"),
                   default="momentum", help="momentum = the paper's SGD with momentum")
    g.add_argument("--momentum", type=_cli.unit_fraction, default=0.9,
                   help="momentum of --optimizer momentum / nesterov")
    g.add_argument("--schedule", choices=("paper", "cosine", "constant"), default="paper",
                   help="paper: lr * decay-rate ** floor(step / decay-steps); cosine: to 0 at "
                        "the end of --epochs, after --warmup-steps of linear warm-up")
    g.add_argument("--decay-rate", type=_cli.positive_float, default=0.96,
                   help="factor of --schedule paper")
    g.add_argument("--decay-steps", type=_cli.positive_int, default=100_000,
                   help="steps per decay of --schedule paper")
    g.add_argument("--warmup-steps", type=_cli.nonneg_int, default=0,
                   help="linear warm-up of --schedule cosine")
    g.add_argument("--weight-decay", type=_cli.nonneg_float, default=0.0,
                   help="L2 (sgd/momentum/nesterov/adam) or decoupled (adamw) weight decay")
    g.add_argument("--clip-norm", type=_cli.positive_float, default=None,
                   help="clip the gradients to this global L2 norm")
    g = p.add_argument_group("data")
    g.add_argument("--val-fraction", type=_cli.unit_fraction, default=0.1,
                   help="stratified validation split carved out of --data (0: none)")
    g.add_argument("--seed", type=_cli.nonneg_int, default=0,
                   help="seed of the split, the initialisation and the training randomness")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   # "%(default).0s" prints nothing: it only stops the formatter from
                   # appending "(default: True)", which reads backwards for an off switch.
                   help="turn off the augmentation (random rotation about z, jitter sigma 0.01 "
                        "clipped at 0.05), which is on by default%(default).0s")
    g.add_argument("--no-rotate", dest="rotate", action="store_false",
                   help="augment with the jitter only, keeping the clouds' orientation (the "
                        "paper also rotates them about z)%(default).0s")
    g.add_argument("--scale-shift", action="store_true",
                   help="also scale each cloud per axis by factors in [2/3, 3/2] and shift it by "
                        "up to 0.2 per axis (the usual ModelNet augmentation of later work)")
    g.add_argument("--limit", type=_cli.positive_int, default=None, metavar="N",
                   help="use only the first N shapes of every class (quick runs)")
    g.add_argument("--num-points", type=_cli.positive_int, default=None,
                   help="points per shape seen by the model (default: the data's); training "
                        "draws a new random subset per step, validation a seeded one")
    g = p.add_argument_group("model")
    g.add_argument("--voxel-size", type=_cli.positive_float, default=None,
                   help="kernel cell edge v (default 0.1 * sqrt(2048 / num_points): the "
                        "paper's 0.1 at 2,048 points on the unit sphere, at equal neighbour "
                        "counts)")
    g.add_argument("--dilations", type=_dilations, default=(1, 2, 3, 4),
                   help="a-trous strides of the pointwise layers, e.g. 1,2,3,4")
    g.add_argument("--channels", type=_cli.positive_int, default=9,
                   help="output channels of each pointwise layer")
    g.add_argument("--hidden", type=_cli.positive_int, default=512,
                   help="width of the hidden fully connected layer")
    g.add_argument("--dropout", type=_cli.unit_fraction, default=0.5, help="alpha-dropout rate")
    g.add_argument("--logits-selu", action="store_true",
                   help="SELU on the logits, as the paper does")
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last complete epoch (same options)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --out holds a run")
    g.add_argument("--time-limit", type=_cli.nonneg_float, default=None, metavar="SECONDS",
                   help="stop after the epoch during which this many seconds have passed")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="no curves.png")
    _cli.add_num_threads(g)
    _cli.add_device(g)
    return p


# ------------------------------------------------------------------------------------------
# set-up: everything checked before the first step


def _flag(option: str) -> str:
    return {"augment": "--no-augment", "rotate": "--no-rotate", "data": "--data"}.get(
        option, "--" + option.replace("_", "-"))


def _fingerprint(ds: data.Dataset) -> dict:
    return {"n_shapes": len(ds), "n_points": int(ds.points.shape[1]),
            "n_classes": ds.n_classes,
            "crc32": zlib.crc32(ds.labels.tobytes(), zlib.crc32(ds.points.tobytes()))}


def _run_config(args, ds: data.Dataset) -> dict:
    num_points = args.num_points or int(ds.points.shape[1])
    voxel = args.voxel_size or 0.1 * math.sqrt(2048 / num_points)
    config = {k: getattr(args, k) for k in _TRAJECTORY_OPTIONS}
    config.update(num_points=num_points, voxel_size=voxel, dilations=list(args.dilations),
                  epochs=args.epochs, data=_fingerprint(ds))
    return config


def _describe(option: str, value) -> str:
    if option in ("augment", "rotate"):
        return "not given" if value else "given"
    if option in ("logits_selu", "scale_shift"):
        return "given" if value else "not given"
    if option == "data" and isinstance(value, dict):
        return (f"{value.get('n_shapes')} shapes of {value.get('n_points')} points, CRC-32 "
                f"{value.get('crc32', 0):08x}")
    return repr(value)


def _config_differences(saved: dict, now: dict) -> list:
    keys = list(_TRAJECTORY_OPTIONS) + ["data"]
    if now["schedule"] == "cosine":  # the cosine schedule's length is --epochs
        keys.append("epochs")
    saved = {**_OLD_CHECKPOINT_DEFAULTS, **saved}
    return [f"{_flag(k)}: {_describe(k, saved.get(k))} in the checkpoint, "
            f"{_describe(k, now.get(k))} now" for k in keys if saved.get(k) != now.get(k)]


def _make_optimizer(config: dict, steps_per_epoch: int):
    lr = config["lr"]
    if config["schedule"] == "paper":
        lr = optim.exponential_decay(lr, config["decay_rate"], config["decay_steps"])
    elif config["schedule"] == "cosine":
        lr = optim.cosine_with_warmup(lr, config["epochs"] * steps_per_epoch,
                                      config["warmup_steps"])
    name, wd = config["optimizer"], config["weight_decay"]
    if name == "adam":
        return optim.Adam(lr, weight_decay=wd)
    if name == "adamw":
        return optim.AdamW(lr, weight_decay=wd)
    momentum = 0.0 if name == "sgd" else config["momentum"]
    return optim.SGD(lr, momentum=momentum, nesterov=name == "nesterov", weight_decay=wd)


class _Run:
    """What one invocation trains: data, model, optimiser, generator, history."""

    def __init__(self, args, device: str):
        self.args = args
        self.device = device  # checked: _cli.checked_device
        self.out = Path(args.out)
        self.last_path = self.out / "last.npz"
        self.best_path = self.out / "best.npz"
        self._check_out()
        try:
            ds = data.load_dataset(args.data)
        except (OSError, ValueError) as exc:
            raise _UsageError(f"--data: {exc}") from None
        self.class_names = ds.class_names
        self.n_classes = ds.n_classes
        if args.limit is not None:
            ds = ds.subset(data.limit_per_class(ds.labels, args.limit))
        self.config = _run_config(args, ds)
        train_idx, val_idx = data.stratified_split(ds.labels, args.val_fraction, args.seed)
        self.train, self.val = ds.subset(train_idx), ds.subset(val_idx)
        if args.batch_size > len(self.train):
            raise _UsageError(f"--batch-size {args.batch_size} is larger than the training set:"
                              f" {len(self.train)} shapes (of {len(ds)} after --limit, less "
                              f"the --val-fraction {args.val_fraction} validation split); "
                              "use a smaller --batch-size or more data")
        if args.warmup_steps and args.schedule != "cosine":
            raise _UsageError(f"--warmup-steps {args.warmup_steps} applies to --schedule cosine "
                              f"only, got --schedule {args.schedule}")
        self.steps_per_epoch = math.ceil(len(self.train) / args.batch_size)
        self.optimizer = _make_optimizer(self.config, self.steps_per_epoch)
        self.resumed_from_device = None
        if args.resume:
            self._restore()
        else:
            self.model = models.PointwiseCNNClassifier(
                n_points=self.config["num_points"], n_classes=self.n_classes,
                channels=args.channels, voxel_size=self.config["voxel_size"],
                dilations=args.dilations, hidden=args.hidden, dropout=args.dropout,
                logits_selu=args.logits_selu, seed=args.seed).to(self.device)
            self.opt_state = self.optimizer.init(self.model.params)
            # one generator for the shuffling, resampling, augmentation and dropout masks
            self.rng = np.random.default_rng([args.seed, 1])
            self.epoch, self.history = 0, []
            self.best = {"val_accuracy": None, "epoch": None}
        self.model.dropout_rng = self.rng
        self.saved_epoch = self.epoch

    def _check_out(self):
        args = self.args
        if self.out.exists() and not self.out.is_dir():
            raise _UsageError(f"--out: {self.out} exists and is not a folder")
        if args.resume and args.overwrite:
            raise _UsageError("--resume and --overwrite exclude each other")
        if args.resume and not self.last_path.is_file():
            raise _UsageError(f"--resume: there is no checkpoint {self.last_path} to resume "
                              "from (run without --resume to start)")
        if not args.resume and not args.overwrite and self.last_path.exists():
            raise _UsageError(f"--out: {self.out} already holds a run ({self.last_path}); "
                              "pass --resume to continue it, --overwrite to start afresh, or "
                              "choose another --out")

    def _restore(self):
        where = f"--resume: {self.last_path}"
        try:
            self.model, extra = models.load_checkpoint(self.last_path, device=self.device)
            state = json.loads(str(extra["train_state"]))
            if state.get("schema") != STATE_SCHEMA:
                raise ValueError(f"training-state schema {state.get('schema')!r}, this pwconv "
                                 f"reads {STATE_SCHEMA!r}")
        except (OSError, ValueError, KeyError) as exc:
            raise _UsageError(f"{where}: not a usable training checkpoint ({exc})") from None
        diffs = _config_differences(state.get("run_config", {}), self.config)
        if diffs:
            raise _UsageError(f"{where} was written with other options ("
                              + "; ".join(diffs) + "); resume with the checkpoint's options or "
                              "train into a new --out")
        try:
            arrays = {k[len(_OPTIM_PREFIX):]: v for k, v in extra.items()
                      if k.startswith(_OPTIM_PREFIX)}
            with self.model._device_context():
                self.opt_state = optim.state_from_arrays(arrays, xp=self.model.array_module)
            params = self.model.params
            for slot, values in self.opt_state.items():
                if slot != "step" and {k: v.shape for k, v in values.items()} != {
                        k: v.shape for k, v in params.items()}:
                    raise ValueError(f"optimiser slot {slot!r} does not match the parameters")
            self.rng = np.random.default_rng()
            self.rng.bit_generator.state = state["rng_state"]
            self.epoch, self.history, self.best = (int(state["epoch"]), state["history"],
                                                   state["best"])
            self.resumed_from_device = state.get("device", "cpu")
        except (KeyError, TypeError, ValueError) as exc:
            raise _UsageError(f"{where}: the optimiser or training state is damaged "
                              f"({type(exc).__name__}: {exc})") from None

    # -- checkpoints and metrics ------------------------------------------------------------

    def _extra(self) -> dict:
        extra = {}
        if self.class_names is not None:
            extra["class_names"] = np.array(self.class_names)
        return extra

    def save(self, improved: bool):
        if improved:
            models.save(self.model, self.best_path, extra=self._extra())
        state = {"schema": STATE_SCHEMA, "epoch": self.epoch, "run_config": self.config,
                 "rng_state": self.rng.bit_generator.state, "history": self.history,
                 "best": self.best, "device": self.device}
        extra = self._extra()
        extra["train_state"] = np.array(json.dumps(state))
        for k, v in optim.state_to_arrays(self.opt_state).items():
            extra[_OPTIM_PREFIX + k] = v
        models.save(self.model, self.last_path, extra=extra)

    def write_metrics(self):
        columns = list(self.history[0])
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        _cli.atomic_write_text(self.out / "metrics.csv", buf.getvalue())
        _cli.atomic_write_text(self.out / "metrics.json", json.dumps(
            {"config": self.config, "best": self.best, "epochs": self.history}, indent=1))


_PLOT_WARNED = []


def write_plot(history: list, path) -> bool:
    """The loss and accuracy curves of `history` as a PNG; False (with a note printed once per
    process) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _PLOT_WARNED:
            print("note: matplotlib is not installed, so no curves.png is drawn "
                  "(pip install 'pwconv[plot]')", file=sys.stderr)
            _PLOT_WARNED.append(True)
        return False
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, ax in (("train_loss", "train", ax_loss), ("val_loss", "validation", ax_loss),
                           ("train_accuracy", "train", ax_acc),
                           ("val_accuracy", "validation", ax_acc),
                           ("val_mean_class_accuracy", "validation, mean class", ax_acc)):
        values = [np.nan if row[key] is None else row[key] for row in history]
        if not all(np.isnan(values)):
            ax.plot(epochs, values, marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------
# the loop


def train_step(model, loss_fn, optimizer, opt_state, points, labels, clip_norm=None):
    """One optimisation step on a batch (B, n, 3) with labels (B,).

    Returns ``(loss, n_correct, new_opt_state)``; the model's parameters are updated in
    place.  The kernel maps are computed once, by the model's forward, and reused by backward.
    `points` and `labels` may be host arrays for a model on a GPU: they are copied to its
    device (``model.device_array``), the step's one host -> device transfer; the loss and the
    count are read back.
    """
    points, labels = model.device_array(points), model.device_array(labels)
    logits = model.forward(points)
    loss = loss_fn.forward(logits, labels)  # on the device: read with the count, at the end
    grads = model.backward(loss_fn.backward(), input_grad=False)
    if clip_norm is not None:
        grads, _ = optim.clip_by_global_norm(grads, clip_norm)
    # in place: the model's own arrays and the state's slots are overwritten, nothing allocated
    _, opt_state = optimizer.update(model.params, grads, opt_state, inplace=True)
    with cupy_device_context(logits):
        n_correct = (logits.argmax(axis=1) == labels).sum()
        # one device -> host transfer for the two (stacked as float64: the count stays exact),
        # after the step's last kernel; a loss function may return a Python float too
        loss, n_correct = host_scalars([loss, n_correct])
    return float(loss), int(n_correct), opt_state


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="shape", disable=not enabled, leave=False,
                dynamic_ncols=True)


def _train_epoch(run: _Run):
    args, model, train = run.args, run.model, run.train
    loss_fn = nn.SoftmaxCrossEntropy()
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    with _progress_bar(len(train), f"epoch {run.epoch + 1}/{args.epochs}", args.progress) as bar:
        for index in data.batch_indices(len(train), args.batch_size, run.rng):
            points = data.resample_batch(train.points[index], run.config["num_points"], run.rng)
            if args.augment:
                points = data.augment(
                    points, run.rng, rotate=args.rotate,
                    scale_range=SCALE_RANGE if args.scale_shift else None,
                    shift=SHIFT if args.scale_shift else 0.0)
            labels = train.labels[index]
            loss, n_ok, run.opt_state = train_step(model, loss_fn, run.optimizer, run.opt_state,
                                                   points, labels, args.clip_norm)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss} at step {run.opt_state['step']} of epoch "
                    f"{run.epoch + 1}; start again with a lower --lr or a --clip-norm (a "
                    "--resume would replay the same steps)")
            total_loss += loss * len(index)
            correct += n_ok
            seen += len(index)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}",
                            refresh=False)
            bar.update(len(index))
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / seen, "train_accuracy": correct / seen,
            "train_time_s": seconds, "samples_per_s": seen / seconds}


def _validate(run: _Run) -> dict:
    if not len(run.val):
        return {"val_loss": None, "val_accuracy": None, "val_mean_class_accuracy": None}
    report = evaluate(run.model, run.val, seed=run.args.seed, batch_size=run.args.batch_size)
    return {"val_loss": report["loss"], "val_accuracy": report["overall_accuracy"],
            "val_mean_class_accuracy": report["mean_class_accuracy"]}


def _fmt(value, spec=".4f") -> str:
    return "-" if value is None else format(value, spec)


def _loop(run: _Run) -> int:
    args = run.args
    started = time.perf_counter()
    if run.epoch >= args.epochs:
        print(f"{run.last_path} has already completed {run.epoch} epochs (--epochs "
              f"{args.epochs}): nothing to do")
        return 0
    if run.resumed_from_device not in (None, run.device):
        print(f"note: {run.last_path} was trained on {run.resumed_from_device} and continues on "
              f"{run.device}: the same trajectory up to rounding (bit-identical to an "
              "uninterrupted run only on the same device)", file=sys.stderr, flush=True)
    print(f"training {run.model!r} on {len(run.train)} shapes (validation: {len(run.val)}), "
          f"{run.steps_per_epoch} steps per epoch, epochs {run.epoch + 1}..{args.epochs}, "
          f"on {run.device}", flush=True)
    while run.epoch < args.epochs:
        trained = _train_epoch(run)
        lr, step = run.optimizer.lr, run.opt_state["step"]
        row = {"epoch": run.epoch + 1, "step": step,
               "lr": lr(max(step - 1, 0)) if callable(lr) else lr}  # of the epoch's last step
        row.update(trained)
        row.update(_validate(run))
        run.epoch += 1
        run.history.append(row)
        acc = row["val_accuracy"]
        improved = acc is None or run.best["val_accuracy"] is None or acc > run.best[
            "val_accuracy"]
        if improved:
            run.best = {"val_accuracy": acc, "epoch": run.epoch}
        run.save(improved)
        run.saved_epoch = run.epoch
        run.write_metrics()
        if args.plot:
            write_plot(run.history, run.out / "curves.png")
        print(f"epoch {run.epoch}/{args.epochs}: train loss {row['train_loss']:.4f} acc "
              f"{row['train_accuracy']:.4f} | val loss {_fmt(row['val_loss'])} acc "
              f"{_fmt(acc)} mean class {_fmt(row['val_mean_class_accuracy'])} | "
              f"{row['train_time_s']:.1f} s, {row['samples_per_s']:.1f} shapes/s"
              + (" | best" if improved else ""), flush=True)
        elapsed = time.perf_counter() - started
        if args.time_limit is not None and elapsed >= args.time_limit and run.epoch < args.epochs:
            print(f"time limit: stopping after epoch {run.epoch} ({elapsed:.0f} s >= "
                  f"{args.time_limit:g} s); continue with --resume")
            break
    print(f"best validation accuracy {_fmt(run.best['val_accuracy'])} at epoch "
          f"{run.best['epoch']}: {run.best_path}")
    return 0


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (130 after Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _cli.checked_device(parser, args.device)
    with _cli.thread_limit(args.num_threads):
        try:
            run = _Run(args, device)
        except _UsageError as exc:
            parser.error(str(exc))
        run.out.mkdir(parents=True, exist_ok=True)
        try:
            return _loop(run)
        except KeyboardInterrupt:
            done = (f"{run.last_path} holds epoch {run.saved_epoch}" if run.saved_epoch
                    else "no epoch was completed")
            print(f"\ninterrupted: {done}; continue with --resume", file=sys.stderr)
            return 130
        except FloatingPointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
