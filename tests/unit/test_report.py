"""alambic.report: a report renders from a run directory's files alone; broken files name themselves."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch
from safetensors.torch import save_file

from alambic.errors import AlambicError
from alambic.eval import reliability_bins
from alambic.report import render_report
from alambic.report.plots import plot_reliability

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(teacher=True):
    return {
        "name": "kd-digits",
        "method": "kd",
        "seed": 0,
        "test": {"accuracy": 0.93, "ece": 0.04, "nll": 0.2, "agreement": 0.95},
        "val": {"accuracy": 0.91},
        "student": {"params": 12345, "size_bytes": 50000, "latency_ms": 0.02},
        "teacher": {
            "test": {"accuracy": 0.97, "ece": 0.02, "nll": 0.1},
            "params": 123456,
            "size_bytes": 500000,
            "latency_ms": 0.2,
        }
        if teacher
        else None,
        "train": {"steps": 40, "epochs": 2, "wall_time_s": 12.3},
    }


def _metrics():
    records = []
    for step in range(10, 50, 10):
        records.append(
            {"split": "train", "step": step, "epoch": step // 20, "loss": 2.0 / step,
             "terms": {"ce": 1.0 / step, "kd": 1.0 / step}, "lr": 1e-3, "samples_per_s": 5000.0}
        )
        if step % 20 == 0:
            records.append(
                {"split": "val", "step": step, "epoch": step // 20, "accuracy": 0.8 + step / 1000, "loss": 0.3}
            )
    return records


def _run_dir(tmp_path, teacher=True, agreement=True):
    run = tmp_path / "run"
    run.mkdir()
    summary = _summary(teacher)
    if not agreement:
        del summary["test"]["agreement"]
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _metrics()) + "\n")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "test_logits": torch.randn(60, 10, generator=g) * 2,
        "test_target": torch.randint(0, 10, (60,), generator=g),
    }
    if teacher:
        tensors["teacher_test_logits"] = torch.randn(60, 10, generator=g)
    save_file(tensors, str(run / "predictions.safetensors"))
    (run / "recipe.yaml").write_text("method: kd\n")
    return run


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)  # decodes the whole file
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_report_renders_from_files_alone(tmp_path):
    run = _run_dir(tmp_path)
    report = render_report(run)
    assert report == run / "report.md"
    text = report.read_text()
    _assert_png(run / "plots" / "learning_curves.png")
    _assert_png(run / "plots" / "reliability.png")
    assert text.startswith("# kd-digits")
    assert "| | student | teacher |" in text
    assert "| test accuracy | 93.00 % | 97.00 % |" in text
    assert "| test ECE (↓) | 0.0400 | 0.0200 |" in text
    assert "| top-1 agreement with teacher | 95.00 % | — |" in text
    assert "| parameters | 12,345 | 123,456 |" in text
    assert "| size on disk (safetensors) | 48.8 KiB | 488.3 KiB |" in text
    assert "Final validation accuracy: **84.00 %** at step 40" in text
    assert "](plots/learning_curves.png)" in text and "](plots/reliability.png)" in text
    assert "[recipe.yaml](recipe.yaml)" in text
    # rendering again from the same files gives the same report
    assert render_report(run).read_text() == text


def test_report_without_teacher_or_agreement(tmp_path):
    text = render_report(_run_dir(tmp_path, teacher=False, agreement=False)).read_text()
    assert "| | student |" in text and "teacher |" not in text
    assert "agreement with teacher |" not in text
    assert "- teacher: none" in text


def test_missing_summary_names_the_file(tmp_path):
    run = _run_dir(tmp_path)
    (run / "summary.json").unlink()
    with pytest.raises(AlambicError, match=r"summary\.json not found — is this a finished run directory\?"):
        render_report(run)


def test_malformed_metrics_line_names_file_and_line(tmp_path):
    run = _run_dir(tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-3]  # truncated JSON
    (run / "metrics.jsonl").write_text("\n".join(lines))
    with pytest.raises(AlambicError, match=r"metrics\.jsonl:2 is not valid JSON"):
        render_report(run)


def test_malformed_summary_and_predictions_name_the_file(tmp_path):
    run = _run_dir(tmp_path)
    (run / "summary.json").write_text('{"name": "x", "method": "kd", "test": {}}')
    with pytest.raises(AlambicError, match=r"summary\.json has no numeric 'test\.accuracy'"):
        render_report(run)
    (run / "summary.json").write_text(json.dumps(_summary()))
    save_file({"test_logits": torch.zeros(4, 3)}, str(run / "predictions.safetensors"))
    with pytest.raises(AlambicError, match=r"predictions\.safetensors has no tensor 'test_target'"):
        render_report(run)
    (run / "predictions.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AlambicError, match=r"predictions\.safetensors is not a readable"):
        render_report(run)


def test_reliability_plot_bars_are_the_bin_accuracies(tmp_path):
    from matplotlib.patches import Rectangle

    saved = {}
    import alambic.report.plots as plots

    real_save = plots._save

    def spy(fig, path):
        saved["fig"] = fig
        return real_save(fig, path)

    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(80, 4, generator=g) * 3, torch.randint(0, 4, (80,), generator=g)
    plots._save, original = spy, plots._save
    try:
        plot_reliability(logits, target, tmp_path / "r.png", n_bins=10)
    finally:
        plots._save = original
    ax = saved["fig"].axes[0]
    bars = sorted((p for p in ax.patches if isinstance(p, Rectangle)), key=lambda p: p.get_x())
    bins = reliability_bins(logits, target, 10)
    expected = [acc for acc, count in zip(bins["accuracy"], bins["count"]) if count]
    assert [b.get_height() for b in bars] == pytest.approx(expected)
    assert "ECE = " in ax.get_title()
    _assert_png(tmp_path / "r.png")
