"""gkd (on-policy distillation, GKD Algorithm 1) and seqkd: the on-policy coin and the student's draws are pure
functions of (seed, step, sample id), the sampled batch keeps the prompts and trains on the sampled tokens up to
EOS, λ = 0 is token_kd, a cached teacher is refused, and a killed gkd run resumes bit-identically."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from alambic.data.batch import IGNORE_INDEX  # noqa: E402
from alambic.data.text import TOKENS, TextExample, collate, tokenize_example  # noqa: E402
from alambic.errors import AlambicError  # noqa: E402
from alambic.generation.sampling import sample  # noqa: E402
from alambic.methods.base import SetupInfo, StepContext  # noqa: E402
from alambic.methods.gkd import GKD, GKDConfig, on_policy_step, prompt_rows  # noqa: E402
from alambic.methods.seqkd import SeqKD  # noqa: E402
from alambic.methods.token_kd import TokenKD, TokenKDConfig, token_nll  # noqa: E402
from alambic.models.causal_lm import (  # noqa: E402
    CausalLMLogits, causal_lm_from_config, tiny_tokenizer,
)
from alambic.teachers.base import ModelOutput  # noqa: E402

SMALL = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def student(tok):
    return causal_lm_from_config(SMALL, tok, seed=1)


def text_batch(tok, rows, index):
    examples = [tokenize_example(tok, TextExample(p, c), max_length=32) for p, c in rows]
    return collate(examples, index, tok.pad_token_id)


ROWS = [("the cat", "sees a dog"), ("a small bird", "finds the tree"), ("", "the old king calls")]


def method(student, tok, **cfg):
    m = GKD(GKDConfig(**{"max_new_tokens": 8, **cfg}))

    class LiveTeacher:  # what the language run hands over: a tokenizer and a live model
        lm = student
        tokenizer = tok

    m.setup({}, None, SetupInfo(CausalLMLogits(student), 0, 0, 1, 1, teacher=LiveTeacher()))
    return m


def ctx(step):
    return StepContext(step, 0, 100, 100)


def test_the_on_policy_coin_is_a_pure_function_of_seed_and_step():
    coins = [on_policy_step(0, s, 0.3) for s in range(4000)]
    assert coins == [on_policy_step(0, s, 0.3) for s in range(4000)]
    assert 0.27 < sum(coins) / 4000 < 0.33  # u(seed, step) is uniform: about λ of the steps
    assert coins != [on_policy_step(1, s, 0.3) for s in range(4000)]
    assert not any(on_policy_step(0, s, 0.0) for s in range(500))
    assert all(on_policy_step(0, s, 1.0) for s in range(500))


def test_prompts_are_the_tokens_before_the_completion(tok):
    batch = text_batch(tok, ROWS, [0, 1, 2])
    prompts = prompt_rows(batch)
    assert prompts[0] == [tok.bos_token_id, *tok("the cat", add_special_tokens=False)["input_ids"]]
    assert prompts[2] == [tok.bos_token_id]  # an empty prompt: BOS only
    assert prompt_rows(batch, min_prompt_tokens=3)[2] == batch.views[TOKENS][2, :3].tolist()


def test_an_on_policy_batch_is_the_prompts_and_the_students_draws_up_to_eos(tok, student):
    m = method(student, tok, lmbda=1.0, seed=4, sampling_temperature=1.0)
    batch = text_batch(tok, ROWS, [10, 11, 12])
    prompts = prompt_rows(batch)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = m.prepare(batch, ctx(7))
    ref = sample(student, prompts, max_new_tokens=8, temperature=1.0, seed=4, step=7, sample_ids=[10, 11, 12],
                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    for b, p in enumerate(prompts):
        completion = ref.row(b, with_eos=True)
        row = out.views[TOKENS][b].tolist()
        assert row[: len(p)] == p and row[len(p): len(p) + len(completion)] == completion
        counted = (out.target[b] != IGNORE_INDEX).nonzero().flatten().tolist()
        # the last prompt token predicts the first sampled token; the EOS (when drawn) is the last target
        assert counted == list(range(len(p) - 1, len(p) - 1 + len(completion)))
        assert out.target[b, counted].tolist() == completion
        assert int(out.extras["attention_mask"][b].sum()) == len(p) + len(completion)
    assert torch.equal(out.index, batch.index)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # sampling changes nothing
    # the same step draws the same tokens, whatever the batch order; another step draws others
    again = m.prepare(batch, ctx(7))
    assert torch.equal(again.views[TOKENS], out.views[TOKENS])
    order = [2, 0, 1]
    shuffled = m.prepare(batch.select(torch.tensor(order)), ctx(7))
    for new, old in enumerate(order):
        n = int(out.extras["attention_mask"][old].sum())
        assert shuffled.views[TOKENS][new, :n].tolist() == out.views[TOKENS][old, :n].tolist()
    assert not torch.equal(m.prepare(batch, ctx(8)).views[TOKENS], out.views[TOKENS])


def test_a_row_that_draws_eos_trains_on_nothing_after_it(tok):
    class Eos(torch.nn.Module):  # always says EOS at once
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kw):
            logits = torch.zeros(*input_ids.shape, len(tok))
            logits[..., tok.eos_token_id] = 30.0
            return logits

    m = GKD(GKDConfig(lmbda=1.0, max_new_tokens=6))

    class T:
        tokenizer = tok
        lm = None

    m.setup({}, None, SetupInfo(Eos(), 0, 0, 1, 1, teacher=T()))
    batch = text_batch(tok, ROWS, [0, 1, 2])
    out = m.prepare(batch, ctx(0))
    assert ((out.target != IGNORE_INDEX).sum(1) == 1).all()  # EOS alone is trained
    assert (out.target[out.target != IGNORE_INDEX] == tok.eos_token_id).all()


def test_lambda_zero_trains_on_the_data_exactly_as_token_kd(tok, student):
    m = method(student, tok, lmbda=0.0, divergence="generalized_jsd", beta=0.3, nll_weight=0.5)
    ref = TokenKD(TokenKDConfig(divergence="generalized_jsd", beta=0.3, nll_weight=0.5))
    batch = text_batch(tok, ROWS, [0, 1, 2])
    assert m.prepare(batch, ctx(3)) is batch
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*batch.views[TOKENS].shape, len(tok), generator=g)
    t = torch.randn(*batch.views[TOKENS].shape, len(tok), generator=g)
    outs = [x({TOKENS: ModelOutput(s, {})}, {TOKENS: ModelOutput(t, {})}, batch, ctx(3)) for x in (m, ref)]
    assert torch.equal(outs[0].loss, outs[1].loss) and float(outs[0].monitors["on_policy"]) == 0.0


def test_gkd_defaults_follow_the_paper_and_a_cached_teacher_is_refused(tok, student):
    cfg = GKDConfig()
    assert (cfg.divergence, cfg.beta, cfg.lmbda, cfg.temperature) == ("generalized_jsd", 0.5, 0.5, 1.0)
    m = GKD(GKDConfig(lmbda=0.5))

    class Cached:
        tokenizer = tok

    with pytest.raises(AlambicError, match="live teacher"):
        m.setup({}, None, SetupInfo(CausalLMLogits(student), 0, 0, 1, 1, teacher=Cached()))
    GKD(GKDConfig(lmbda=0.0)).setup({}, None, SetupInfo(CausalLMLogits(student), 0, 0, 1, 1, teacher=Cached()))


def test_seqkd_is_the_nll_of_the_completion_tokens_and_runs_no_teacher(tok):
    m = SeqKD()
    assert m.teacher_views == ()
    batch = text_batch(tok, ROWS, [0, 1, 2])
    s = torch.randn(*batch.views[TOKENS].shape, len(tok) + 3, requires_grad=True)
    m.shared_vocab = len(tok)
    out = m({TOKENS: ModelOutput(s, {})}, {}, batch, ctx(0))
    assert torch.allclose(out.loss, token_nll(s[..., : len(tok)], batch.target))
    out.loss.backward()
    assert s.grad[..., len(tok):].abs().sum() == 0  # padded output rows are no token


# -- a whole gkd run: killed after a checkpoint, resumed, equal to one uninterrupted run -------------------

def gkd_recipe(lm_dir, **method):
    return {"name": "gkd", "seed": 0,
            "data": {"name": "text", "path": str(lm_dir / "corpus.txt"), "format": "plain", "unit": "line",
                     "max_length": 24, "val_fraction": 0.1, "test_fraction": 0.1},
            "teacher": {"hf": str(lm_dir)}, "student": {"arch": "prune", "keep": [0, 3]},
            "method": {"name": "gkd", "lmbda": 0.6, "max_new_tokens": 6, "min_prompt_tokens": 2, **method},
            "train": {"epochs": 1, "steps": 6, "batch_size": 8, "lr": 0.003, "log_every": 1, "checkpoint_every": 3},
            "eval": {"num_prompts": 1, "max_new_tokens": 4}}


def test_a_killed_gkd_run_resumes_bit_identically(tmp_path):
    from alambic.models.causal_lm import write_tiny_lm
    from alambic.recipe import load_recipe
    from alambic.run import run
    from alambic.train.loop import Callback

    lm_dir = write_tiny_lm(tmp_path / "lm", steps=20)
    recipe = load_recipe(gkd_recipe(lm_dir))
    assert any(on_policy_step(0, s, 0.6) for s in range(3, 6)) and not all(on_policy_step(0, s, 0.6)
                                                                           for s in range(6))
    run(recipe, tmp_path / "whole", progress=False)

    class Kill(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "killed", progress=False, callbacks=[Kill()])
    run(recipe, tmp_path / "killed", resume=True, progress=False)

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train = lambda d: [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                       if r["split"] == "train"]
    whole, killed = train(tmp_path / "whole"), train(tmp_path / "killed")
    assert [r["loss"] for r in whole] == [r["loss"] for r in killed]
    assert [r["monitors"]["on_policy"] for r in whole] == [float(on_policy_step(0, s, 0.6)) for s in range(6)]


def test_the_draws_follow_the_recipe_seed_unless_the_method_names_one():
    from alambic.methods.gkd import GKD, GKDConfig

    m = GKD(GKDConfig())
    m.run_seed = 3  # what the language run sets from recipe.seed
    assert m.seed == 3
    pinned = GKD(GKDConfig(seed=5))
    pinned.run_seed = 3
    assert pinned.seed == 5
