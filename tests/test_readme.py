"""The README's quick start runs as written, on the real cloud it names."""
import os
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "README.md has no python block under '## Quick start'"
    return blocks[0]


def test_readme_quick_start_runs_on_real_data(shared_data, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository root
    namespace: dict = {}
    exec(compile(_quick_start_code(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    km, maps, points = namespace["km"], namespace["maps"], namespace["points"]
    assert km.n_queries == points.shape[0] == 697_721
    assert np.array_equal(km.counts.sum(axis=1), np.diff(km.splits))
    assert [m.dilation for m in maps] == [1, 2, 3, 4]
    assert namespace["y"].shape == (points.shape[0], 9)
    assert namespace["grads"]["weight"].shape == (3, 3, 3, 3, 9)
    assert os.path.samefile(os.getcwd(), ROOT)
