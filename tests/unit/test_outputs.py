"""What a user reads: the probe's refreshed report, the export's check line, progress in a log file, the
methods listing, the bench and report figures; and two import circles that must stay broken."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import alambic

PACKAGE = Path(alambic.__file__).parent


# ---------------------------------------------------------------- import layering


def _module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    base = PACKAGE.joinpath(*parts) if parts else PACKAGE
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(name: str) -> set[str]:
    """The alambic modules ``name``'s source imports anywhere: at the top, inside functions, under
    TYPE_CHECKING. ``from alambic.x import y`` counts as ``alambic.x.y`` when that is a module."""
    tree = ast.parse(_module_file(name).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "alambic"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "alambic":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if _module_file(sub) is not None else node.module)
    return {m for m in found if m != "alambic"}  # the package itself is imported before any of its modules


def _reach(name: str) -> set[str]:
    """Every alambic module ``name`` imports, directly or through the modules it imports."""
    seen, todo = set(), [name]
    while todo:
        for m in _imports(todo.pop()) - seen:
            seen.add(m)
            todo.append(m)
    return seen


@pytest.mark.parametrize("lower, upper", [("alambic.bench_report", "alambic.bench"),
                                          ("alambic.probe", "alambic.run")])
def test_lower_module_does_not_import_the_one_that_uses_it(lower, upper):
    """bench imports bench_report and run imports probe; the other direction closed a circle (bench_report
    named bench's Suite, probe called run's load_student), even when only lazily or for type checking."""
    assert lower in _reach(upper)
    assert upper not in _reach(lower), f"{lower} reaches {upper}: {sorted(_reach(lower))}"


def test_load_student_is_one_function_under_both_names():
    from alambic.run import load_student as from_run
    from alambic.student import load_student

    assert from_run is load_student is alambic.load_student


# ---------------------------------------------------------------- alambic methods


def test_descriptions_are_whole_first_sentences_without_markup():
    from alambic.registry import METHODS

    # these summaries run over two lines of their docstrings: the first line alone stopped mid-sentence
    assert METHODS.get("ibot").description.endswith("for each masked patch token within the same view.")
    assert METHODS.get("mlkd").description.endswith("to its K nearest (linearly mapped) teacher layers.")
    # ``...`` around a formula is markup, not text
    assert METHODS.get("kd").description.startswith("(1 − α)·CE(labels) + α·T²·KL(p_T ‖ p_S);")
    for entry in METHODS:
        assert entry.description.endswith("."), entry.name
        assert "`" not in entry.description and ":class:" not in entry.description, entry.name
        assert "\n" not in entry.description and "  " not in entry.description, entry.name


def test_first_sentence_skips_abbreviations_literals_and_roles():
    from alambic.registry import first_sentence, plain_text

    doc = """Matches *soft* targets of :func:`~alambic.losses.kd_loss` and :class:`alambic.teachers.EmaTeacher`
    (Hinton et al. 2015, Eq. 3), e.g. ``a.b. c`` on **every** sample. Then a second sentence.

    A second paragraph."""
    assert first_sentence(doc) == ("Matches soft targets of kd_loss and alambic.teachers.EmaTeacher (Hinton et al. "
                                   "2015, Eq. 3), e.g. a.b. c on every sample.")
    assert first_sentence("No period at the end of the\n    first paragraph\n\n    Other.") == (
        "No period at the end of the first paragraph")
    assert plain_text("a ``x * y`` times 2*3 and `z`") == "a x * y times 2*3 and z"


def test_methods_listing_prints_the_whole_sentence(capsys):
    from alambic.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":class:" not in out
    cells: dict[str, list[str]] = {}  # name -> the description cell's lines (a row wraps over several)
    name = None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("│")]
        if len(parts) < 4:
            continue
        name = parts[1] or name
        cells.setdefault(name, []).append(parts[2])
    from alambic.registry import METHODS

    assert " ".join(" ".join(cells["ibot"]).split()) == METHODS.get("ibot").description


# ---------------------------------------------------------------- alambic probe --baselines


def test_probe_with_baselines_refreshes_the_report(tmp_path, monkeypatch, capsys):
    from alambic.cli import main
    from alambic.run import run
    from tests.integration.test_ssl_probe import byol_recipe

    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "byol"
    run(byol_recipe(channels=(4, 8), steps=4), out, progress=False)
    assert "| raw pixels |" not in (out / "report.md").read_text()
    assert main(["probe", str(out), "--baselines"]) == 0
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out
    report = (out / "report.md").read_text()  # no `alambic report` in between
    assert "| raw pixels |" in report and "| same network, random init |" in report
    assert "--baselines`." not in report  # the hint to run them is gone


# ---------------------------------------------------------------- alambic export


def test_export_prints_the_onnxruntime_check_or_why_it_was_skipped(teacher_run, tmp_path, monkeypatch, capsys):
    import re
    import sys

    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from alambic.cli import main

    assert main(["export", str(teacher_run), "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    m = re.search(r"checked with onnxruntime \S+ on 2 inputs \(batches of 2 and 4\): max \|Δ\| (\S+) "
                  r"\(tolerance 0\.0001 \+ 0\.001·\|eager\|\)", out)
    assert m, out
    assert 0 <= float(m.group(1)) <= 1e-4
    assert f"wrote {tmp_path / 'm.onnx'}" in out

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    assert main(["export", str(teacher_run), "--out", str(tmp_path / "unchecked.onnx")]) == 0
    out = capsys.readouterr().out
    assert "not checked against PyTorch: onnxruntime is not installed" in out, out
    assert (tmp_path / "unchecked.onnx").stat().st_size > 1000


# ---------------------------------------------------------------- progress


class _CtrlC:
    """A callback that acts like the user pressing Ctrl-C after step ``at``: the terminal echoes ``^C``
    (written to ``echo``, if given) and Python raises KeyboardInterrupt."""

    def __init__(self, at: int, echo=None):
        self.at, self.echo = at, echo

    def on_fit_start(self, trainer, resumed):
        pass

    def on_epoch_end(self, trainer, epoch, val):
        pass

    def on_checkpoint(self, trainer, path):
        pass

    def on_step_end(self, trainer, step, logs):
        if step == self.at:
            if self.echo is not None:
                self.echo.write("^C")
            raise KeyboardInterrupt


def _tiny(epochs: int = 2):
    from alambic.recipe import load_recipe
    from tests.conftest import tiny_recipe

    return load_recipe(tiny_recipe(train={"epochs": epochs, "batch_size": 64, "lr": 0.01, "log_every": 5}))


def test_progress_into_a_log_is_whole_lines_about_every_tenth(tmp_path, capsys):
    from alambic.run import run

    run(_tiny(epochs=4), tmp_path / "run", progress=True)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    total = int(lines[-1].split()[1].split("/")[1])
    steps = [int(x.split()[1].split("/")[0]) for x in lines]
    assert steps[-1] == total and 8 <= len(lines) <= 11, lines  # about every tenth, the last step always
    assert lines[-1].startswith(f"step {total}/{total} · epoch 4/4 · loss ")
    assert "samples/s · val acc 0." in lines[-1]  # the validation of epoch 3
    assert all("…" not in x and "━" not in x for x in lines)  # no bar, nothing cut


def test_an_interrupted_run_prints_where_it_stopped_once(tmp_path, capsys):
    from alambic.run import run

    with pytest.raises(KeyboardInterrupt):
        run(_tiny(), tmp_path / "run", progress=True, callbacks=[_CtrlC(at=7)])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert lines[-1].startswith("step 7/") and lines[-1].endswith("(interrupted)"), lines
    assert len(lines) == len(set(lines)) and sum(x.startswith("step 7/") for x in lines) == 1, lines


def _screen(text: str, width: int) -> list[str]:
    """The rows a terminal of ``width`` columns shows for ``text``: enough of VT100 for rich's live
    display (carriage return, line feed, erase line, cursor up, colours), with the terminal's pending
    wrap: a character written after the last column starts a new row."""
    import re

    rows, row, col = [[]], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|.", text, flags=re.S):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
        elif token.startswith("\x1b["):
            if token == "\x1b[2K":
                rows[row] = []
            elif token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
            continue  # colours, cursor visibility
        else:
            if col >= width:  # pending wrap
                row, col = row + 1, 0
            while len(rows) <= row:
                rows.append([])
            line = rows[row] + [" "] * max(0, col - len(rows[row]))
            line[col:col + 1] = [token]
            rows[row], col = line, col + 1
        while len(rows) <= row:
            rows.append([])
    return ["".join(r).rstrip() for r in rows]


def test_ctrl_c_on_a_terminal_leaves_one_copy_of_the_bar(tmp_path, monkeypatch):
    """The terminal echoes ^C after the bar; on a full-width bar that wrapped, and rich's last refresh
    repainted the bar on the new row, below the old one."""
    import io
    import sys

    from alambic.run import run

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(KeyboardInterrupt):
        run(_tiny(), tmp_path / "run", progress=True, callbacks=[_CtrlC(at=30, echo=term)])
    screen = _screen(term.getvalue(), 80)
    bars = [r for r in screen if "loss" in r]
    assert len(bars) == 1, screen
    assert "30/" in bars[0]


# ---------------------------------------------------------------- figures


def test_bench_accuracy_axis_is_zoomed_to_the_data():
    from alambic.bench_report import Line, accuracy_figure

    stats = {"full": [Line("ce", 3, 3, 0.905, 0.004), Line("kd", 3, 3, 0.921, 0.006, 1.6, 0.02, 3),
                      Line("fitnet", 0, 3)],
             "scarce": [Line("ce", 3, 3, 0.86, 0.01), Line("kd", 3, 3, 0.94, 0.008, 8.0, 0.01, 3),
                        Line("fitnet", 3, 3, 0.87, 0.02, 1.0, 0.4, 3)]}
    fig = accuracy_figure("demo", stats)
    full, scarce = fig.axes[:2]
    lo, hi = full.get_xlim()
    assert 89.0 < lo <= 90.1 and 92.7 <= hi < 94.0  # 90.1 ... 92.7 is what the data span (mean ± std)
    lo, hi = scarce.get_xlim()
    assert 83.0 < lo <= 85.0 and 94.8 <= hi < 97.0
    assert any(t.get_text() == "failed" for t in full.texts)  # a method without a result says so


def test_learning_curves_give_each_loss_term_its_own_scale():
    from alambic.report.plots import learning_curves_figure

    records = [{"split": "train", "step": s, "loss": 100.0 / s, "terms": {"hint": 100.0 / s, "kd": 0.01 / s}}
               for s in range(10, 110, 10)] + [{"split": "val", "step": 100, "accuracy": 0.9}]
    fig = learning_curves_figure(records)
    by_title = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    kd = by_title["loss term: kd"]
    assert kd.get_ylim()[1] < 0.01  # on the total's axis (0 ... 10) this term was a flat line at 0
    assert by_title["loss term: hint"].get_ylim()[1] > 5
    assert {"training loss (total)", "validation accuracy"} <= set(by_title)


def test_reliability_diagram_shows_the_samples_per_bin():
    import torch

    from alambic.eval import reliability_bins
    from alambic.report.plots import reliability_figure

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(300, 5, generator=g) * 2, torch.randint(0, 5, (300,), generator=g)
    fig = reliability_figure(logits, target, n_bins=10)
    counts_ax = next(ax for ax in fig.axes if ax.get_ylabel() == "samples")
    heights = [round(p.get_height()) for p in counts_ax.patches]
    assert heights == reliability_bins(logits, target, 10)["count"] and sum(heights) == 300
    labels = [t.get_text() for t in counts_ax.texts if t.get_text()]
    assert labels == [str(c) for c in heights if c]
