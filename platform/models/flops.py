"""Training FLOPs per token of each family, and the GPU peaks that model FLOPs utilisation (MFU) divides by.

The count follows PaLM's appendix B (and nanoGPT, torchtitan): a weight used once per token costs 2 FLOPs
forward and 4 backward, so the matmuls cost 6·N per token, N being the parameters that multiply activations:
every parameter except an untied input embedding (a lookup, no arithmetic); a tied embedding counts once, as
the output head. Mixing along the sequence adds, per layer:
- softmax attention: 12·d_q·S (QKᵀ and AV, 2·S·d_q each forward, times 3), S the keys each query sees
  (the sequence, plus registers). The causal half is counted too, as PaLM does, so numbers compare across
  codebases;
- SeqCond's condenser: its chunked scan multiplies each chunk by a masked (C, C) decay matrix per memory
  head: 6·C·K·(2·H·M + 1) (the full C, as computed);
- SerriformNet's recurrence: the same chunked scan per channel on m = d_model / memory_dim_factor channels
  with chunks of 64: 6·64·m;
- SerriformNet's mixture of experts: only the top-k of the E experts run for a token, so N counts k/E of
  the expert weights.
Element-wise work (norms, activations, softmax, rotary, the condenser's readout) is not counted.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .layers.scan import linear_scan

SCAN_CHUNK = inspect.signature(linear_scan).parameters["chunk_size"].default  # the recurrence's chunk (64)

# Peak dense bf16 tensor-core FLOP/s per GPU (vendor data sheets, without sparsity). The SXM parts; a name
# is matched by its first listed substring, so H200 is checked before H100.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device: torch.device | str) -> float | None:
    """The device's peak bf16 dense FLOP/s, or None when unknown (CPUs, other GPUs): MFU is then not reported."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def _meta_model(arch: str, config: Any) -> nn.Module:
    from .registry import family

    with torch.device("meta"):
        return family(arch).model(config)


def _matmul_parameters(model: nn.Module, tied: bool) -> int:
    """Every parameter, less the input embedding when it is only looked up (untied)."""
    total = sum(p.numel() for p in model.parameters())
    return total if tied else total - model.embed.weight.numel()


def lswt_flops_per_token(config: Any, seq_len: int) -> float:
    """LSWT: tied embedding (the head), every block attends over seq_len keys plus its registers."""
    model = _meta_model("lswt", config)
    registers = sum(m.numel() for name, m in model.named_parameters() if "register" in name)
    n = _matmul_parameters(model, tied=True) - registers  # registers are keys and values, counted below
    attention = 12 * config.n_layers * config.d_model * (seq_len + config.n_registers)
    return 6 * n + attention


def seqcond_flops_per_token(config: Any, seq_len: int) -> float:
    """SeqCond: attention blocks over seq_len keys, condensers with their chunked scan."""
    model = _meta_model("seqcond", config)
    n = _matmul_parameters(model, tied=config.tie_weights)
    n_attention = len(config.attention_layers)
    attention = 12 * n_attention * config.n_heads * config.head_dim * seq_len
    chunk = min(config.chunk_size, seq_len) if not config.use_square_matrix else seq_len
    K, H, M = config.memory_heads, config.channels_per_head, config.num_thetas
    scan = 6 * (config.n_layers - n_attention) * chunk * K * (2 * H * M + 1)
    return 6 * n + attention + scan


def serriform_flops_per_token(config: Any, seq_len: int) -> float:
    """SerriformNet: untied head, the recurrence's chunked scan, k of E experts per token."""
    model = _meta_model("serriform", config)
    n = _matmul_parameters(model, tied=False)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".moe." in name and "router" not in name)
    if config.use_moe:
        n -= experts * (config.num_experts - config.top_k_experts) // config.num_experts
    channels = config.d_model // config.memory_dim_factor if config.use_recurrence else 0
    scan = 6 * config.n_layers * min(SCAN_CHUNK, seq_len) * channels
    return 6 * n + scan


FLOPS_PER_TOKEN = {
    "lswt": lswt_flops_per_token,
    "seqcond": seqcond_flops_per_token,
    "serriform": serriform_flops_per_token,
}


def flops_per_token(arch: str, config: Any, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token of `arch` with `config` on rows of seq_len tokens."""
    if arch not in FLOPS_PER_TOKEN:
        raise ValueError(f"no FLOP count for arch '{arch}'; known: {', '.join(FLOPS_PER_TOKEN)}")
    return float(FLOPS_PER_TOKEN[arch](config, seq_len))
