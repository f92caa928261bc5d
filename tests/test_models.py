"""The paper's networks (pwconv_cy.models): gradients, save/load, devices, and short training
runs.  On a CUDA device: tests/test_models_gpu.py."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pwconv_cy import models, nn, optim


def _cloud_batch(rng, B, n):
    return rng.uniform(-0.5, 0.5, size=(B, n, 3))


def _tiny_classifier(**kw):
    cfg = {"n_points": 16, "n_classes": 3, "channels": 2, "hidden": 4, "voxel_size": 0.3,
           "dropout": 0.0, "dtype": np.float64, "seed": 1}
    cfg.update(kw)
    return models.PointwiseCNNClassifier(**cfg)


def _loss(model, ce, points, labels, feats=None, **kw):
    return float(ce.forward(model.forward(points, feats, **kw), labels))


def _check_grads(model, points, labels, rng, feats, fwd_kw=None, eps=1e-6, per_array=3):
    fwd_kw = fwd_kw or {}
    ce = nn.SoftmaxCrossEntropy()
    ce.forward(model.forward(points, feats, **fwd_kw), labels)
    grads = model.backward(ce.backward())
    d_feats = model.input_grad.copy()
    assert set(grads) == set(model.params)
    for name, arr in model.params.items():
        assert grads[name].shape == arr.shape, name
        assert np.any(grads[name] != 0), name
        for flat in rng.choice(arr.size, size=min(per_array, arr.size), replace=False):
            idx = np.unravel_index(flat, arr.shape)
            old = arr[idx]
            arr[idx] = old + eps
            up = _loss(model, ce, points, labels, feats, **fwd_kw)
            arr[idx] = old - eps
            down = _loss(model, ce, points, labels, feats, **fwd_kw)
            arr[idx] = old
            num = (up - down) / (2 * eps)
            assert abs(num - grads[name][idx]) <= 1e-6 + 1e-5 * abs(num), (name, idx, num,
                                                                             grads[name][idx])
    # input features (the coordinates as features; geometry fixed)
    for flat in rng.choice(feats.size, size=6, replace=False):
        idx = np.unravel_index(flat, feats.shape)
        f = feats.copy()
        f[idx] += eps
        up = _loss(model, ce, points, labels, f, **fwd_kw)
        f[idx] -= 2 * eps
        down = _loss(model, ce, points, labels, f, **fwd_kw)
        num = (up - down) / (2 * eps)
        assert abs(num - d_feats[idx]) <= 1e-6 + 1e-5 * abs(num), (idx, num, d_feats[idx])


def test_classifier_gradients_match_finite_differences(rng):
    model = _tiny_classifier().eval()
    points = _cloud_batch(rng, 2, 16)
    labels = np.array([0, 2])
    feats = points.copy()
    _check_grads(model, points, labels, rng, feats)
    # several neighbours per point at this voxel size (not a degenerate identity-only map)
    assert model.convs[0].kernel_map.n_pairs > 2 * 32


@pytest.mark.parametrize("make", [_tiny_classifier, lambda: models.PointwiseCNNSegmenter(
    n_classes=3, channels=2, voxel_size=0.3, dtype=np.float64, seed=1)])
def test_backward_without_input_grad_gives_the_same_parameter_gradients(rng, make):
    model = make().eval()
    points = _cloud_batch(rng, 2, 16)
    logits = model.forward(points)
    d_logits = rng.standard_normal(logits.shape)
    full = model.backward(d_logits)
    assert model.input_grad.shape == points.shape
    grads = model.backward(d_logits, input_grad=False)
    assert model.input_grad is None
    for k in full:
        np.testing.assert_array_equal(grads[k], full[k])
    with pytest.raises(TypeError, match="input_grad must be True or False"):
        model.backward(d_logits, input_grad=None)


def test_classifier_gradients_with_logits_selu_and_dropout_mask(rng):
    model = _tiny_classifier(logits_selu=True, dropout=0.5, seed=3)
    # training mode with a fixed mask: reuse the same mask on every forward
    mask = np.random.default_rng(0).random((2, 4)) >= 0.5
    fwd = model.dropout.forward
    model.dropout.forward = lambda x, mask_=None: fwd(x, mask=mask)
    points = _cloud_batch(rng, 2, 16)
    _check_grads(model, points, np.array([1, 0]), rng, points.copy())


def test_segmenter_gradients_packed_and_dense(rng):
    model = models.PointwiseCNNSegmenter(n_classes=3, channels=2, voxel_size=0.3,
                                         dtype=np.float64, seed=2)
    points = rng.uniform(-0.5, 0.5, size=(30, 3))
    offsets = np.array([0, 14, 30])
    labels = rng.integers(0, 3, size=30)
    _check_grads(model, points, labels, rng, points.copy(), fwd_kw={"offsets": offsets})
    dense = _cloud_batch(rng, 2, 12)
    out = model.forward(dense)
    assert out.shape == (2, 12, 3)
    _check_grads(model, dense, rng.integers(0, 3, size=(2, 12)), rng, dense.copy())


def test_classifier_shapes_and_errors(rng):
    model = models.PointwiseCNNClassifier(n_points=32, n_classes=5, hidden=8, seed=0)
    pts = _cloud_batch(rng, 3, 32).astype(np.float32)
    logits = model.forward(pts)
    assert logits.shape == (3, 5) and logits.dtype == np.float32
    names = list(model.params)
    assert names == ["conv0.weight", "conv1.weight", "conv2.weight", "conv3.weight",
                     "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert model.params["conv0.weight"].shape == (3, 3, 3, 3, 9)
    assert model.params["fc1.weight"].shape == (32 * 36, 8)
    assert model.n_params == sum(a.size for a in model.params.values())
    assert "total parameters" in model.summary()
    p = model.predict_proba(pts)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert model.training  # restored
    with pytest.raises(ValueError, match="n_points=32"):
        model.forward(_cloud_batch(rng, 3, 31))
    with pytest.raises(ValueError, match="shape"):
        model.forward(pts[0])
    # params are views: set_params writes back into the layers
    new = {k: v + 1 for k, v in model.params.items()}
    model.set_params(new)
    np.testing.assert_array_equal(model.fc2.params["bias"], new["fc2.bias"])
    with pytest.raises(ValueError, match="missing"):
        model.set_params({k: v for k, v in new.items() if k != "fc2.bias"})


class _FakeGpuArray:
    """Stands for a CuPy array (CUDA memory, as __cuda_array_interface__ says) on any machine."""

    def __init__(self, shape):
        self.shape = shape

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<f4", "data": (0, False), "version": 3}


def test_networks_refuse_gpu_arrays_naming_them(rng):
    """A network on the CPU refuses a GPU array with the argument's name and the way out, never
    copies it to the host and never reports it as a bad shape; predict, which resamples on the
    host on any device, says so."""
    clf = models.PointwiseCNNClassifier(n_points=16, n_classes=3, hidden=4, seed=0)
    seg = models.PointwiseCNNSegmenter(n_classes=3, channels=2, seed=0)
    pts = _cloud_batch(rng, 2, 16).astype(np.float32)
    on_gpu = _FakeGpuArray((2, 16, 3))
    calls = [(lambda: clf.forward(on_gpu), "points"),
             (lambda: clf.forward(pts, feats=_FakeGpuArray((2, 16, 3))), "feats"),
             (lambda: clf.predict_proba(on_gpu), "points"),
             (lambda: seg.forward(on_gpu), "points"),
             (lambda: seg.forward(pts, feats=_FakeGpuArray((2, 16, 3))), "feats"),
             (lambda: clf.backward(_FakeGpuArray((2, 3))), "d_logits"),
             (lambda: seg.backward(_FakeGpuArray((2, 16, 3))), "d_logits"),
             (lambda: clf.set_params({**clf.params, "fc2.bias": _FakeGpuArray((3,))}),
              "set_params: 'fc2.bias'")]
    for call, name in calls:
        with pytest.raises(TypeError, match=f"^{re.escape(name)} is in GPU memory .*cuda:.* but "
                                            r"the model is on the CPU.*model.to\('cuda'\)"):
            call()
    for call, name in [(lambda: clf.predict(on_gpu), "clouds"),
                       (lambda: clf.predict([pts[0], _FakeGpuArray((16, 3))]), "cloud 1")]:
        with pytest.raises(TypeError, match=f"^{name} is in GPU memory .*resamples clouds .* on "
                                            "the host"):
            call()
    assert clf.forward(pts).shape == (2, 3)  # host arrays still run
    clf.backward(np.ones((2, 3), np.float32))


def test_device_argument_errors_and_the_cpu_device(rng, tmp_path, monkeypatch):
    """model.to / load take 'cpu', 'cuda' or 'cuda:<index>'; anything else is refused naming
    the argument, and a CUDA device without a usable GPU path says why and what to install."""
    from pwconv_cy import cuda

    clf = models.PointwiseCNNClassifier(n_points=16, n_classes=3, hidden=4, seed=0)
    assert clf.device == "cpu" and clf.array_module is np and "device" not in repr(clf)
    before = {k: v.copy() for k, v in clf.params.items()}
    assert clf.to("cpu") is clf and clf.to(" CPU ") is clf
    for k, v in clf.params.items():
        np.testing.assert_array_equal(v, before[k])
    for bad, error in [(0, TypeError), (None, TypeError), ("gpu", ValueError),
                       ("cuda:", ValueError), ("cuda:x", ValueError), ("cuda:-1", ValueError),
                       ("cpu:0", ValueError), ("", ValueError)]:
        with pytest.raises(error, match=r"^device must be 'cpu', 'cuda' or 'cuda:<index>'"):
            clf.to(bad)
    models.save(clf, tmp_path / "clf.npz")
    with pytest.raises(ValueError, match="device must be"):
        models.load(tmp_path / "missing.npz", device="gpu")  # checked before the file is read
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: "CuPy is not importable (test)")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError, match=rf"^device='{device}': the GPU path of pwconv is "
                                               r"not available: CuPy is not importable \(test\);"
                                               r" install CuPy \(pip install pwconv\[cuda12\]"):
            clf.to(device)
        with pytest.raises(RuntimeError, match="not available"):
            models.load(tmp_path / "clf.npz", device=device)
    assert clf.device == "cpu"  # a refused move leaves the model where it was
    # device_array on the CPU: read in place, or converted
    pts = _cloud_batch(rng, 2, 16)
    assert clf.device_array(pts) is pts
    assert clf.device_array(pts.tolist(), dtype=np.float32).dtype == np.float32


def test_sort_flatten_order_is_lexsort_by_xyz():
    """The classifier's point order (three stable argsorts, as CuPy can make it) is exactly
    NumPy's lexsort by x, then y, then z, ties in input order, -0.0 equal to +0.0."""
    from pwconv_cy.nn import _lexsort_xyz

    @settings(max_examples=60, deadline=None)
    @given(st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**31 - 1),
           st.sampled_from([np.float32, np.float64]))
    def check(b, n, seed, dtype):
        r = np.random.default_rng(seed)
        # few distinct values: many ties on one, two or three keys; signed zeros among them
        points = r.choice(np.array([-1.0, -0.0, 0.0, 0.5, 1e-30]), size=(b, n, 3)).astype(dtype)
        expected = np.lexsort((points[..., 2], points[..., 1], points[..., 0]), axis=-1)
        np.testing.assert_array_equal(_lexsort_xyz(points, np), expected)

    check()


def test_save_load_round_trip(tmp_path, rng):
    clf = models.PointwiseCNNClassifier(n_points=24, n_classes=4, hidden=6, logits_selu=True,
                                        seed=7)
    pts = _cloud_batch(rng, 2, 24).astype(np.float32)
    models.save(clf, tmp_path / "clf.npz")
    back = models.load(tmp_path / "clf.npz")
    assert type(back) is models.PointwiseCNNClassifier and back.config == clf.config
    np.testing.assert_array_equal(back.eval().forward(pts), clf.eval().forward(pts))

    seg = models.PointwiseCNNSegmenter(n_classes=5, channels=4, dilations=(2, 3), seed=3,
                                       dtype=np.float64)
    packed = rng.uniform(-0.5, 0.5, size=(40, 3))
    offsets = np.array([0, 25, 40])
    models.save(seg, tmp_path / "seg.npz")
    back = models.load(tmp_path / "seg.npz")
    assert type(back) is models.PointwiseCNNSegmenter
    np.testing.assert_array_equal(back.forward(packed, offsets=offsets),
                                  seg.forward(packed, offsets=offsets))


def _rewrite(src, dst, edit):
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    edit(arrays)
    np.savez(dst, **arrays)


def test_load_refuses_corrupted_files(tmp_path):
    model = models.PointwiseCNNSegmenter(n_classes=3, channels=2, seed=0)
    src = tmp_path / "m.npz"
    models.save(model, src)

    def wrong_version(a):
        a["__format_version__"] = np.array(2)

    def missing(a):
        del a["param/conv1.weight"]

    def extra(a):
        a["param/conv9.weight"] = np.zeros(3, np.float32)

    def wrong_shape(a):
        a["param/conv4.weight"] = np.zeros((3, 3, 3, 8, 4), np.float32)

    def no_version(a):
        del a["__format_version__"]

    cases = [(wrong_version, "format version 2"), (missing, r"missing \['conv1.weight'\]"),
             (extra, r"unexpected \['conv9.weight'\]"),
             (wrong_shape, r"'conv4.weight' has shape \(3, 3, 3, 8, 4\)"),
             (no_version, "not a pwconv model file")]
    for i, (edit, message) in enumerate(cases):
        dst = tmp_path / f"bad{i}.npz"
        _rewrite(src, dst, edit)
        with pytest.raises(ValueError, match=message):
            models.load(dst)


def _train(model, points, labels, steps, lr):
    ce = nn.SoftmaxCrossEntropy()
    opt = optim.Adam(lr=lr)
    state = opt.init(model.params)
    losses = []
    for _ in range(steps):
        loss = ce.forward(model.forward(points), labels)
        grads = model.backward(ce.backward())
        new, state = opt.update(model.params, grads, state)
        model.set_params(new)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    return losses


def test_training_spheres_vs_cubes(rng):
    B, n = 16, 64
    d = rng.normal(size=(B, n, 3))
    spheres = 0.45 * d / np.linalg.norm(d, axis=-1, keepdims=True)
    cubes = rng.uniform(-0.4, 0.4, size=(B, n, 3))
    face = rng.integers(0, 3, size=(B, n))
    np.put_along_axis(cubes, face[..., None], 0.4 * rng.choice([-1.0, 1.0], size=(B, n, 1)),
                      axis=-1)
    labels = np.arange(B) % 2
    points = np.where((labels == 0)[:, None, None], spheres, cubes).astype(np.float32)
    model = models.PointwiseCNNClassifier(n_points=n, n_classes=2, hidden=32, voxel_size=0.15,
                                          seed=0)
    losses = _train(model, points, labels, steps=30, lr=1e-3)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_training_modelnet40_subset(shared_data):
    with np.load(shared_data / "modelnet40_1024" / "train.npz", allow_pickle=False) as f:
        labels_all = f["labels"]
        classes = np.unique(labels_all)[:4]
        pick = np.concatenate([np.flatnonzero(labels_all == c)[:16] for c in classes])
        points = f["points"][pick][:, ::4].astype(np.float32)  # 64 shapes x 256 points
    labels = np.searchsorted(classes, labels_all[pick])
    model = models.PointwiseCNNClassifier(n_points=256, n_classes=4, hidden=64, seed=0)
    losses = _train(model, points, labels, steps=20, lr=1e-3)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_one_kernel_map_per_dilation_per_step_shared_by_the_layers(rng, monkeypatch):
    from pwconv_cy import neighbors

    calls = {"index": 0, "maps": []}
    real_map = neighbors.NeighborIndex.kernel_map

    class CountingIndex(neighbors.NeighborIndex):
        def __init__(self, *args, **kwargs):
            calls["index"] += 1
            super().__init__(*args, **kwargs)

        def kernel_map(self, kernel_size=3, dilation=1, **kwargs):
            calls["maps"].append(dilation)
            return real_map(self, kernel_size, dilation, **kwargs)

    monkeypatch.setattr(models, "NeighborIndex", CountingIndex)
    model = models.PointwiseCNNClassifier(n_points=32, n_classes=3, hidden=4,
                                          dilations=(1, 2, 2, 3), seed=0)
    points = _cloud_batch(rng, 2, 32).astype(np.float32)
    ce = nn.SoftmaxCrossEntropy()
    ce.forward(model.forward(points), np.array([0, 2]))
    model.backward(ce.backward())
    assert calls == {"index": 1, "maps": [1, 2, 3]}  # backward computes none
    assert model.convs[1].kernel_map is model.convs[2].kernel_map


def test_save_is_atomic_and_carries_extra_arrays(tmp_path, monkeypatch):
    model = _tiny_classifier()
    models.save(model, tmp_path / "m", extra={"note": np.array("hello"), "a/b": np.arange(3)})
    back, extra = models.load_checkpoint(tmp_path / "m.npz")  # ".npz" appended, as np.savez
    assert back.config == model.config
    assert str(extra["note"]) == "hello" and extra["a/b"].tolist() == [0, 1, 2]
    assert models.load_checkpoint(tmp_path / "m.npz")[0].config == model.config
    before = (tmp_path / "m.npz").read_bytes()

    def interrupted(file, **arrays):
        file.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.save(_tiny_classifier(seed=2), tmp_path / "m.npz")
    assert (tmp_path / "m.npz").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]
    with pytest.raises(TypeError, match="extra keys must be str"):
        models.save(model, tmp_path / "x.npz", extra={1: np.zeros(1)})


def test_load_refuses_unreadable_files(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="text.npz: not a pwconv model file: cannot be read"):
        models.load(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError, match="absent.npz: no such file"):
        models.load(tmp_path / "absent.npz")


def test_dropout_rng_drives_the_masks():
    model = _tiny_classifier(dropout=0.5)
    points = _cloud_batch(np.random.default_rng(0), 2, 16)
    model.dropout_rng = np.random.default_rng(7)
    first = model.forward(points)
    model.dropout_rng = np.random.default_rng(7)
    assert np.array_equal(model.forward(points), first)
    assert not np.array_equal(model.forward(points), first)  # the generator moved on
    with pytest.raises(TypeError, match="numpy.random.Generator, got int"):
        model.dropout_rng = 7


def test_train_step_reports_the_loss_and_count_and_takes_any_loss_function(rng):
    """train_step returns (float loss, int count of correct labels, state): the loss equals the
    loss function's, the count the argmax's (read back together at the end on a GPU); a loss
    function whose forward returns a Python float works too."""
    from pwconv_cy import train

    points = _cloud_batch(rng, 4, 16)
    labels = rng.integers(0, 3, 4)

    class FloatLoss(nn.SoftmaxCrossEntropy):
        def forward(self, logits, labels):
            return float(super().forward(logits, labels))

    for loss_fn in (nn.SoftmaxCrossEntropy(), FloatLoss()):
        model = _tiny_classifier(n_classes=3)
        logits = model.forward(points)
        want_loss = float(nn.SoftmaxCrossEntropy().forward(logits, labels))
        want_ok = int((logits.argmax(axis=1) == labels).sum())
        opt = optim.SGD(0.01)
        loss, n_ok, state = train.train_step(model, loss_fn, opt, opt.init(model.params), points,
                                             labels, clip_norm=1.0)
        assert type(loss) is float and type(n_ok) is int and state["step"] == 1
        assert loss == pytest.approx(want_loss, rel=1e-12) and n_ok == want_ok
