"""The one rule for threads (pwconv_cy/_validation.py): ``num_threads=None`` is the OpenMP default
of the runtime the core is linked with — so OMP_NUM_THREADS, threadpoolctl limits and (with a
shared runtime) ``torch.set_num_threads`` hold — and a forked child runs on one thread (GNU OpenMP
hangs when a forked child starts a team after its parent ran one).  Every check runs in a fresh
interpreter with a timeout, so that a hang fails the test instead of blocking the suite."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pwconv_cy import _core

pytestmark = [
    pytest.mark.skipif(not _core.has_openmp(), reason="a serial build (no OpenMP) has no threads"),
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="counts threads in /proc and forks (Linux)"),
]

#: The workload of every script: a call large enough to run an OpenMP team.
PRELUDE = textwrap.dedent("""
    import os, sys, warnings
    import numpy as np
    rng = np.random.default_rng(0)
    P = rng.uniform(-1, 1, size=(20000, 3)).astype(np.float32)
    F = rng.standard_normal((20000, 8)).astype(np.float32)
    W = rng.standard_normal((3, 3, 3, 8, 8)).astype(np.float32)

    def conv(**kw):
        import pwconv_cy
        return pwconv_cy.pointwise_conv(P, F, W, 0.1, **kw)

    def n_os_threads():
        return len(os.listdir("/proc/self/task"))
""")


def _run(script: str, tmp_path, timeout: float = 90, **env) -> str:
    """Run PRELUDE + script in a fresh interpreter (outside the source tree); its stdout."""
    environment = {**os.environ, "OMP_NUM_THREADS": "3", **env}
    try:
        proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
                              capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                              env=environment, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung for {timeout} s:\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_threadpool_limits_set_the_default_and_the_threads_started(tmp_path):
    """OMP_NUM_THREADS=3 is the default (a team of 3: two OS threads started); under
    threadpool_limits(1) the default is 1, show_config says so and no thread is started."""
    out = _run("""
        import pwconv_cy, threadpoolctl
        from pwconv_cy._validation import default_num_threads
        assert any(i["user_api"] == "openmp" for i in threadpoolctl.threadpool_info())
        assert default_num_threads() == 3
        with threadpoolctl.threadpool_limits(1):
            assert default_num_threads() == 1
            assert pwconv_cy.show_config(file=open(os.devnull, "w"))["threads"] == 1
            before = n_os_threads()
            limited = conv()
            print("limited", n_os_threads() - before)
        before = n_os_threads()
        free = conv()
        print("default", n_os_threads() - before)
        assert np.array_equal(limited, free)
    """, tmp_path)
    assert "limited 0" in out and "default 2" in out, out


@pytest.mark.parametrize("first", ["torch", "pwconv_cy"])
def test_torch_and_pwconv_in_one_process_either_import_order(tmp_path, first):
    """Both import orders: torch's parallel ops and pwconv calls interleave with identical
    results, threadpool_limits(1) reaches every OpenMP runtime loaded, and where PyTorch and
    pwconv share one libgomp (a source build: they do) torch.set_num_threads sets pwconv's
    default too."""
    pytest.importorskip("torch")
    second = "pwconv_cy" if first == "torch" else "torch"
    out = _run(f"""
        import {first}
        import {second}
        import torch, pwconv_cy, pwconv_cy.torch, threadpoolctl
        from pwconv_cy._validation import default_num_threads
        x = torch.randn(400, 400)
        reference = conv(num_threads=1)
        for _ in range(3):
            (x @ x).sum()
            assert np.array_equal(conv(), reference)
            y = pwconv_cy.torch.pointwise_conv(torch.from_numpy(P), torch.from_numpy(F),
                                               torch.from_numpy(W), 0.1)
            assert np.array_equal(y.numpy(), reference)
        runtimes = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "openmp"]
        with threadpoolctl.threadpool_limits(1):
            assert default_num_threads() == 1
            assert all(i["num_threads"] == 1 for i in threadpoolctl.threadpool_info()
                       if i["user_api"] == "openmp")
        if len(runtimes) == 1:
            torch.set_num_threads(1)
            assert default_num_threads() == 1
        print("runtimes", len(runtimes), [i["filepath"] for i in runtimes])
    """, tmp_path)
    assert "runtimes" in out, out


def test_forked_child_runs_pwconv_after_its_parent_did(tmp_path):
    """The parent runs a team of 3, forks; the child calls pwconv with the default and with
    num_threads=2 (one RuntimeWarning: it runs on one thread) and gets the parent's result."""
    out = _run("""
        import signal, time
        from pwconv_cy._validation import default_num_threads
        expected = conv()
        pid = os.fork()
        if pid == 0:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ok = np.array_equal(conv(), expected) and np.array_equal(conv(num_threads=2),
                                                                         expected)
                conv(num_threads=2)
            ok = ok and default_num_threads() == 1 and len(caught) == 1 \\
                and "forked child" in str(caught[0].message)
            os._exit(0 if ok else 3)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            sys.exit("the forked child hung")
        print("child", os.waitstatus_to_exitcode(status))
        assert np.array_equal(conv(), expected)   # the parent keeps its threads
        print("parent threads", default_num_threads())
    """, tmp_path)
    assert "child 0" in out and "parent threads 3" in out, out


def test_forked_dataloader_workers_call_pwconv_after_the_parent(tmp_path):
    """torch DataLoader workers started with fork compute pointwise convolutions after the
    parent has: no hang (a 30 s DataLoader timeout), results equal to the parent's."""
    pytest.importorskip("torch")
    out = _run("""
        import torch
        import pwconv_cy

        class Clouds(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return torch.from_numpy(conv(dilation=i + 1))

        expected = [conv(dilation=i + 1) for i in range(4)]
        loader = torch.utils.data.DataLoader(Clouds(), batch_size=None, num_workers=2,
                                             multiprocessing_context="fork", timeout=30)
        got = [y.numpy() for y in loader]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))
        print("ok", len(got))
    """, tmp_path, timeout=120)
    assert "ok 4" in out, out


def test_adapters_apply_the_callers_limits_on_their_own_threads(tmp_path):
    """JAX may run the op's callbacks on a runtime thread, and PyTorch a backward pass on its
    engine's: both resolve num_threads=None in the calling thread, so a threadpool_limits(1)
    around the call holds there (no thread started); without it, a team of 3 starts threads
    (one or two, depending on the pool torch has left in that thread)."""
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    out = _run("""
        import jax, jax.numpy as jnp, threadpoolctl, torch
        import pwconv_cy.jax as pcj, pwconv_cy.torch as pct
        p, f, w = jnp.asarray(P), jnp.asarray(F), jnp.asarray(W)
        grad = jax.grad(lambda f_, w_: pcj.pointwise_conv(p, f_, w_, 0.1).sum(), (0, 1))
        jax.block_until_ready(pcj.pointwise_conv(p, f, w, 0.1, num_threads=1))  # warm-up
        before = n_os_threads()
        with threadpoolctl.threadpool_limits(1):
            jax.block_until_ready(grad(f, w))
        print("jax limited", n_os_threads() - before)
        tf = torch.from_numpy(F).requires_grad_()
        before = n_os_threads()
        with threadpoolctl.threadpool_limits(1):
            pct.pointwise_conv(torch.from_numpy(P), tf, torch.from_numpy(W), 0.1).sum().backward()
        print("torch limited", n_os_threads() - before)
        before = n_os_threads()
        jax.block_until_ready(grad(f, w))
        print("jax default", n_os_threads() - before)
    """, tmp_path)
    counts = dict(line.rsplit(" ", 1) for line in out.splitlines())
    assert counts["jax limited"] == "0" and counts["torch limited"] == "0", out
    assert int(counts["jax default"]) >= 1, out


@pytest.mark.parametrize("timeout_set", [False, True])
def test_blas_spin_note_names_openblas_and_the_variable(tmp_path, timeout_set):
    """show_config (and the train command) note an OpenBLAS whose idle threads spin after each
    call -- the pthreads build with more than one thread -- unless OPENBLAS_THREAD_TIMEOUT is set;
    the note follows what threadpoolctl finds (no note for another BLAS, or a single thread)."""
    env = {"OPENBLAS_THREAD_TIMEOUT": "4"} if timeout_set else {}
    environment = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    environment.update(OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2", **env)
    script = textwrap.dedent("""
        import io, json, numpy, threadpoolctl
        import pwconv_cy
        from pwconv_cy import _config
        spinning = any(p.get("internal_api") == "openblas" and p.get("threading_layer") ==
                       "pthreads" and p["num_threads"] > 1 for p in threadpoolctl.threadpool_info())
        import contextlib, sys
        from pwconv_cy import _cli
        info = pwconv_cy.show_config(file=io.StringIO())
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            single = _config.blas_spin_note()
        said = {}
        for n in (None, 1):  # the commands' thread settings: the note, unless one thread
            err = io.StringIO()
            with contextlib.redirect_stderr(err), _cli.thread_limit(n):
                pass
            said[str(n)] = err.getvalue()
        print(json.dumps({"spinning": spinning, "note": info["blas_note"], "single": single,
                          "said": said}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=90, cwd=tmp_path, env=environment, check=False)
    assert proc.returncode == 0, proc.stderr
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["single"] is None and got["said"]["1"] == ""
    if got["spinning"] and not timeout_set:
        assert "OpenBLAS" in got["note"] and "OPENBLAS_THREAD_TIMEOUT=4" in got["note"]
        assert got["said"]["None"] == f"note: {got['note']}\n"
    else:
        assert got["note"] == "-" and got["said"]["None"] == ""
