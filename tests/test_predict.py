"""Prediction on clouds of any size: the PLY reader (pwconv_cy.ply), the classifier's predict
and the predict command (pwconv_cy.predict) on .npz and .ply input."""
import json
import re

import numpy as np
import pytest
from commands import run_command

from pwconv_cy import data, models, predict
from pwconv_cy.ply import read_ply_points


def _ply_header(fmt, n, props, before="", after=""):
    lines = ["ply", f"format {fmt} 1.0", "comment written by the test"]
    lines += [before] if before else []
    lines += [f"element vertex {n}"] + [f"property {t} {name}" for t, name in props]
    lines += [after] if after else []
    return ("\n".join(lines + ["end_header"]) + "\n").encode()


def _write_ply(path, points, fmt="ascii", extra_props=True):
    """x, y, z as float (or double for big-endian), plus normals and a colour byte."""
    n = len(points)
    ftype = "double" if fmt == "binary_big_endian" else "float"
    props = [(ftype, "x"), (ftype, "y"), (ftype, "z")]
    if extra_props:
        props = [("uchar", "red")] + props + [("float", "nx")]
    header = _ply_header(fmt, n, props, after="element face 1\nproperty list uchar int "
                                               "vertex_indices")
    if fmt == "ascii":
        rows = []
        for p in points:
            values = [f"{v:.9g}" for v in p]
            rows.append(" ".join((["7"] + values + ["0.5"]) if extra_props else values))
        body = ("\n".join(rows) + "\n3 0 1 2\n").encode()
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        fields = [(name, order + {"float": "f4", "double": "f8", "uchar": "u1"}[t])
                  for t, name in props]
        table = np.zeros(n, dtype=fields)
        for axis, name in enumerate("xyz"):
            table[name] = points[:, axis]
        body = table.tobytes() + bytes([3]) + np.array([0, 1, 2], order + "i4").tobytes()
    path.write_bytes(header + body)
    return path


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
@pytest.mark.parametrize("extra_props", [False, True])
def test_ply_reader_round_trip(tmp_path, rng, fmt, extra_props):
    points = rng.normal(size=(37, 3)).astype(np.float32)
    path = _write_ply(tmp_path / "c.ply", points, fmt, extra_props)
    read = read_ply_points(path)
    assert read.dtype == np.float64 and read.shape == (37, 3)
    # ASCII holds 9 significant digits: float32 exactly, after rounding
    np.testing.assert_array_equal(read.astype(np.float32) if fmt == "ascii" else read, points)


def test_ply_reader_skips_scalar_elements_before_the_vertices(tmp_path, rng):
    points = rng.normal(size=(5, 3))
    header = _ply_header("binary_little_endian", 5, [("double", c) for c in "xyz"],
                         before="element camera 2\nproperty float fx\nproperty uchar id")
    body = np.zeros(2, dtype=[("fx", "<f4"), ("id", "u1")]).tobytes() + points.tobytes()
    (tmp_path / "b.ply").write_bytes(header + body)
    np.testing.assert_array_equal(read_ply_points(tmp_path / "b.ply"), points)
    header = _ply_header("ascii", 2, [("int", c) for c in "xyz"],
                         before="element camera 1\nproperty float fx")
    (tmp_path / "a.ply").write_bytes(header + b"0.5\n1 2 3\n4 5 6\n")
    assert read_ply_points(tmp_path / "a.ply").tolist() == [[1, 2, 3], [4, 5, 6]]


def test_ply_reader_errors(tmp_path):
    def write(name, raw):
        (tmp_path / name).write_bytes(raw)
        return tmp_path / name

    xyz = [("float", c) for c in "xyz"]
    cases = [
        (write("a.ply", b"solid stl\n"), "not a PLY file"),
        (write("b.ply", _ply_header("binary_middle_endian", 1, xyz)),
         "unsupported format 'format binary_middle_endian 1.0'"),
        (write("c.ply", _ply_header("ascii", 1, xyz[:2]) + b"1 2\n"),
         r"no z property \(found \['x', 'y'\]\); required: x, y, z"),
        (write("d.ply", b"ply\nformat ascii 1.0\nelement face 0\nend_header\n"),
         r"no 'vertex' element \(found elements \['face'\]\)"),
        (write("e.ply", _ply_header("binary_little_endian", 4, xyz) + b"\0" * 40),
         "truncated: 4 vertices need 48 bytes, the file has 40"),
        (write("f.ply", _ply_header("ascii", 3, xyz) + b"1 2 3\n4 5 6\n"),
         "truncated: 3 vertices declared, found 2 vertex lines"),
        (write("g.ply", _ply_header("ascii", 1, xyz) + b"1 two 3\n"), "malformed vertex line"),
        (write("h.ply", _ply_header("ascii", 1, [("float128", "x")])),
         "unsupported property 'property float128 x'"),
        (write("i.ply", _ply_header("binary_little_endian", 1, xyz, before="element face 1\n"
                                    "property list uchar int vertex_indices")),
         "element 'face' with list properties comes before 'vertex'"),
        (write("j.ply", b"ply\nelement vertex 1\nproperty float x\nend_header\n"),
         "no 'format' line"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            read_ply_points(path)
    with pytest.raises(FileNotFoundError, match="absent.ply: no such file"):
        read_ply_points(tmp_path / "absent.ply")


# ------------------------------------------------------------------------------------------
# the classifier's predict


def _classifier(**kw):
    cfg = {"n_points": 32, "n_classes": 5, "channels": 3, "hidden": 8, "voxel_size": 0.4,
           "seed": 3}
    cfg.update(kw)
    return models.PointwiseCNNClassifier(**cfg)


def test_predict_resamples_and_normalises_clouds_of_any_size(rng):
    model = _classifier()
    clouds = [rng.normal(size=(m, 3)) for m in (10, 32, 200)]
    probs = model.predict(clouds, seed=5, batch_size=2)
    assert probs.shape == (3, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    # the documented recipe: normalise, then resample with default_rng(seed), cloud by cloud
    gen = np.random.default_rng(5)
    fixed = np.stack([data.resample(data.normalize_clouds(c), 32, gen) for c in clouds])
    np.testing.assert_array_equal(model.predict(clouds, seed=5), model.predict_proba(fixed))
    # batches of 2 give the same up to rounding (BLAS sums in another order)
    np.testing.assert_allclose(probs, model.predict_proba(fixed), rtol=1e-5)
    # the same shape moved and scaled: the same normalised cloud, the same prediction
    moved = [c * 30 + np.array([100.0, -4.0, 2.0]) for c in clouds]
    np.testing.assert_allclose(model.predict(moved, seed=5), probs, rtol=1e-4, atol=1e-5)
    dense = rng.normal(size=(4, 40, 3))
    assert model.predict(dense).shape == (4, 5) and model.training  # mode restored
    with pytest.raises(ValueError, match=r"cloud 1 must have shape \(m, 3\) with m >= 1, got "
                                         r"\(0, 3\)"):
        model.predict([dense[0], np.zeros((0, 3))])
    bad = dense[1].copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="cloud 0 has non-finite coordinates"):
        model.predict([bad])
    with pytest.raises(ValueError, match="clouds must be a"):
        model.predict(np.zeros((4, 3)))


# ------------------------------------------------------------------------------------------
# the command


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.npz"
    models.save(_classifier(), path,
                extra={"class_names": np.array(["cup", "cone", "box", "ball", "bowl"])})
    return path


def test_predict_command_on_npz_and_ply(tmp_path, rng, checkpoint, capsys):
    clouds = [rng.normal(size=(m, 3)).astype(np.float32) for m in (50, 20)]
    np.savez(tmp_path / "batch.npz", points=np.stack([clouds[0], clouds[0][::-1]]))
    np.savez(tmp_path / "one.npz", points=clouds[1])
    _write_ply(tmp_path / "a.ply", clouds[0], "ascii")
    _write_ply(tmp_path / "b.ply", clouds[1], "binary_little_endian")
    inputs = [tmp_path / n for n in ("batch.npz", "one.npz", "a.ply", "b.ply")]
    argv = ["--checkpoint", checkpoint, *inputs, "--top-k", 2]
    status, out, err = run_command(predict, argv, capsys)
    assert status == 0, err
    lines = out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [
        f"{inputs[0]}[0]", f"{inputs[0]}[1]", str(inputs[1]), str(inputs[2]), str(inputs[3])]
    model = models.load(checkpoint)
    expected = model.predict([clouds[0], clouds[0][::-1], clouds[1], clouds[0], clouds[1]])
    names = ["cup", "cone", "box", "ball", "bowl"]
    for line, p in zip(lines, expected):
        top = np.argsort(-p, kind="stable")[:2]
        assert line.split(": ")[1] == ", ".join(f"{c} {names[c]} ({p[c]:.3f})" for c in top)
    argv = ["--checkpoint", checkpoint, inputs[3], "--json", "--seed", 4]
    status, out, _ = run_command(predict, argv, capsys)
    record = json.loads(out)
    p = model.predict([clouds[1]], seed=4)[0]
    assert record["label"] == int(p.argmax()) and record["class_name"] == names[p.argmax()]
    assert record["n_points"] == 20 and len(record["top"]) == 3
    assert record["top"][0]["probability"] == pytest.approx(float(p.max()))


def test_predict_command_errors(tmp_path, rng, checkpoint, capsys):
    nan = rng.normal(size=(10, 3))
    nan[[2, 5], 1] = np.nan
    np.savez(tmp_path / "nan.npz", points=nan)
    np.savez(tmp_path / "nokey.npz", xyz=nan)
    np.savez(tmp_path / "shape.npz", points=np.zeros((4, 2)))
    (tmp_path / "c.xyz").write_text("1 2 3\n")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    cases = [
        (tmp_path / "nan.npz", "nan.npz: 2 points have non-finite coordinates"),
        (tmp_path / "nokey.npz", r"missing key 'points' \(found keys \['xyz'\]\)"),
        (tmp_path / "shape.npz",
         r"'points' must have shape \(n, 3\) or \(B, n, 3\), found \(4, 2\)"),
        (tmp_path / "c.xyz", "unsupported input '.xyz'; required: .ply or .npz"),
        (tmp_path / "junk.npz", "cannot be read as an .npz file"),
        (tmp_path / "absent.ply", "absent.ply: no such file"),
    ]
    for path, message in cases:
        status, _, err = run_command(predict, ["--checkpoint", checkpoint, path], capsys)
        assert status == 2 and "error: INPUT:" in err
        assert len(re.findall(message, err)) == 1, (message, err)
    argv = ["--checkpoint", tmp_path / "nan.npz", tmp_path / "nan.npz"]
    status, _, err = run_command(predict, argv, capsys)
    assert status == 2 and "--checkpoint: " in err and "not a pwconv model file" in err


def test_device_option_errors(tmp_path, checkpoint, capsys, monkeypatch):
    """--device of the three commands: a bad name, or a CUDA device where the GPU path cannot
    run, is an argparse-style error naming --device and why, before any file is read."""
    from pwconv_cy import cuda, evaluate, train

    np.savez(tmp_path / "c.npz", points=np.zeros((4, 3)))
    commands = [(predict, ["--checkpoint", checkpoint, tmp_path / "c.npz"]),
                (evaluate, ["--checkpoint", checkpoint, "--data", tmp_path / "absent.npz"]),
                (train, ["--data", tmp_path / "absent.npz", "--epochs", "1", "--out",
                         tmp_path / "o"])]
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: "CuPy is not importable (test)")
    for module, argv in commands:
        for device, message in [
                ("tpu", (r"--device: device must be 'cpu', 'cuda' or 'cuda:<index>', got str "
                         r"'tpu'")),
                ("cuda:0", (r"--device: device='cuda:0': the GPU path of pwconv is not "
                            r"available: CuPy is not importable \(test\); install CuPy"))]:
            status, _, err = run_command(module, [*argv, "--device", device], capsys)
            assert status == 2, (module.__name__, err)
            assert len(re.findall(message, err)) == 1, (module.__name__, err)
    assert not (tmp_path / "o").exists()
