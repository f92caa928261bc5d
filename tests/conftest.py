"""Shared fixtures.  The tests exercise the *installed* package (README: pip install ".[test]"),
so the source checkout is taken off sys.path: `python -m pytest` from the repository root would
otherwise import the uncompiled pwconv_cy/ folder.

The real point clouds live in ../shared/data next to the checkout; PWCONV_SHARED_DATA names
another folder (CI sets it when it runs a copy of tests/ against the installed wheel)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != ROOT]

try:
    import pwconv_cy
except ImportError as exc:  # pragma: no cover - a set-up error, reported once, clearly
    raise ImportError(f"pwconv_cy is not installed ({exc}); run `pip install \".[test]\"` "
                      "from the repository root first") from None

# An explicit PWCONV_SHARED_DATA must exist (a typo must not silently skip the real-data tests).
DATA_ENV = os.environ.get("PWCONV_SHARED_DATA")
DATA = Path(DATA_ENV) if DATA_ENV else ROOT.parent / "shared" / "data"


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def shared_data():
    """Path of the real point clouds: $PWCONV_SHARED_DATA, else ../shared/data next to the
    checkout; skips (with the reason) where the latter is absent, fails where the former is."""
    if DATA_ENV and not DATA.is_dir():
        pytest.fail(f"PWCONV_SHARED_DATA={DATA_ENV!r} is not a directory")
    if not DATA.is_dir():
        pytest.skip(f"real point clouds not available: {DATA} is absent "
                    "(set PWCONV_SHARED_DATA to the folder holding them)")
    return DATA


@pytest.fixture
def memory_budget_reset():
    """Restores the process-wide memory budget to its default after the test."""
    pwconv_cy.set_memory_budget(None)
    yield pwconv_cy.get_memory_budget()
    pwconv_cy.set_memory_budget(None)
