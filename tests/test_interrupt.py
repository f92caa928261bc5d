"""Ctrl-C stops long calls between blocks of work (issue 6, threads): KeyboardInterrupt is raised
promptly, Python's SIGINT handler is back afterwards, and the next call is unaffected.

Each case runs in a subprocess that sends itself SIGINT from a timer thread during a call that
would take tens of seconds uninterrupted; if interruption did not work the call would run to its
end and only then see Python's own KeyboardInterrupt, so the elapsed time tells the two apart with
a wide margin (about 0.5 s against over 10 s here)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest

import pwconv_cy
from pwconv_cy import _core

PRELUDE = textwrap.dedent("""\
    import json, os, signal, threading, time
    import numpy as np
    import pwconv_cy

    # An interactive Python's SIGINT handler (a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then leaves it so).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt_after(seconds):
        def kick():
            time.sleep(seconds)
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=kick, daemon=True).start()

    def timed(call):
        start = time.perf_counter()
        try:
            call()
            outcome = "finished"
        except KeyboardInterrupt:
            outcome = "KeyboardInterrupt"
        except Exception as exc:
            outcome = type(exc).__name__
        return outcome, time.perf_counter() - start
""")

# Uninterrupted, these take > 10 s on 2 cores; interrupted after 0.3 s they stop within ~0.5 s.
PROMPT_S = 5.0


def run_script(body: str) -> dict:
    # Run outside the checkout, whose pwconv_cy/ folder has no compiled module.
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir(),
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ctrl_c_stops_a_long_search_and_the_next_call_works():
    out = run_script("""
        rng = np.random.default_rng(0)
        points = rng.random((400_000, 3))
        index = pwconv_cy.NeighborIndex(points, 0.1)
        interrupt_after(0.3)
        # ~8,000 neighbours per point: counted only (the tiny budget keeps no pairs), ~3e9 tests.
        outcome, seconds = timed(lambda: index.radius_search(0.1, memory_budget=1 << 20))
        handler_back = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        small = points[:2000]
        km = pwconv_cy.kernel_map(small, 0.05, dilation=2)
        fresh = pwconv_cy.NeighborIndex(small, 0.05).kernel_map(3, 2)
        same = bool(np.array_equal(km.index, fresh.index) and np.array_equal(km.cell, fresh.cell))
        print(json.dumps(dict(outcome=outcome, seconds=seconds, handler_back=handler_back,
                              same=same, pairs=int(km.n_pairs))))
    """)
    assert out["outcome"] == "KeyboardInterrupt", out
    assert out["seconds"] < PROMPT_S, out
    assert out["handler_back"], "Python's SIGINT handler was not restored"
    assert out["same"] and out["pairs"] >= 2000, out


def test_ctrl_c_stops_a_long_convolution():
    out = run_script("""
        rng = np.random.default_rng(1)
        points = rng.random((20_000, 3))
        km = pwconv_cy.kernel_map(points, 0.1)       # ~ 540 neighbours per point
        feats = rng.standard_normal((20_000, 256), dtype=np.float32)
        weight = rng.standard_normal((3, 3, 3, 256, 256), dtype=np.float32)
        interrupt_after(0.3)
        def many():  # ~10 s a call; at most ~30 s if the interrupt were lost
            start = time.perf_counter()
            while time.perf_counter() - start < 30:
                pwconv_cy.pointwise_conv(points, feats, weight, 0.1, kernel_map=km,
                                         check_finite=False)
        outcome, seconds = timed(many)
        print(json.dumps(dict(outcome=outcome, seconds=seconds)))
    """)
    assert out["outcome"] == "KeyboardInterrupt", out
    assert out["seconds"] < PROMPT_S, out


def test_a_request_stops_calls_on_other_threads_as_keyboard_interrupt():
    # Off the main thread no handler is swapped in; an interrupt requested while the call runs
    # (as the main thread's Ctrl-C would) still stops it, as KeyboardInterrupt in that thread.
    rng = np.random.default_rng(2)
    points = rng.random((3000, 3))
    results = {}

    def worker():
        _core._request_interrupt()
        try:
            pwconv_cy.kernel_map(points, 0.1)
            results["outcome"] = "finished"
        except KeyboardInterrupt:
            results["outcome"] = "KeyboardInterrupt"
        finally:
            _core._clear_interrupt()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(60)
    assert results.get("outcome") == "KeyboardInterrupt"
    # The flag is cleared: calls run normally again, on this thread and others.
    km = pwconv_cy.kernel_map(points, 0.1)
    assert km.n_pairs >= 3000


def test_main_thread_calls_clear_a_stale_request():
    # E.g. a request left by an interrupted call on another thread: the next call on the main
    # thread starts afresh.  In a subprocess: a KeyboardInterrupt here would stop pytest itself.
    out = run_script("""
        pwconv_cy._core._request_interrupt()
        outcome, _ = timed(lambda: pwconv_cy.kernel_map(np.random.default_rng(3).random((500, 3)),
                                                        0.2))
        print(json.dumps(dict(outcome=outcome)))
    """)
    assert out["outcome"] == "finished", out


@pytest.mark.parametrize("kind", ["python handler", "ignored"])
def test_user_sigint_handlers_are_left_alone(kind):
    # With a handler of the user's own (or SIGINT ignored) pwconv does not swap handlers: the
    # call finishes and the user's handler sees the signal.
    out = run_script(f"""
        seen = []
        if {kind!r} == "ignored":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGINT, lambda *a: seen.append(1))
        points = np.random.default_rng(4).random((20_000, 3))
        index = pwconv_cy.NeighborIndex(points, 0.05)
        interrupt_after(0.05)
        outcome, seconds = timed(lambda: [index.kernel_map(3, 1) for _ in range(4)])
        time.sleep(0.2)
        print(json.dumps(dict(outcome=outcome, seen=len(seen))))
    """)
    assert out["outcome"] == "finished", out
    assert out["seen"] == (0 if kind == "ignored" else 1), out
