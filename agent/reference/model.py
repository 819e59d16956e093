"""A small GPT-style decoder with Megatron-style tensor parallelism (pure torch).

Column-parallel linear: the input goes through ``copy_to_tp`` (identity forward, allreduce of the
gradient backward); the output stays sharded. Row-parallel linear: consumes the sharded input and
``reduce_from_tp`` sums partial outputs (allreduce forward, identity backward). Attention splits
heads across tp ranks; the MLP splits its hidden dimension. Embedding, layernorms and the LM head
are replicated: both tp ranks compute identical values (same data, same dropout masks on
replicated activations), so their gradients agree without extra communication.

Parameters are initialised from the full (unsharded) tensors drawn from a generator seeded by the
job seed, then sliced, so the model is identical for any tp and any rank order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..groups import Comm


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    seq: int = 32
    mlp_mult: int = 4
    dropout: float = 0.1


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:  # type: ignore[override]
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return ctx.comm.tp_allreduce(g.contiguous().clone()), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:  # type: ignore[override]
        return comm.tp_allreduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g, None


class StepRNG:
    """Per-step dropout generators, re-derived from (seed, step, rank) before every forward.

    ``replicated`` (seed, step, dp_index) drives dropout on activations both tp ranks share;
    ``sharded`` (seed, step, rank) drives dropout inside the tp region (attention heads).
    """

    def __init__(self) -> None:
        self.replicated = torch.Generator()
        self.sharded = torch.Generator()

    def reseed(self, seed: int, step: int, dp_index: int, rank: int) -> None:
        self.replicated.manual_seed(_mix(seed, 1, step, dp_index))
        self.sharded.manual_seed(_mix(seed, 2, step, rank))


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (x + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def dropout(x: torch.Tensor, p: float, gen: torch.Generator, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=gen, device="cpu").to(x.device) >= p
    return x * keep / (1.0 - p)


def _shard(full: torch.Tensor, dim: int, tp: int, idx: int) -> nn.Parameter:
    return nn.Parameter(full.chunk(tp, dim=dim)[idx].clone().contiguous())


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, tp: int, tp_index: int, comm: Comm, rng: StepRNG, gen: torch.Generator
    ) -> None:
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        assert h % tp == 0, "heads must split across tp"
        self.cfg, self.comm, self.rng, self.tp = cfg, comm, rng, tp
        self.heads = h // tp
        self.hd = d // h
        std = 0.02
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)
        # attention: q,k,v column-parallel (by heads), out row-parallel
        qkv = torch.randn(3, d, d, generator=gen) * std  # [3, out, in]
        self.qkv_w = _shard(qkv, 1, tp, tp_index)  # [3, d/tp, d]
        self.qkv_b = nn.Parameter(torch.zeros(3, d // tp))
        out = torch.randn(d, d, generator=gen) * std / math.sqrt(2 * cfg.n_layers)
        self.out_w = _shard(out, 1, tp, tp_index)  # [d, d/tp]
        self.out_b = nn.Parameter(torch.zeros(d))  # replicated, added after the reduce
        hid = cfg.mlp_mult * d
        fc1 = torch.randn(hid, d, generator=gen) * std
        self.fc1_w = _shard(fc1, 0, tp, tp_index)
        self.fc1_b = nn.Parameter(torch.zeros(hid // tp))
        fc2 = torch.randn(d, hid, generator=gen) * std / math.sqrt(2 * cfg.n_layers)
        self.fc2_w = _shard(fc2, 1, tp, tp_index)
        self.fc2_b = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        p = self.cfg.dropout if self.training else 0.0
        a = _CopyToTP.apply(self.ln1(x), self.comm)
        qkv = torch.einsum("btd,kod->kbto", a, self.qkv_w) + self.qkv_b[:, None, None, :]
        q, k, v = (t.view(B, T, self.heads, self.hd).transpose(1, 2) for t in qkv)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        att = dropout(att, p, self.rng.sharded, self.training)
        y = (att @ v).transpose(1, 2).reshape(B, T, self.heads * self.hd)
        y = _ReduceFromTP.apply(y @ self.out_w.t(), self.comm) + self.out_b
        x = x + dropout(y, p, self.rng.replicated, self.training)
        m = _CopyToTP.apply(self.ln2(x), self.comm)
        m = torch.nn.functional.gelu(m @ self.fc1_w.t() + self.fc1_b)
        m = _ReduceFromTP.apply(m @ self.fc2_w.t(), self.comm) + self.fc2_b
        return x + dropout(m, p, self.rng.replicated, self.training)


class TPGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, tp_index: int, comm: Comm, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(_mix(seed, 0))
        self.cfg, self.comm = cfg, comm
        self.rng = StepRNG()
        self.tok = nn.Parameter(torch.randn(cfg.vocab, cfg.d_model, generator=gen) * 0.02)
        self.pos = nn.Parameter(torch.randn(cfg.seq, cfg.d_model, generator=gen) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg, tp, tp_index, comm, self.rng, gen) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Parameter(torch.randn(cfg.vocab, cfg.d_model, generator=gen) * 0.02)
        self.register_buffer("mask", torch.ones(cfg.seq, cfg.seq, dtype=torch.bool).triu(1), persistent=False)
        # Training state that is not a parameter: an EMA of the (pre-clip) norm of the reduced
        # gradients, updated once per applied step. Identical on every dp replica of a tp shard
        # (it is computed after the gradient sync), so a replaced rank receives it from one.
        self.register_buffer("grad_norm_ema", torch.zeros((), dtype=torch.float32))

    def observe_grad_norm(self, norm: torch.Tensor) -> None:
        self.grad_norm_ema.mul_(0.9).add_(norm.detach().to(self.grad_norm_ema), alpha=0.1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok[idx] + self.pos[:T]
        x = dropout(x, self.cfg.dropout, self.rng.replicated, self.training)
        for b in self.blocks:
            x = b(x, self.mask[:T, :T])
        logits = self.ln_f(x) @ self.head.t()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def batch(
    seed: int, step: int, dp_index: int, micro_batch: int, cfg: ModelConfig, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic synthetic tokens for (seed, step, dp_index): the data position is the step.

    Sequences follow a noisy affine rule over the vocabulary so the loss can go down.
    """
    g = torch.Generator().manual_seed(_mix(seed, 3, step, dp_index))
    start = torch.randint(0, cfg.vocab, (micro_batch, 1), generator=g)
    mult = torch.randint(1, 8, (micro_batch, 1), generator=g)
    ar = torch.arange(cfg.seq + 1)[None, :]
    seq = (start + mult * ar) % cfg.vocab
    noise = torch.rand(seq.shape, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, cfg.vocab, seq.shape, generator=g), seq)
    return seq[:, :-1].to(device), seq[:, 1:].to(device)
