"""Generalized knowledge distillation (GKD): on-policy distillation of a causal LM.

Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024,
arXiv 2306.13649, Algorithm 1: at each step, with probability λ (the student data fraction) the student
*samples* the completions of the batch's prompts and the token-level divergence ``D(p_T ‖ p_S)(y | x)`` (Eq. 3;
the generalised JSD(β) of Eq. 2 by default) is taken on those sequences, the teacher scoring the very same
tokens; otherwise on the dataset's completions (supervised KD, λ = 0 is ``token_kd``). The samples are
constants: no gradient flows through the sampling (the paper's Algorithm 1 and §3).

Here the draw happens in :meth:`GKD.prepare`, before the Trainer's forward passes, so the student and the
teacher both see the sampled batch and the rest of the loop (chunks, ranks, precision) is unchanged:

- whether step ``s`` is on-policy is a pure function of (``seed``, ``s``, λ);
- each row's completion is :func:`~alambic.generation.sampling.sample` of the student at (``seed``, ``s``,
  the row's sample id), with the sampling temperature ``sampling_temperature`` (its own option: the loss
  temperature ``temperature`` is a different thing) and ``top_p``, at most ``max_new_tokens`` tokens; the
  student samples in eval mode (no dropout) and without touching the global RNG.

So a resumed run and a run on several processes draw the same sequences as an uninterrupted one on one.
Tokens after the first EOS are not part of the sequence (the EOS itself is a target: the student learns to
stop). The prompt is what precedes a row's completion; with ``min_prompt_tokens`` a shorter prompt (plain
text, where the prompt is only BOS) is extended with the row's own first tokens, leaving at least one.

Requires a live teacher: a cache of the teacher's top-k logits covers the dataset's completions, not the
student's samples.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import Field

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.text import ATTENTION_MASK, TOKENS, TokenizedExample, collate
from alambic.errors import AlambicError
from alambic.generation.sampling import sample
from alambic.methods.base import Method, MethodOutput, SetupInfo, StepContext
from alambic.methods.token_kd import TokenKD, TokenKDConfig, token_nll
from alambic.losses import sequence as seq
from alambic.registry import METHODS


class GKDConfig(TokenKDConfig):
    divergence: Literal["forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
                        "total_variation"] = Field(
        "generalized_jsd", description="per-token divergence (GKD Eq. 2-3: generalized_jsd with beta by default; "
        "forward_kl, reverse_kl; DistiLLM's skew_kl, skew_reverse_kl; total_variation)")
    lmbda: float = Field(0.5, ge=0, le=1, description="λ, the probability that a step trains on the student's own "
                         "samples (GKD Algorithm 1's student data fraction; 0: token_kd on the data)")
    sampling_temperature: float = Field(1.0, ge=0, description="temperature of the student's sampling (0: greedy); "
                                        "not the loss temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus of the student's sampling")
    max_new_tokens: int = Field(64, ge=1, description="longest sampled completion")
    min_prompt_tokens: int = Field(0, ge=0, description="extend a shorter prompt with the row's first tokens "
                                   "(plain text: the prompt is only BOS)")
    seed: int | None = Field(None, ge=0, description="keys the on-policy coin and the draws with (seed, step, sample "
                             "id); None: the recipe's seed, so runs of different seeds draw different samples")


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether optimizer step ``step`` trains on student samples: ``u(seed, step) < λ`` with ``u`` uniform in
    [0, 1) from a digest of (seed, step), never from a global RNG."""
    h = hashlib.blake2b(f"alambic.gkd.lambda/{int(seed)}/{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < lmbda


@METHODS.register("gkd")
class GKD(Method):
    """On-policy KD (GKD, Algorithm 1): with probability λ per step the divergence is taken on the student's
    own samples of the batch's prompts, scored by the teacher; otherwise on the dataset's completions."""

    paper = ('Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", '
             'ICLR 2024, arXiv:2306.13649')

    Config = GKDConfig
    needs_teacher = True
    uses_unlabeled = True
    modality = "text"
    upcasts_itself = True  # bf16 logits as they are: the losses upcast chunk by chunk (no [B, T, V] fp32 copy)
    student_views = (TOKENS,)
    teacher_views = (TOKENS,)

    chunk_weight = TokenKD.chunk_weight  # token means: chunks weigh by their share of the step's tokens
    divergence = TokenKD.divergence  # the configured divergence of losses.sequence, as token_kd takes it

    def __init__(self, config: GKDConfig | None = None):
        super().__init__(config)
        self.shared_vocab: int | None = None  # set by the language run: the tokenizer's real size
        self._student: tuple = ()  # (the student LM,): a tuple, so the method does not register it as its own
        self.eos_id: int | None = None
        self.pad_id: int = 0
        self.run_seed = 0  # the recipe's seed, set by the language run; config.seed overrides it
        # (real tokens, loss tokens) of every batch trained on so far (the sampled ones on on-policy steps): the
        # run's train.tokens; a buffer, so the checkpoint keeps it and a resumed run counts on
        self.register_buffer("tokens_seen", torch.zeros(2, dtype=torch.int64))

    @property
    def seed(self) -> int:
        return self.config.seed if self.config.seed is not None else self.run_seed

    def setup(self, student, teacher, info: SetupInfo) -> None:
        lm = getattr(info.student, "lm", info.student)
        self._student = (lm,)
        tokenizer = getattr(info.teacher, "tokenizer", None)
        cfg = getattr(lm, "config", None)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else getattr(cfg, "eos_token_id", None)
        self.eos_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else getattr(cfg, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.eos_id if self.eos_id is not None else 0))
        if self.config.lmbda > 0 and info.teacher is not None and not hasattr(info.teacher, "lm"):
            raise AlambicError(f"method.lmbda {self.config.lmbda}: gkd scores the student's samples with the teacher, "
                               f"which needs a live teacher (teacher.hf), not {type(info.teacher).__name__}")

    def prepare(self, batch: Batch, ctx: StepContext) -> Batch:
        """The dataset batch, or (on an on-policy step) the same prompts with the student's sampled completions."""
        cfg = self.config
        if on_policy_step(self.seed, ctx.step, cfg.lmbda):
            if not self._student:
                raise AlambicError("gkd: prepare() before setup(): the method does not know the student yet")
            batch = self.sample_batch(batch, ctx.step)
        self.count_tokens(batch)
        return batch

    def count_tokens(self, batch: Batch) -> None:
        """Add ``batch``'s real tokens (its attention mask; every position without one) and loss tokens to
        ``tokens_seen``. ``prepare`` sees the whole step's batch on every rank, so every rank counts the same."""
        mask = batch.extras.get(ATTENTION_MASK)
        real = int(mask.sum()) if mask is not None else batch.views[TOKENS].numel()
        self.tokens_seen += torch.tensor([real, int((batch.target != IGNORE_INDEX).sum())],
                                         device=self.tokens_seen.device)

    def sample_batch(self, batch: Batch, step: int) -> Batch:
        """``batch``'s prompts, each followed by the student's completion drawn at (seed, ``step``, sample id)."""
        cfg = self.config
        ids, prompts = batch.views[TOKENS], prompt_rows(batch, cfg.min_prompt_tokens)
        lm = self._student[0]
        comp = sample(lm, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.sampling_temperature,
                      top_p=cfg.top_p, seed=self.seed, step=step, sample_ids=batch.index.tolist(),
                      eos_id=self.eos_id, pad_id=self.pad_id, vocab_size=self.shared_vocab)
        rows = [TokenizedExample(tuple(p + comp.row(b, with_eos=True)), len(p)) for b, p in enumerate(prompts)]
        out = collate(rows, batch.index.tolist(), self.pad_id)
        device = ids.device
        return Batch(views={TOKENS: out.views[TOKENS].to(device)}, index=batch.index, target=out.target.to(device),
                     extras={ATTENTION_MASK: out.extras[ATTENTION_MASK].to(device)})

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        if teacher is None or TOKENS not in teacher:
            raise AlambicError("gkd needs a teacher")
        s_full = student[TOKENS].logits
        s, t = seq.truncate_to_shared_vocab(s_full, teacher[TOKENS].logits, self.shared_vocab)
        mask = batch.target != IGNORE_INDEX
        loss, terms = s.sum().float() * 0.0, {}  # float32 even for bf16 logits
        if cfg.kd_weight > 0:
            kd = cfg.kd_weight * self.divergence(s, t, mask)
            loss, terms["kd"] = loss + kd, kd.detach()
        if cfg.nll_weight > 0:
            nll = cfg.nll_weight * token_nll(s, batch.target)
            loss, terms["nll"] = loss + nll, nll.detach()
        on = float(on_policy_step(self.seed, ctx.step, cfg.lmbda))
        return MethodOutput(loss, terms, s_full, monitors={"on_policy": torch.tensor(on)})


def prompt_rows(batch: Batch, min_prompt_tokens: int = 0) -> list[list[int]]:
    """The prompt of each row of a right-padded text batch: the tokens before its first completion token
    (position ``t + 1`` for the first ``t`` whose target counts), at least ``min(min_prompt_tokens,
    length - 1)`` tokens."""
    ids, target = batch.views[TOKENS], batch.target
    mask = batch.extras.get(ATTENTION_MASK)
    lengths = mask.sum(1) if mask is not None else torch.full((len(batch),), ids.shape[1])
    counts = target != IGNORE_INDEX
    out = []
    for b in range(len(batch)):
        n = int(lengths[b])
        first = torch.nonzero(counts[b]).flatten()
        start = int(first[0]) + 1 if len(first) else n
        start = max(start, min(min_prompt_tokens, n - 1), 1)
        out.append(ids[b, :start].tolist())
    return out
