"""What a self-supervised run learned, judged as a user would: ``alambic probe`` against the baselines.

A randomly initialised CNN already separates the digits well under a kNN probe (about 90 %), so "BYOL
learned something" means beating that very network, not chance.
"""

from __future__ import annotations

import json

import pytest

from alambic.cli import main
from alambic.probe import probe_run
from alambic.recipe import load_recipe
from alambic.run import run
from tests.conftest import tiny_recipe


def byol_recipe(seed: int = 0, channels=(32, 32), **train):
    return load_recipe(tiny_recipe(
        seed=seed,
        student={"arch": "cnn", "channels": list(channels)},
        teacher={"ema": {"momentum": 0.99, "end_momentum": 1.0}},
        views={"groups": {"global": {"count": 2, "scale": [0.6, 1.0], "jitter": 0.4, "noise": 0.1}}},
        method={"name": "byol", "projection_dim": 32, "hidden": 64, "predictor_hidden": 64},
        train={"epochs": 10, "batch_size": 64, "lr": 0.003, "optimizer": "adam", "log_every": 19, **train},
        eval={"latency_repeats": 1, "probe_every": 95},
    ))


@pytest.mark.slow
def test_byol_beats_the_same_network_at_random_initialisation(tmp_path):
    # seeds 0, 1, 2 give kNN test +3.1, +3.6, +5.6 points and linear +5.3, +9.8, +8.3 points over random init
    out = tmp_path / "byol"
    summary = run(byol_recipe(seed=0), out, progress=False)
    result = probe_run(out, baselines=True)
    student, init = result["student"], result["random_init"]
    assert student["knn_test"] > init["knn_test"] + 0.015, (student, init)
    assert student["linear_test"] > init["linear_test"] + 0.015, (student, init)
    assert student["knn_test"] == summary["test"]["knn_accuracy"]  # probe_run reads back the deployed student
    # random_init is the untrained student itself: the online probe before step 1 saw the same numbers
    first = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["split"] == "probe")
    assert first["step"] == 0
    assert first["student"]["knn_val"] == pytest.approx(init["knn_val"], abs=1e-9)
    monitors = [json.loads(x).get("monitors") for x in (out / "metrics.jsonl").read_text().splitlines()]
    z_std = [m["z_std"] for m in monitors if m]
    assert z_std[-1] > 0.05, z_std  # no collapse: normalised predictions still spread (isotropic: 0.18)


@pytest.fixture(scope="module")
def finished_ssl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl-cli") / "byol"
    run(byol_recipe(channels=(4, 8), steps=4), out, progress=False)
    return out


def test_cli_probe_with_baselines_prints_the_table_and_writes_probe_json(finished_ssl_run, capsys):
    assert not (finished_ssl_run / "probe.json").exists()
    assert main(["probe", str(finished_ssl_run), "--baselines"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
    assert rows["representation"][:2] == ["kNN", "test"]
    for name in ("student", "random_init", "pixels"):
        assert name in rows and 0 < float(rows[name][0]) <= 100, printed  # kNN test accuracy in %
    assert f"wrote {finished_ssl_run / 'probe.json'}" in printed
    probe = json.loads((finished_ssl_run / "probe.json").read_text())
    assert probe["feature"] == "pool" and {"student", "random_init", "pixels"} <= set(probe)
    assert float(rows["pixels"][0]) == pytest.approx(100 * probe["pixels"]["knn_test"], abs=0.006)


def test_cli_report_of_a_representation_run_lists_the_probes_and_baselines(finished_ssl_run, capsys):
    if not (finished_ssl_run / "probe.json").exists():
        assert main(["probe", str(finished_ssl_run), "--baselines"]) == 0
    report = finished_ssl_run / "report.md"
    report.unlink()
    assert main(["report", str(finished_ssl_run)]) == 0
    assert f"wrote {report}" in capsys.readouterr().out
    text = report.read_text()
    assert "## Probes" in text and "self-supervised" in text
    for row in ("| student (final) |", "| EMA teacher (final) |", "| same network, random init |", "| raw pixels |"):
        assert row in text, row
    assert "run `alambic probe RUN_DIR --baselines`" not in text  # the baselines are there now
    assert (finished_ssl_run / "plots" / "probe_curves.png").stat().st_size > 1000


def test_export_of_a_self_supervised_run_is_its_representation(finished_ssl_run, tmp_path):
    """The ONNX graph maps inputs to the embedding the probes read (the classifier was never trained)."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    import torch

    from alambic.eval.probes import extract_features
    from alambic.export.run import export_run
    from alambic.run import load_student

    path = export_run(finished_ssl_run, "onnx", tmp_path / "ssl.onnx")
    model, meta = load_student(finished_ssl_run)
    x = torch.rand(5, *meta["input_shape"], generator=torch.Generator().manual_seed(1))
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    expected = extract_features(model, x, meta["features"])
    assert got.shape == tuple(expected.shape) and got.shape[1] != meta["num_classes"]
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-5)


def test_knn_only_runs_skip_the_linear_probe_and_probe_reuses_the_summary(tmp_path, monkeypatch):
    """`eval.linear_probe: false` makes the kNN the headline; `alambic probe` reads the student's probe from
    the summary when feature, k and T match instead of probing it again, and caches the pixel baseline."""
    import alambic.probe

    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "knn-only"
    recipe = byol_recipe(channels=(4, 8), steps=4)
    recipe.eval.linear_probe = False
    summary = run(recipe, out, progress=False)
    assert summary["test"]["accuracy"] == summary["test"]["knn_accuracy"] and summary["test"]["linear_accuracy"] is None

    full = tmp_path / "full"
    summary = run(byol_recipe(channels=(4, 8), steps=4), full, progress=False)
    first = probe_run(full, baselines=True)
    assert list((tmp_path / "cache" / "probes").glob("pixels-*.json"))

    def no_probing(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr(alambic.probe, "pixel_baseline", no_probing)
    assert probe_run(full, baselines=True)["pixels"] == first["pixels"]  # from the cache
    monkeypatch.setattr(alambic.probe, "probe_model", no_probing)
    again = probe_run(full, baselines=False)
    assert again["student"] == summary["probe"] == first["student"]
