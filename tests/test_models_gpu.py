"""The paper's networks and their training on a CUDA device (``model.to("cuda")``, the commands'
``--device cuda``): the same kernel maps as on the CPU, forward and gradients equal to the CPU's
(norm-wise, 1e-10 in float64, 1e-4 in float32: the whole network, cuBLAS against the host BLAS),
bit-identical across GPU runs, training steps that follow the CPU's, checkpoints that move
between devices, and errors naming the argument for arrays on the wrong device.

Every test here needs CuPy and a CUDA device and is skipped, with the reason, without them (CI);
``benchmarks/gpu_check.sh`` runs them on a GPU machine.  The device-independent parts (device
names, the refusals on a CPU model, the point order CuPy makes) are tested in test_models.py.
"""
import json

import numpy as np
import pytest
from commands import run_command

from pwconv_cy import cuda, evaluate, models, nn, optim, predict, train

_REASON = cuda.unavailable_reason()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_REASON is not None,
                                 reason=f"needs CuPy and a CUDA device: {_REASON}")]


def _host(x):
    import cupy

    return cupy.asnumpy(x) if isinstance(x, cupy.ndarray) else np.asarray(x)


def _assert_close(gpu, cpu, rtol, what):
    """Norm-wise relative difference (SPEC: forward and gradients within rtol of the CPU's)."""
    g, c = _host(gpu).astype(np.float64), np.asarray(cpu, dtype=np.float64)
    assert g.shape == c.shape, (what, g.shape, c.shape)
    err = np.linalg.norm(g - c) / max(np.linalg.norm(c), 1e-300)
    assert err <= rtol, f"{what}: relative difference {err:.3g} > {rtol:g}"


def _rtol(dtype):
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-4


def _clouds(rng, b, n, dtype):
    return rng.uniform(-1.0, 1.0, size=(b, n, 3)).astype(dtype)


def _assert_same_maps(gpu_model, cpu_model):
    assert sorted(gpu_model.kernel_maps) == sorted(cpu_model.kernel_maps)
    for s, ck in cpu_model.kernel_maps.items():
        gk = gpu_model.kernel_maps[s]
        for field in ("splits", "index", "cell"):
            np.testing.assert_array_equal(_host(getattr(gk, field)), getattr(ck, field),
                                          err_msg=f"dilation {s}: {field}")


def test_point_order_on_gpu_is_numpys_lexsort():
    """SortFlatten's order made by CuPy's stable argsorts is np.lexsort's: ties on one, two and
    three keys, and signed zeros, which a radix sort would otherwise tell apart."""
    import cupy

    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        points = rng.choice(np.array([-1.0, -0.0, 0.0, 0.5, 1e-30]),
                            size=(6, 300, 3)).astype(dtype)
        feats = rng.normal(size=(6, 300, 2)).astype(dtype)
        expected = np.lexsort((points[..., 2], points[..., 1], points[..., 0]), axis=-1)
        layer = nn.SortFlatten()
        out = layer.forward(cupy.asarray(points), cupy.asarray(feats))
        np.testing.assert_array_equal(_host(layer.permutation), expected)
        np.testing.assert_array_equal(
            _host(out), feats[np.arange(6)[:, None], expected].reshape(6, -1))
        d, _ = layer.backward(out)
        np.testing.assert_array_equal(_host(d), feats)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_classifier_on_gpu_equals_cpu(dtype, rng):
    """Training mode (dropout on: the masks come from the same host Generator), forward and
    every gradient, the input gradient included; identical kernel maps; bit-identical twice."""
    import cupy

    points = _clouds(rng, 3, 96, dtype)
    labels = np.array([0, 2, 1])
    runs = []
    for device in ("cpu", "cuda", "cuda"):
        model = models.PointwiseCNNClassifier(n_points=96, n_classes=4, channels=5, hidden=32,
                                              voxel_size=0.35, dtype=dtype, seed=11).to(device)
        assert model.device == ("cpu" if device == "cpu" else "cuda:0")
        loss_fn = nn.SoftmaxCrossEntropy()
        x = model.device_array(points)
        y = model.device_array(labels)
        logits = model.forward(x)
        assert isinstance(logits, cupy.ndarray) == (device != "cpu")
        loss = float(loss_fn.forward(logits, y))
        grads = model.backward(loss_fn.backward())
        runs.append((model, logits, loss, grads, model.input_grad,
                     _host(model.dropout.mask)))
    (cpu, c_logits, c_loss, c_grads, c_in, c_mask), gpu_runs = runs[0], runs[1:]
    for model, logits, loss, grads, d_in, mask in gpu_runs:
        np.testing.assert_array_equal(mask, c_mask)
        _assert_same_maps(model, cpu)
        _assert_close(logits, c_logits, _rtol(dtype), "logits")
        assert abs(loss - c_loss) <= 10 * _rtol(dtype) * abs(c_loss)
        assert list(grads) == list(c_grads)
        for key in grads:
            assert isinstance(grads[key], cupy.ndarray), key
            _assert_close(grads[key], c_grads[key], _rtol(dtype), key)
        _assert_close(d_in, c_in, _rtol(dtype), "input gradient")
    (_, l1, _, g1, i1, _), (_, l2, _, g2, i2, _) = gpu_runs
    np.testing.assert_array_equal(_host(l1), _host(l2))
    np.testing.assert_array_equal(_host(i1), _host(i2))
    for key in g1:
        np.testing.assert_array_equal(_host(g1[key]), _host(g2[key]), err_msg=key)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_segmenter_on_gpu_equals_cpu(dtype, rng):
    """Packed clouds with offsets (an empty cloud among them) and dense batches."""
    import cupy

    sizes = [70, 0, 130, 45]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    packed = rng.uniform(-1, 1, size=(offsets[-1], 3)).astype(dtype)
    feats = rng.normal(size=(offsets[-1], 4)).astype(dtype)
    dense = _clouds(rng, 2, 50, dtype)
    cases = [(packed, feats, offsets), (dense, None, None)]
    for points, f, off in cases:
        outs = []
        for device in ("cpu", "cuda"):
            in_ch = 3 if f is None else f.shape[1]
            model = models.PointwiseCNNSegmenter(n_classes=3, in_channels=in_ch, channels=4,
                                                 voxel_size=0.4, dtype=dtype,
                                                 seed=5).to(device)
            xp = model.array_module
            logits = model.forward(model.device_array(points),
                                   None if f is None else model.device_array(f),
                                   offsets=None if off is None else xp.asarray(off))
            d = xp.asarray(np.linspace(-1, 1, logits.size).reshape(logits.shape).astype(dtype))
            grads = model.backward(d)
            outs.append((model, logits, grads, model.input_grad))
        (cpu, c_logits, c_grads, c_in), (gpu, g_logits, g_grads, g_in) = outs
        assert isinstance(g_logits, cupy.ndarray)
        _assert_same_maps(gpu, cpu)
        _assert_close(g_logits, c_logits, _rtol(dtype), "segmenter logits")
        for key in c_grads:
            _assert_close(g_grads[key], c_grads[key], _rtol(dtype), key)
        _assert_close(g_in, c_in, _rtol(dtype), "segmenter input gradient")


def test_training_steps_on_gpu_follow_the_cpu(rng):
    """Five train_steps (host batches, copied by train_step; dropout; momentum; clipping)
    in float64: the parameters and the momentum buffers stay within 1e-9 of the CPU's."""
    batches = [(_clouds(rng, 4, 64, np.float64), rng.integers(0, 3, 4)) for _ in range(5)]
    finals = []
    for device in ("cpu", "cuda"):
        model = models.PointwiseCNNClassifier(n_points=64, n_classes=3, channels=4, hidden=16,
                                              voxel_size=0.4, dtype=np.float64,
                                              seed=2).to(device)
        opt = optim.SGD(0.05, momentum=0.9)
        state = opt.init(model.params)
        loss_fn = nn.SoftmaxCrossEntropy()
        losses = []
        for points, labels in batches:
            loss, n_ok, state = train.train_step(model, loss_fn, opt, state, points, labels,
                                                 clip_norm=5.0)
            assert 0 <= n_ok <= len(labels)
            losses.append(loss)
        finals.append((model.params, state, losses))
    (c_params, c_state, c_losses), (g_params, g_state, g_losses) = finals
    np.testing.assert_allclose(g_losses, c_losses, rtol=1e-9)
    for key in c_params:
        _assert_close(g_params[key], c_params[key], 1e-9, key)
        _assert_close(g_state["momentum_buffer"][key], c_state["momentum_buffer"][key], 1e-9,
                      f"momentum {key}")


def test_models_move_save_and_load_between_devices(tmp_path, rng):
    """to('cuda') / to('cpu') keep the parameters exactly; a GPU model saves from the host and
    loads on either device; set_params takes device arrays; predict returns host arrays."""
    import cupy

    clf = models.PointwiseCNNClassifier(n_points=32, n_classes=3, channels=3, hidden=8,
                                        voxel_size=0.5, seed=4)
    before = {k: v.copy() for k, v in clf.params.items()}
    assert clf.to("cuda:0") is clf and clf.device == "cuda:0" and clf.array_module is cupy
    assert "device='cuda:0'" in repr(clf)
    assert all(isinstance(v, cupy.ndarray) for v in clf.params.values())
    models.save(clf, tmp_path / "gpu.npz")
    with np.load(tmp_path / "gpu.npz") as f:
        for k, v in before.items():
            np.testing.assert_array_equal(f[f"param/{k}"], v)
    on_cpu = models.load(tmp_path / "gpu.npz")
    on_gpu = models.load(tmp_path / "gpu.npz", device="cuda")
    assert on_cpu.device == "cpu" and on_gpu.device == "cuda:0"
    points = _clouds(rng, 5, 40, np.float32)
    p_cpu = on_cpu.predict(points, seed=3)
    p_gpu = on_gpu.predict(points, seed=3, batch_size=2)
    assert type(p_gpu) is np.ndarray and p_gpu.shape == (5, 3)
    _assert_close(p_gpu, p_cpu, 1e-4, "predict")
    clf.to("cpu")
    for k, v in clf.params.items():
        assert type(v) is np.ndarray
        np.testing.assert_array_equal(v, before[k])
    # set_params on the GPU writes device arrays in place, and refuses host ones
    on_gpu.set_params({k: v * 2 for k, v in on_gpu.params.items()})
    np.testing.assert_array_equal(_host(on_gpu.params["fc2.bias"]), before["fc2.bias"] * 2)
    with pytest.raises(TypeError, match=r"^set_params: 'conv0.weight' is a host array .* but "
                                        r"the model is on cuda:0"):
        on_gpu.set_params(before)


def _device_count() -> int:
    if _REASON is not None:
        return 0
    import cupy

    return cupy.cuda.runtime.getDeviceCount()


@pytest.mark.skipif(_REASON is None and _device_count() < 2,
                    reason=f"needs two CUDA devices, found {_device_count()}")
def test_layers_optimisers_and_networks_on_a_second_device(rng):
    """Layers, optimisers and a network on cuda:1 while cuda:0 is current: everything is
    computed and kept on cuda:1 (CuPy allocates on the current device and would copy inputs
    there), with the same results as on cuda:0."""
    import cupy

    points = _clouds(rng, 4, 64, np.float64)
    labels = rng.integers(0, 3, 4)
    grad = rng.standard_normal((4 * 64, 6))

    def run(device_id):
        assert cupy.cuda.Device().id == 0
        dev = f"cuda:{device_id}"
        with cupy.cuda.Device(device_id):
            pts, dy = cupy.asarray(points), cupy.asarray(grad)
        out = {}
        # layers: a pointwise layer, SELU, a linear layer, alpha-dropout and the loss
        conv = nn.PointwiseConv(3, 6, 0.4, dtype=np.float64, rng=np.random.default_rng(1))
        lin = nn.Linear(6, 6, dtype=np.float64, rng=np.random.default_rng(2))
        drop = nn.AlphaDropout(0.3, rng=np.random.default_rng(3))
        for layer in (conv, lin):
            with cupy.cuda.Device(device_id):
                layer.params = {k: cupy.asarray(v) for k, v in layer.params.items()}
        flat = pts.reshape(-1, 3)
        h = conv.forward(flat, flat)
        h = drop.forward(nn.SELU().forward(h))
        out["h"] = lin.forward(h)
        out["dh"] = drop.backward(lin.backward(dy)[0])[0]
        out["dx"] = conv.backward(out["dh"])[0]
        out.update({f"d{k}": v for k, v in conv.grads.items()})
        # optimisers: a step of SGD with momentum and one of Adam
        for name, opt in (("sgd", optim.SGD(0.1, momentum=0.9)), ("adam", optim.Adam(0.01))):
            state = opt.init(conv.params)
            new, state = opt.update(conv.params, conv.grads, state)
            out[f"{name}.weight"] = new["weight"]
            out.update({f"{name}.{slot}": v["weight"] for slot, v in state.items()
                        if isinstance(v, dict)})
        # the classifier: to(), a training step (host batch, uploaded), predict
        model = models.PointwiseCNNClassifier(n_points=64, n_classes=3, channels=4, hidden=8,
                                              voxel_size=0.4, dtype=np.float64,
                                              seed=2).to(dev)
        opt = optim.SGD(0.05, momentum=0.9)
        with cupy.cuda.Device(device_id):
            state = opt.init(model.params)
        loss, _, state = train.train_step(model, nn.SoftmaxCrossEntropy(), opt, state, points,
                                          labels)
        out.update({f"model.{k}": v for k, v in model.params.items()})
        out["logits"] = model.forward(model.device_array(points))
        out["proba"] = model.predict_proba(model.device_array(points))
        predicted = model.predict(points[:3, :50], seed=1)  # host clouds in, host out
        assert cupy.cuda.Device().id == 0
        return out, (loss, predicted)

    on0, (loss0, predicted0) = run(0)
    on1, (loss1, predicted1) = run(1)
    assert loss1 == loss0
    np.testing.assert_array_equal(predicted1, predicted0)
    for name, a in on1.items():
        assert a.device.id == 1, f"{name} came back on device {a.device.id}, not 1"
        np.testing.assert_array_equal(_host(a), _host(on0[name]), err_msg=name)


def test_gpu_model_refuses_host_arrays_naming_them(rng):
    """No silent host -> device copies: the argument is named with the way out."""
    import cupy

    clf = models.PointwiseCNNClassifier(n_points=16, n_classes=3, hidden=4, seed=0).to("cuda")
    seg = models.PointwiseCNNSegmenter(n_classes=3, channels=2, seed=0).to("cuda")
    pts = _clouds(rng, 2, 16, np.float32)
    calls = [(lambda: clf.forward(pts), "points"),
             (lambda: clf.forward(cupy.asarray(pts), feats=pts), "feats"),
             (lambda: seg.forward(pts), "points"),
             (lambda: clf.predict_proba(pts), "points")]
    for call, name in calls:
        with pytest.raises(TypeError, match=rf"^{name} is a host array .* but the model is on "
                                            r"cuda:0.*model.device_array"):
            call()
    clf.forward(cupy.asarray(pts))
    with pytest.raises(TypeError, match="^d_logits is a host array"):
        clf.backward(np.ones((2, 3), np.float32))
    cpu_model = models.PointwiseCNNClassifier(n_points=16, n_classes=3, hidden=4, seed=0)
    with pytest.raises(TypeError, match=r"^points is in GPU memory .* but the model is on the "
                                        r"CPU"):
        cpu_model.forward(cupy.asarray(pts))


def _small_modelnet(shared_data, tmp_path):
    """The first 32 shapes of the real ModelNet40 train split (what gpu_data.py carries to a GPU
    machine), labelled 0-3 in turn: they are all airplanes, and what is tested is that the GPU
    follows the CPU's trajectory on real geometry, not what the network learns."""
    with np.load(shared_data / "modelnet40_1024" / "train.npz", allow_pickle=False) as f:
        points = f["points"][:32]
    path = tmp_path / "modelnet32.npz"
    np.savez(path, points=points, labels=np.arange(len(points)) % 4,
             class_names=np.array([f"group{c}" for c in range(4)]))
    return path


def test_train_evaluate_predict_commands_on_gpu(shared_data, tmp_path, capsys):
    """--device cuda on real ModelNet40 shapes: two epochs whose losses follow the CPU run's,
    a resume bit-identical to the uninterrupted GPU run, and evaluate / predict on the GPU
    agreeing with the CPU."""
    data_path = _small_modelnet(shared_data, tmp_path)
    common = ["--data", data_path, "--num-points", "256", "--hidden", "32", "--batch-size", "8",
              "--val-fraction", "0.25", "--no-progress", "--no-plot", "--epochs", "2"]
    runs = {}
    for name, extra in [("cpu", ["--device", "cpu"]), ("gpu", ["--device", "cuda"]),
                        ("gpu_resumed", ["--device", "cuda", "--time-limit", "0"])]:
        status, out, err = run_command(train, [*common, "--out", tmp_path / name, *extra],
                                       capsys)
        assert status == 0, err
        if name == "gpu_resumed":
            assert "time limit: stopping after epoch 1" in out
            status, out, err = run_command(
                train, [*common, "--out", tmp_path / name, "--device", "cuda", "--resume"],
                capsys)
            assert status == 0, err
        else:
            assert f"on {'cpu' if name == 'cpu' else 'cuda:0'}" in out
        with np.load(tmp_path / name / "last.npz", allow_pickle=False) as f:
            runs[name] = {k: f[k] for k in f.files}
    cpu_hist = json.loads(str(runs["cpu"]["extra/train_state"]))["history"]
    gpu_state = json.loads(str(runs["gpu"]["extra/train_state"]))
    assert gpu_state["device"] == "cuda:0"
    for c_row, g_row in zip(cpu_hist, gpu_state["history"]):
        assert abs(g_row["train_loss"] - c_row["train_loss"]) <= 1e-3 * abs(c_row["train_loss"])
    for key, value in runs["gpu"].items():  # the resumed GPU run is the GPU run, bit for bit
        if key != "extra/train_state":
            np.testing.assert_array_equal(runs["gpu_resumed"][key], value, err_msg=key)
    for key in runs["cpu"]:
        if key.startswith("param/"):
            _assert_close(runs["gpu"][key], runs["cpu"][key], 1e-3, key)
    # a GPU-trained checkpoint evaluated and used for prediction on both devices
    reports = {}
    for device in ("cpu", "cuda"):
        status, out, err = run_command(evaluate, ["--checkpoint", tmp_path / "gpu" / "last.npz",
                                                  "--data", data_path, "--device", device],
                                       capsys)
        assert status == 0, err
        reports[device] = json.loads(out.strip().splitlines()[-1])
    assert abs(reports["cuda"]["loss"] - reports["cpu"]["loss"]) <= 1e-4 * reports["cpu"]["loss"]
    np.savez(tmp_path / "clouds.npz", points=np.load(data_path)["points"][:4])
    outputs = {}
    for device in ("cpu", "cuda"):
        status, out, err = run_command(predict, ["--checkpoint", tmp_path / "gpu" / "last.npz",
                                                 tmp_path / "clouds.npz", "--device", device,
                                                 "--json", "--top-k", "3"], capsys)
        assert status == 0, err
        outputs[device] = [json.loads(line) for line in out.strip().splitlines()]
    assert len(outputs["cuda"]) == len(outputs["cpu"]) == 4
    for on_gpu, on_cpu in zip(outputs["cuda"], outputs["cpu"]):
        cpu_probs = {t["label"]: t["probability"] for t in on_cpu["top"]}
        for t in on_gpu["top"]:
            if t["label"] in cpu_probs:
                assert abs(t["probability"] - cpu_probs[t["label"]]) <= 1e-4, (on_gpu, on_cpu)
        assert on_gpu["top"][0]["label"] in cpu_probs


@pytest.mark.skipif(_REASON is None and _device_count() < 2,
                    reason=f"needs two CUDA devices, found {_device_count()}")
def test_commands_on_a_second_device(shared_data, tmp_path, capsys):
    """train / evaluate / predict with --device cuda:1 (cuda:0 current): the run, its resume,
    the report and the predictions equal those of --device cuda:0, bit for bit."""
    data_path = _small_modelnet(shared_data, tmp_path)
    common = ["--data", data_path, "--num-points", "128", "--hidden", "16", "--batch-size", "8",
              "--val-fraction", "0.25", "--no-progress", "--no-plot"]
    np.savez(tmp_path / "clouds.npz", points=np.load(data_path)["points"][:3])
    results = {}
    for device in ("cuda:0", "cuda:1"):
        out_dir = tmp_path / device.replace(":", "")
        for extra in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
            status, out, err = run_command(
                train, [*common, "--out", out_dir, "--device", device, *extra], capsys)
            assert status == 0, err
        assert f"on {device}" in out
        with np.load(out_dir / "last.npz", allow_pickle=False) as f:
            params = {k: f[k] for k in f.files if k.startswith("param/")}
        status, report, err = run_command(
            evaluate, ["--checkpoint", out_dir / "last.npz", "--data", data_path, "--device",
                       device], capsys)
        assert status == 0, err
        status, predicted, err = run_command(
            predict, ["--checkpoint", out_dir / "last.npz", tmp_path / "clouds.npz", "--device",
                      device, "--json"], capsys)
        assert status == 0, err
        results[device] = (params, report.strip().splitlines()[-1], predicted)
    (params0, report0, predicted0), (params1, report1, predicted1) = results.values()
    for key, value in params0.items():
        np.testing.assert_array_equal(params1[key], value, err_msg=key)
    assert report1.replace("cuda1", "cuda0") == report0 and predicted1 == predicted0
