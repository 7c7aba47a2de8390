"""The report of a language-model run: held-out perplexity and agreement, throughput, generations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from alambic.report.plots import _save
from alambic.train.state import atomic_write_text


def language_curves_figure(records: list[dict[str, Any]]) -> Figure:
    """Training loss and each term against step, and the validation perplexity (student) against step."""
    train = sorted((r for r in records if r.get("split") == "train"), key=lambda r: r["step"])
    val = sorted((r for r in records if r.get("split") == "val" and "perplexity" in r), key=lambda r: r["step"])
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], color="black", linewidth=2, label="loss")
    for name in sorted({n for r in train for n in (r.get("terms") or {})}):
        ax_loss.plot(steps, [(r.get("terms") or {}).get(name, float("nan")) for r in train], label=name)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss and terms")
    ax_loss.legend(fontsize=8)
    if val:
        ax_val.plot([r["step"] for r in val], [r["perplexity"] for r in val], marker="o", color="tab:green")
    ax_val.set(xlabel="step", ylabel="perplexity", title="validation perplexity (student)")
    return fig


def _f(x: Any, spec: str = "{:.4f}") -> str:
    return "—" if x is None else spec.format(x)


def _task_lines(student: dict[str, Any] | None, teacher: dict[str, Any] | None) -> list[str]:
    """The held-out accuracy of a verifiable-task run (greedy answers scored by the checker), and the student's
    first completions with their rewards."""
    if not student:
        return []
    lines = [f"## Held-out task accuracy (test, {student['problems']} problems, greedy)", "",
             "| model | accuracy | correct | generated tokens (mean) | ended with EOS |", "|---|---:|---:|---:|---:|"]
    for who, m in (("student", student), ("teacher", teacher)):
        if m:
            lines.append(f"| {who} | {_f(m.get('accuracy'))} | {_f(m.get('correct'), '{:g}')} | "
                         f"{_f(m.get('mean_tokens'), '{:.1f}')} | {_f(m.get('finished'), '{:.0%}')} |")
    lines += ["", "Student completions (reward from the task's checker):", ""]
    for x in student.get("samples") or []:
        lines.append(f"- reward {x['reward']:g} · answer `{x['answer']}` · prompt `{x['prompt']!r}` -> "
                     f"`{x['completion']!r}`")
    return lines + [""]


def render_language_report(run_dir: Path) -> Path:
    """Write ``report.md`` and ``plots/learning_curves.png`` of a finished language run from its files."""
    import json

    from alambic.report.markdown import load_metrics

    run_dir = Path(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    records = load_metrics(run_dir / "metrics.jsonl")
    curves = _save(language_curves_figure(records), run_dir / "plots" / "learning_curves.png")
    st, te, tr = s.get("student") or {}, s.get("teacher") or {}, s.get("train") or {}
    test, t_test = s.get("test") or {}, te.get("test") or {}
    lines = [
        f"# {s['name']}", "",
        "## What was run", "",
        f"- method: `{s['method']}`" + (f" (divergence `{s['divergence']}`)" if s.get("divergence") else ""),
        f"- seed: {s.get('seed')}",
        f"- teacher: `{te.get('source')}`" + (f" / `{te['gguf_file']}`" if te.get("gguf_file") else "")
        + f", {_f(te.get('layers'), '{}')} layers, {_f(te.get('params'), '{:,}')} parameters",
        f"- student: `{st.get('arch')}`, {_f(st.get('layers'), '{}')} layers, {_f(st.get('params'), '{:,}')} "
        f"parameters, {_f(st.get('size_bytes'), '{:,}')} bytes of weights",
        f"- training: {tr.get('steps')} steps, {_f(tr.get('tokens'), '{:,}')} tokens "
        f"({_f(tr.get('loss_tokens'), '{:,}')} with a loss), {_f(tr.get('wall_time_s'), '{:.1f}')} s for the "
        f"{tr.get('wall_time_covers', 'run')}: {_f(tr.get('tokens_per_s'), '{:,.0f}')} tokens/s", "",
        f"## Held-out results (test, {_f(test.get('tokens'), '{:,}')} completion tokens)", "",
        "| model | perplexity | NLL | top-1 agreement | forward KL(p_T‖p_S) |"
        + (" divergence |" if "divergence" in test else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if "divergence" in test else ""),
        f"| student | {_f(test.get('perplexity'), '{:.3f}')} | {_f(test.get('nll'))} | {_f(test.get('agreement'))} | "
        f"{_f(test.get('forward_kl'))} |" + (f" {_f(test.get('divergence'))} |" if "divergence" in test else ""),
        f"| teacher | {_f(t_test.get('perplexity'), '{:.3f}')} | {_f(t_test.get('nll'))} | | |"
        + (" |" if "divergence" in test else ""), "",
        "Every figure is a mean over completion tokens (the positions whose next token the loss covers); "
        "agreement: the student's top-1 next token is the teacher's.", "",
    ]
    lines += _task_lines(test.get("task"), t_test.get("task"))
    lines += [
        "## Training", "",
        f"![learning curves]({curves.relative_to(run_dir).as_posix()})", "",
        "## Greedy generations", "",
    ]
    for g in s.get("generations") or []:
        lines += [f"**Prompt:** `{g['prompt']}`", "",
                  f"- student: `{g['student']}`", f"- teacher: `{g['teacher']}`", ""]
    if not s.get("generations"):
        lines += ["(none: eval.num_prompts is 0 and eval.prompts is empty)", ""]
    lines += ["## Recipe", "", "The resolved recipe of this run is in [recipe.yaml](recipe.yaml).", ""]
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
