"""The training and evaluation commands (pwconv_cy.train, pwconv_cy.evaluate): runs on small
real subsets of ModelNet40, bit-identical resume, atomic checkpoints, interruption, and a clear
argparse-style error for every bad input."""
import builtins
import csv
import json
import re
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest
from commands import run_command

from pwconv_cy import evaluate, models, train

# tiny model and batches: a step takes milliseconds (one thread: on a busy machine OpenMP
# threads waiting for each other cost more than they bring at this size)
TINY = ["--num-points", "64", "--hidden", "16", "--batch-size", "8", "--no-progress",
        "--no-plot", "--num-threads", "1"]


_CACHE: dict = {}  # module-wide results of the fixtures below (built once, on first use)


@pytest.fixture
def subset_npz(shared_data, tmp_path_factory):
    """4 classes x 10 shapes of the real ModelNet40 train split (1,024 points each)."""
    if "subset" not in _CACHE:
        with np.load(shared_data / "modelnet40_1024" / "train.npz", allow_pickle=False) as f:
            labels = f["labels"]
            pick = np.concatenate([np.flatnonzero(labels == c)[:10] for c in (0, 2, 8, 30)])
            points = f["points"][pick]
            names = f["class_names"]
        path = tmp_path_factory.mktemp("data") / "subset.npz"
        np.savez(path, points=points, labels=np.searchsorted([0, 2, 8, 30], labels[pick]),
                 class_names=names[[0, 2, 8, 30]])
        _CACHE["subset"] = path
    return _CACHE["subset"]


def _train(capsys, data, out, epochs, *extra):
    argv = ["--data", data, "--epochs", epochs, "--out", out, *TINY, *extra]
    status, stdout, err = run_command(train, argv, capsys)
    assert status == 0, err
    return stdout


def _arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _state(path):
    return json.loads(str(_arrays(path)["extra/train_state"]))


@pytest.fixture
def straight_run(subset_npz, tmp_path_factory):
    """Two uninterrupted epochs with augmentation, dropout and momentum (run once)."""
    if "straight" not in _CACHE:
        out = tmp_path_factory.mktemp("straight")
        status = train.main([str(a) for a in ["--data", subset_npz, "--epochs", 2, "--out", out,
                                              *TINY]])
        assert status == 0
        _CACHE["straight"] = out
    return _CACHE["straight"]


def _assert_same_run(a, b):
    left, right = _arrays(a / "last.npz"), _arrays(b / "last.npz")
    assert sorted(left) == sorted(right)
    for key in left:
        if key != "extra/train_state":
            assert np.array_equal(left[key], right[key]), key
    sa, sb = _state(a / "last.npz"), _state(b / "last.npz")
    assert sa["rng_state"] == sb["rng_state"] and sa["epoch"] == sb["epoch"] == 2
    timing = {"train_time_s", "samples_per_s"}
    strip = [{k: v for k, v in row.items() if k not in timing} for row in sa["history"]]
    assert strip == [{k: v for k, v in row.items() if k not in timing} for row in sb["history"]]


def test_resume_after_time_limit_is_bit_identical(subset_npz, straight_run, tmp_path, capsys):
    out = tmp_path / "run"
    stdout = _train(capsys, subset_npz, out, 2, "--time-limit", 0)
    assert "time limit: stopping after epoch 1" in stdout
    assert _state(out / "last.npz")["epoch"] == 1
    _train(capsys, subset_npz, out, 2, "--resume")
    _assert_same_run(straight_run, out)


def test_keyboard_interrupt_leaves_a_usable_checkpoint(subset_npz, straight_run, tmp_path,
                                                       capsys, monkeypatch):
    out = tmp_path / "run"
    real_step, calls = train.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # the second step of epoch 2 (5 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    argv = ["--data", subset_npz, "--epochs", 2, "--out", out, *TINY]
    status, _, err = run_command(train, argv, capsys)
    assert status == 130 and "holds epoch 1; continue with --resume" in err
    model = models.load(out / "last.npz")  # loads, and is the epoch-1 model
    assert isinstance(model, models.PointwiseCNNClassifier)
    assert _state(out / "last.npz")["epoch"] == 1
    monkeypatch.setattr(train, "train_step", real_step)
    _train(capsys, subset_npz, out, 2, "--resume")
    _assert_same_run(straight_run, out)


def test_no_rotate_and_scale_shift_change_the_run_and_resume_bit_identically(
        subset_npz, straight_run, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    options = ("--no-rotate", "--scale-shift")
    _train(capsys, subset_npz, a, 2, *options)
    _train(capsys, subset_npz, b, 2, *options, "--time-limit", 0)
    _train(capsys, subset_npz, b, 2, *options, "--resume")
    _assert_same_run(a, b)
    config = _state(a / "last.npz")["run_config"]
    assert config["rotate"] is False and config["scale_shift"] is True
    other, base = _arrays(a / "last.npz"), _arrays(straight_run / "last.npz")
    assert not np.array_equal(other["param/conv0.weight"], base["param/conv0.weight"])


def test_resume_with_more_epochs_continues_the_paper_schedule(subset_npz, straight_run, tmp_path,
                                                              capsys):
    out = tmp_path / "run"
    _train(capsys, subset_npz, out, 1)
    _train(capsys, subset_npz, out, 2, "--resume")
    _assert_same_run(straight_run, out)
    stdout = _train(capsys, subset_npz, out, 2, "--resume")
    assert "already completed 2 epochs" in stdout


def test_checkpoint_write_is_atomic(subset_npz, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _train(capsys, subset_npz, out, 1)
    before = _arrays(out / "last.npz")
    real_savez = np.savez

    def failing_savez(file, **arrays):
        real_savez(file, **arrays)
        file.write(b"half")  # the new file is partly written ...
        raise OSError("disk full")  # ... when the disk fills up

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        train.main([str(a) for a in ["--data", subset_npz, "--epochs", 2, "--out", out, *TINY,
                                     "--resume"]])
    after = _arrays(out / "last.npz")
    assert sorted(after) == sorted(before)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in out.iterdir()) == ["best.npz", "last.npz", "metrics.csv",
                                                     "metrics.json"]  # no temporary files left


def test_metrics_files_and_plot(subset_npz, straight_run, tmp_path, capsys, monkeypatch):
    with open(straight_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [int(r["step"]) for r in rows] == [5, 10]  # 36 training shapes, batches of 8
    report = json.loads((straight_run / "metrics.json").read_text())
    assert [r["epoch"] for r in report["epochs"]] == [1, 2]
    for row in report["epochs"]:
        assert 0 <= row["val_accuracy"] <= 1 and row["samples_per_s"] > 0
    assert report["config"]["num_points"] == 64 and report["config"]["optimizer"] == "momentum"
    best = report["best"]
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in report["epochs"])
    assert models.load(straight_run / "best.npz").config == models.load(
        straight_run / "last.npz").config

    argv = ["--data", subset_npz, "--epochs", 2, "--out", tmp_path / "plot",
            *[a for a in TINY if a != "--no-plot"], "--limit", 3]
    assert run_command(train, argv, capsys)[0] == 0
    png = (tmp_path / "plot" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(train, "_PLOT_WARNED", [])
    argv[5] = tmp_path / "noplot"
    status, _, err = run_command(train, argv, capsys)
    assert status == 0 and err.count("matplotlib is not installed") == 1
    assert not (tmp_path / "noplot" / "curves.png").exists()


def test_training_on_real_modelnet_subset_lowers_the_loss(subset_npz, tmp_path, capsys):
    out = tmp_path / "run"
    _train(capsys, subset_npz, out, 5, "--optimizer", "adam", "--no-augment", "--hidden", "64",
           "--num-points", "128", "--val-fraction", "0.2", "--dropout", "0")
    losses = [r["train_loss"] for r in _state(out / "last.npz")["history"]]
    assert losses[-1] < 0.7 * losses[0], losses


def test_evaluate_reports_metrics_and_json_last_line(subset_npz, straight_run, tmp_path, capsys):
    out_json = tmp_path / "report.json"
    argv = ["--checkpoint", straight_run / "best.npz", "--data", subset_npz, "--out-json",
            out_json]
    status, stdout, err = run_command(evaluate, argv, capsys)
    assert status == 0, err
    last = json.loads(stdout.strip().splitlines()[-1])
    assert 0 <= last["overall_accuracy"] <= 1 and 0 <= last["mean_class_accuracy"] <= 1
    assert "confusion matrix" in stdout and "airplane" in stdout
    report = json.loads(out_json.read_text())
    # the same figures from the model's own predictions, counted by hand
    model = models.load(straight_run / "best.npz")
    with np.load(subset_npz) as f:
        labels = f["labels"]
        from pwconv_cy.data import normalize_clouds

        probs = model.predict(normalize_clouds(f["points"].astype(np.float32)), seed=0)
    pred = probs.argmax(axis=1)
    assert report["overall_accuracy"] == last["overall_accuracy"] == np.mean(pred == labels)
    cm = np.zeros((4, 4), int)
    for t, p in zip(labels, pred):
        cm[t, p] += 1
    assert report["confusion_matrix"] == cm.tolist()
    per_class = [np.mean(pred[labels == c] == c) for c in range(4)]
    assert report["per_class_accuracy"] == pytest.approx(per_class)
    assert last["mean_class_accuracy"] == pytest.approx(np.mean(per_class))
    assert report["class_names"][:2] == ["airplane", "bed"]


def test_evaluate_runs_as_a_module_and_console_scripts_are_declared(subset_npz, straight_run,
                                                                   tmp_path):
    # from outside the checkout, whose pwconv_cy/ has no compiled module
    proc = subprocess.run([sys.executable, "-m", "pwconv_cy.evaluate", "--checkpoint",
                           str(straight_run / "best.npz"), "--data", str(subset_npz)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "overall_accuracy" in json.loads(proc.stdout.strip().splitlines()[-1])
    installed = metadata.entry_points()
    console = (installed.select(group="console_scripts") if hasattr(installed, "select")
               else installed.get("console_scripts", []))  # Python 3.9: a dict of groups
    scripts = {e.name: e.value for e in console if e.name.startswith("pwconv-")}
    assert scripts == {"pwconv-train": "pwconv_cy.train:main",
                       "pwconv-evaluate": "pwconv_cy.evaluate:main",
                       "pwconv-predict": "pwconv_cy.predict:main"}


# ------------------------------------------------------------------------------------------
# bad input: an argparse-style exit (status 2) naming the argument, what was found and what is
# required, before any work


def _synthetic(path, n_shapes=12, n_points=16, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"points": rng.normal(size=(n_shapes, n_points, 3)).astype(np.float32),
              "labels": np.arange(n_shapes) % 3}
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def _nan_points():
    p = np.zeros((12, 16, 3), np.float32)
    p[5, 3, 1] = np.nan
    return p


BAD_DATA = [
    ({"points": None}, r"--data: .*missing key 'points' \(found keys \['labels'\]\)"),
    ({"labels": None}, r"missing key 'labels'.*required: 'points' \(n_shapes, n_points, 3\)"),
    ({"points": np.zeros((12, 16))},
     r"'points' must have shape \(n_shapes, n_points, 3\), found shape \(12, 16\)"),
    ({"points": np.zeros((12, 16, 2))}, r"found shape \(12, 16, 2\)"),
    ({"points": np.full((12, 16, 3), "a")}, r"'points' must be real numbers .*found dtype <U1"),
    ({"points": _nan_points()}, r"non-finite coordinates .* the first is cloud 5"),
    ({"labels": np.arange(12) / 2}, r"'labels' must be integers .*found dtype float64"),
    ({"labels": np.arange(12) - 1},
     r"'labels' out of range: found labels from -1 to 10, required 0 <= label"),
    ({"labels": np.arange(10)},
     r"'labels' must have shape \(n_shapes,\) = \(12,\), found shape \(10,\)"),
    ({"class_names": np.array(["a", "b"])},
     r"found labels from 0 to 2, required 0 <= label <= 1"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_DATA)
def test_bad_data_file_is_a_clear_error(tmp_path, capsys, overrides, message):
    path = _synthetic(tmp_path / "bad.npz", **overrides)
    argv = ["--data", path, "--epochs", 1, "--out", tmp_path / "o"]
    status, _, err = run_command(train, argv, capsys)
    assert status == 2 and "error: --data:" in err
    assert len(re.findall(message, err)) == 1, err
    assert not (tmp_path / "o").exists()


def test_unreadable_data_files(tmp_path, capsys):
    (tmp_path / "text.npz").write_text("not a zip")
    cases = [(tmp_path / "absent.npz", "absent.npz: no such file"),
             (tmp_path / "text.npz", "text.npz: cannot be read as an .npz file")]
    for path, message in cases:
        argv = ["--data", path, "--epochs", 1, "--out", tmp_path / "o"]
        status, _, err = run_command(train, argv, capsys)
        assert status == 2 and message in err, err


@pytest.mark.parametrize(("argv", "message"), [
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got '0'"),
    (["--val-fraction", "1.5"], r"argument --val-fraction: must be in \[0, 1\), got '1.5'"),
    (["--dilations", "1,x"], "argument --dilations: must be comma-separated positive integers"),
    (["--lr", "-1"], "argument --lr: must be a finite number >= 0, got '-1'"),
    (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
    (["--batch-size", "11"], r"--batch-size 11 is larger than the training set: 9 shapes"),
    (["--warmup-steps", "5"], "--warmup-steps 5 applies to --schedule cosine only"),
    (["--device", "gpu"], (r"--device: device must be 'cpu', 'cuda' or 'cuda:<index>', got "
                           r"str 'gpu'")),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, argv, message):
    data = _synthetic(tmp_path / "d.npz")
    base = {"--data": data, "--epochs": "1", "--out": tmp_path / "o", "--batch-size": "4"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    argv = [x for kv in base.items() for x in kv] + ["--no-progress"]
    status, _, err = run_command(train, argv, capsys)
    assert status == 2
    assert len(re.findall(message, err)) == 1, err


def test_out_folder_and_resume_errors(tmp_path, capsys):
    data = _synthetic(tmp_path / "d.npz")
    out = tmp_path / "run"
    base = ["--data", data, "--out", out, "--batch-size", "4", "--no-progress", "--no-plot",
            "--voxel-size", "0.5", "--hidden", "8", "--num-threads", "1"]
    status, _, err = run_command(train, base + ["--epochs", 1, "--resume"], capsys)
    assert status == 2 and f"--resume: there is no checkpoint {out / 'last.npz'}" in err
    assert run_command(train, base + ["--epochs", 1], capsys)[0] == 0
    status, _, err = run_command(train, base + ["--epochs", 1], capsys)
    assert status == 2 and "already holds a run" in err and "--resume" in err
    assert run_command(train, base + ["--epochs", 1, "--overwrite"], capsys)[0] == 0
    status, _, err = run_command(train, base + ["--epochs", 2, "--resume", "--lr", "0.01",
                                         "--no-augment"], capsys)
    assert status == 2
    assert "--lr: 0.001 in the checkpoint, 0.01 now; --no-augment: not given in the " \
           "checkpoint, given now" in err
    other = _synthetic(tmp_path / "other.npz", n_shapes=15)
    argv = ["--data", other, *base[2:], "--epochs", 2, "--resume"]
    status, _, err = run_command(train, argv, capsys)
    assert status == 2 and "--data: 12 shapes of 16 points, CRC-32" in err
    assert "in the checkpoint, 15 shapes of 16 points" in err
    status, _, err = run_command(train, base + ["--epochs", 2, "--resume", "--no-rotate"], capsys)
    assert status == 2 and "--no-rotate: not given in the checkpoint, given now" in err
    status, _, err = run_command(train, base + ["--epochs", 2, "--resume", "--schedule", "cosine"],
                          capsys)
    assert status == 2 and "--schedule: 'paper' in the checkpoint, 'cosine' now" in err
    (tmp_path / "file").write_text("")
    argv = ["--data", data, "--out", tmp_path / "file", "--epochs", 1]
    status, _, err = run_command(train, argv, capsys)
    assert status == 2 and "exists and is not a folder" in err


def test_resume_refuses_a_broken_checkpoint(tmp_path, capsys):
    data = _synthetic(tmp_path / "d.npz")
    out = tmp_path / "run"
    base = ["--data", data, "--out", out, "--batch-size", "4", "--no-progress", "--no-plot",
            "--voxel-size", "0.5", "--hidden", "8", "--epochs", "2", "--num-threads", "1"]
    assert run_command(train, base + ["--time-limit", "0"], capsys)[0] == 0
    good = _arrays(out / "last.npz")
    for edit, message in [
        (lambda a: a.update({"__format_version__": np.array(7)}), "format version 7"),
        (lambda a: a.pop("extra/train_state"), "not a usable training checkpoint"),
        (lambda a: a.update({"param/fc2.bias": np.zeros(5, np.float32)}),
         r"'fc2.bias' has shape \(5,\)"),
        (lambda a: a.update({"extra/optimizer/momentum_buffer/fc2.bias": np.zeros(5)}),
         "the optimiser or training state is damaged .*'momentum_buffer' does not match"),
    ]:
        arrays = dict(good)
        edit(arrays)
        np.savez(out / "last.npz", **arrays)
        status, _, err = run_command(train, base + ["--resume"], capsys)
        assert status == 2 and "--resume:" in err
        assert len(re.findall(message, err)) == 1, err
    (out / "last.npz").write_bytes(b"garbage")
    status, _, err = run_command(train, base + ["--resume"], capsys)
    assert status == 2 and "not a pwconv model file" in err


def test_evaluate_bad_inputs(subset_npz, straight_run, tmp_path, capsys):
    best = straight_run / "best.npz"
    (tmp_path / "junk.npz").write_bytes(b"junk")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    seg = models.PointwiseCNNSegmenter(n_classes=4, channels=2)
    models.save(seg, tmp_path / "seg.npz")
    arrays = _arrays(best)
    arrays["param/fc1.weight"] = arrays["param/fc1.weight"][:-1]
    np.savez(tmp_path / "shape.npz", **arrays)
    many = _synthetic(tmp_path / "many.npz", n_points=64, labels=np.arange(12) % 6)
    names = _synthetic(tmp_path / "names.npz", n_points=64, labels=np.arange(12) % 4,
                       class_names=np.array(["a", "b", "c", "d"]))
    cases = [
        (tmp_path / "absent.npz", subset_npz, "--checkpoint: .*absent.npz: no such file"),
        (tmp_path / "junk.npz", subset_npz, "--checkpoint: .*not a pwconv model file"),
        (tmp_path / "plain.npz", subset_npz, "not a pwconv model file .*__format_version__"),
        (tmp_path / "seg.npz", subset_npz,
         "holds a PointwiseCNNSegmenter; this command needs a PointwiseCNNClassifier"),
        (tmp_path / "shape.npz", subset_npz,
         r"'fc1.weight' has shape \(2303, 16\), the model expects \(2304, 16\)"),
        (best, tmp_path / "absent.npz", "--data: .*no such file"),
        (best, many, r"--data: .*has labels up to 5, but the classifier .* has 4 classes"),
        (best, names, (r"class names of .* \(4 classes: a, b, c, d\) differ .* \(4 classes: "
                       r"airplane, bed, chair, sofa\)")),
    ]
    for checkpoint, data, message in cases:
        status, _, err = run_command(evaluate, ["--checkpoint", checkpoint, "--data", data], capsys)
        assert status == 2, err
        assert len(re.findall(message, err)) == 1, (message, err)


def test_resume_treats_checkpoints_from_before_no_rotate_as_rotating():
    from pwconv_cy.train import _config_differences

    now = {k: None for k in train._TRAJECTORY_OPTIONS} | {"data": None, "schedule": "paper"}
    saved = {k: v for k, v in now.items() if k != "rotate"}  # written before --no-rotate existed
    assert _config_differences(saved, {**now, "rotate": True}) == []
    assert _config_differences(saved, {**now, "rotate": False}) == [
        "--no-rotate: not given in the checkpoint, given now"]
