"""The README's "### Python API" snippet runs as written, end to end (short schedules), from a fresh folder:
the test reads the code block from README.md, so the README and this test cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

import alambic

ROOT = Path(__file__).resolve().parents[2]


def python_api_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: no ```python block under ### Python API"
    return match.group(1)


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # the snippet names recipes/... as from the repo root
    assert not (tmp_path / "runs").exists()  # no teacher run made beforehand: the snippet makes what it needs
    load = alambic.load_recipe
    fast = ["train.epochs=1", "eval.latency_repeats=2"]
    monkeypatch.setattr(alambic, "load_recipe", lambda source, overrides=(): load(source, [*overrides, *fast]))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)  # 3 classes
    torch.manual_seed(0)
    names = {"x": x, "y": y, "my_big_model": nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)),
             "student_logits": torch.randn(4, 3), "teacher_logits": torch.randn(4, 3)}
    exec(compile(python_api_snippet(), "README.md:### Python API", "exec"), names)

    assert (tmp_path / "runs/teacher-digits/summary.json").is_file()
    assert names["summary"]["test"]["accuracy"] > 0 and names["summary"]["teacher"] is not None
    assert names["meta"]["num_classes"] == 3 and names["meta"]["input_shape"] == [8]
    assert names["student"](torch.from_numpy(x[:2])).shape == (2, 3)
    assert torch.isfinite(names["loss"]) and names["loss"].ndim == 0
