"""Shared fixtures.  The tests exercise the *installed* package (README: pip install ".[test]"),
so the source checkout is taken off sys.path: `python -m pytest` from the repository root would
otherwise import the uncompiled pwconv_cy/ folder."""
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

DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def shared_data():
    """Path of ../shared/data; skips (with the reason) where it is absent, e.g. an installed wheel."""
    if not DATA.is_dir():
        pytest.skip(f"real point clouds not available: {DATA} is absent")
    return DATA


@pytest.fixture
def memory_budget_reset():
    """Restores the process-wide memory budget to its default after the test."""
    pwconv_cy.set_memory_budget(None)
    yield pwconv_cy.get_memory_budget()
    pwconv_cy.set_memory_budget(None)
