"""A self-contained Llama-style decoder for the demo, benchmarks and tests.

It is written the way real model code is written (a custom module with its own ``reset_parameters``, a
computed non-persistent buffer, tied embeddings, an init pass after construction), so that it exercises
the patterns torchinit has to reproduce exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchinit.core.errors import ConfigurationError


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


_PRESETS = {
    "tiny": LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_layers=5,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=128,
        tie_embeddings=True,
    ),
    "0.3b": LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=24,
        num_heads=16,
        num_kv_heads=4,
        max_seq_len=2048,
        tie_embeddings=True,
    ),
    "1b": LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        max_seq_len=2048,
        tie_embeddings=True,
    ),
    "7b": LlamaConfig(),  # the Llama-2-7B shape
}


def config_for(size: str) -> LlamaConfig:
    """Named presets, so the demo and benchmarks can be sized with one word."""
    try:
        return _PRESETS[size]
    except KeyError:
        raise ConfigurationError(f"unknown size {size!r}; choose one of {', '.join(_PRESETS)}") from None


def num_parameters(cfg: LlamaConfig) -> int:
    """Parameter count of ``Llama(cfg)``, without paying for building it."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size + 2 * h
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.num_layers * per_layer + h


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.float())
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        # Grouped-query attention: each key/value head serves num_heads // num_kv_heads query heads.
        repeat = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style init; residual output projections shrink with depth so the residual stream's
        variance does not grow with the number of layers."""
        std = self.cfg.initializer_range
        residual_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                module.weight.data.normal_(0.0, std)
            elif isinstance(module, nn.Linear) and module.weight is not self.embed.weight:
                residual_out = name.endswith(("o_proj", "down_proj"))
                module.weight.data.normal_(0.0, residual_std if residual_out else std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        cos, sin = self.rope(input_ids.shape[1])
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def parallelize(model: Llama, device_mesh) -> Llama:
    """A parallelize_fn for `ModelParallelStrategy` (torchinit's or Lightning's): attention and MLP projections
    column- / row-wise on `device_mesh["tensor_parallel"]` (each rank keeps its heads), the embedding by rows and
    the head by columns (tied again when the model ties them), then `fully_shard` of each block and the root on
    `device_mesh["data_parallel"]`."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = device_mesh["tensor_parallel"]
    if tp.size() > 1:
        for block in model.layers:
            parallelize_module(block, tp, {
                "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
                "attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
            })
            block.attn.num_heads //= tp.size()
            block.attn.num_kv_heads //= tp.size()
        parallelize_module(model, tp, {"embed": RowwiseParallel(input_layouts=Replicate()),
                                       "lm_head": ColwiseParallel(output_layouts=Replicate())})
        if model.cfg.tie_embeddings:  # both Shard(0) on the TP mesh: one tensor again
            model.lm_head.weight = model.embed.weight
    for block in model.layers:
        fully_shard(block, mesh=device_mesh["data_parallel"])
    fully_shard(model, mesh=device_mesh["data_parallel"])
    return model
