"""The sequence condenser: SeqCond's token mixer (docs/architectures.md, design "G3", with §0's relative decay).

Each memory head keeps, per channel, a weighted empirical characteristic function of its squashed keys,
sampled at M learned frequencies; query heads read it with a complex inner product. It is a linear
recurrence with a per-head decay, so training runs as a chunked parallel scan in fp32 (linear memory in
T) and decoding keeps an O(1) state: conv tail, normaliser, complex accumulators and position.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import exclude_from_weight_decay
from .layers.feed_forward import gated_linear
from .layers.norm import RMSNorm, gated_rms_norm
from .layers.scan import Pairs, scan, use_triton_kernel
from .output import ModelState, zero_rows
from .seqcond_config import SeqCondConfig

THETA_MIN, THETA_MAX = 0.001, 3.0  # frequency grid bounds in radians per unit of squashed key (§1.1 step 4)
WEIGHT_MIN, WEIGHT_MAX = 1e-4, 5000.0  # token weight clip (§1.1 step 7)
DEN_FLOOR = 1e-4  # normaliser floor (§1.1 step 10); weights >= 1e-4 keep it from binding


@dataclasses.dataclass(frozen=True)
class CondenserState(ModelState):
    """Everything one condenser layer needs to continue a sequence; its size does not grow with length."""

    conv: Tensor  # (B, kernel - 1, C): the newest input projections before the conv, compute dtype
    den: Tensor  # (B, K) fp32: decayed sum of token weights
    re: Tensor  # (B, K, H, M) fp32: decayed weighted sum of k cos(phi)
    im: Tensor  # (B, K, H, M) fp32: decayed weighted sum of k sin(phi)
    position: Tensor  # (B,) int64: tokens seen by each row (rows may differ)

    def reset_rows(self, reset: Tensor) -> CondenserState:
        """Rows where `reset` (B,) is True start over: an empty conv tail, empty sums and position 0."""
        return self.map_tensors(lambda t: zero_rows(t, reset))


def decayed_prefix_sum(values: Tensor, log_decay: Tensor, initial: Tensor | None, chunk_size: int) -> Tensor:
    """out_t = sum_{s<=t} exp(log_decay * (t - s)) * values_s + exp(log_decay * (t + 1)) * initial.

    values (B, T, K, D) fp32, log_decay (K,) <= 0, initial (B, K, D) or None. Inside a chunk of C tokens
    the decays form a masked (C, C) matrix per head; a loop over the T / C chunks carries the state
    between them. Every exponent is <= 0, so nothing overflows, and a weight that underflows is
    negligible next to the newest token's. chunk_size >= T gives the masked T x T form.
    """
    B, T, K, D = values.shape
    C = min(chunk_size, T)
    n = -(-T // C)
    values = F.pad(values, (0, 0, 0, 0, 0, n * C - T)).view(B, n, C, K, D)  # (B, n, C, K, D), zeros appended
    i = torch.arange(C, device=values.device)
    lag = (i[:, None] - i[None, :]).clamp(min=0)  # (C, C): i - j, clamped so masked entries stay finite
    decay = torch.exp(log_decay[:, None, None] * lag) * (i[:, None] >= i[None, :])  # (K, C, C)
    out = torch.einsum("kij,bnjkd->bnikd", decay, values)  # (B, n, C, K, D): each chunk from a zero state

    chunk_decay = torch.exp(log_decay * C)[:, None]  # (K, 1)
    carry = values.new_zeros(B, K, D) if initial is None else initial
    entering = []
    for chunk_sum in out[:, :, -1].unbind(1):  # (B, K, D) each: one chunk's inputs decayed to its last token
        entering.append(carry)
        carry = chunk_decay * carry + chunk_sum
    entering = torch.stack(entering, dim=1)  # (B, n, K, D): the state just before each chunk
    ramp = torch.exp(log_decay * (i[:, None] + 1))  # (C, K): its decay to each position in the chunk
    out = out + ramp[:, :, None] * entering[:, :, None]  # (B, n, C, K, D)
    return out.reshape(B, n * C, K, D)[:, :T]  # (B, T, K, D)


def condense_and_read(
    keys: Tensor,
    weights: Tensor,
    log_decay: Tensor,
    queries: Tensor,
    condenser: SequenceCondenser,
    initial: CondenserState | None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The condensed state read by the queries, o (B, T, K, 2, H) ([Re, Im] per memory head), and the last
    sums (Re S, Im S (B, K, H, M), den (B, K)) to carry on; by the fused Triton kernel where the condenser's
    `scan_kernel` selects it (checked once per device by `kernel_pairs`), else by `condense_and_read_torch`.

    keys (B, T, K, H) and the token weights p (B, T, K) in fp32; log_decay (K,); queries (B, T, Kq, H, M, 2).
    """
    args = (keys, weights, log_decay, queries, condenser, initial)
    if use_triton_kernel(condenser.config.scan_kernel, keys, "condenser", kernel_pairs):
        return condense_and_read_triton(*args)
    return condense_and_read_torch(*args)


def condense_and_read_torch(keys, weights, log_decay, queries, condenser, initial):
    """`condense_and_read` in PyTorch: every (B, T, K, H, M) term as a tensor, the sums by decayed_prefix_sum."""
    B, T, K, H = keys.shape
    Kq, M = condenser.Kq, condenser.M
    squashed = F.softsign(_wide(condenser.phase_scale)[:, None] * keys)  # (B, T, K, H)
    phase = squashed[..., None] * condenser.frequencies()  # (B, T, K, H, M)
    amplitude = (weights[..., None] * keys)[..., None]  # (B, T, K, H, 1)
    values = torch.cat(
        [(amplitude * phase.cos()).flatten(3), (amplitude * phase.sin()).flatten(3), weights[..., None]], dim=-1
    )  # (B, T, K, 2HM + 1): real parts, imaginary parts, normaliser
    if initial is not None:
        initial = torch.cat([initial.re.flatten(2), initial.im.flatten(2), initial.den[..., None]], dim=-1)
    chunk = T if condenser.config.use_square_matrix else condenser.config.chunk_size
    sums = decayed_prefix_sum(values, log_decay, initial, chunk)  # (B, T, K, 2HM + 1)
    re, im, den = sums.split([H * M, H * M, 1], dim=-1)
    last = (re[:, -1].reshape(B, K, H, M), im[:, -1].reshape(B, K, H, M), den[:, -1, :, 0])

    # o = sum_m w_m S_m conj(q_m) / sqrt(H), S = sum / max(den, 1e-4): the division comes after the sum over
    # m, on tensors M times smaller.
    num = torch.complex(re, im).view(B, T, Kq, K // Kq, H, M)
    q = _wide(queries).view(B, T, Kq, 1, H, M, 2)  # broadcast over the memory heads of each query head
    q = torch.complex(q[..., 0], q[..., 1])  # (B, T, Kq, 1, H, M)
    o = (num * q.conj() * condenser.integration_weights()).sum(-1)  # (B, T, Kq, K / Kq, H)
    o = o / (den.clamp_min(DEN_FLOOR) * math.sqrt(H)).view(B, T, Kq, K // Kq, 1)
    return torch.stack([o.real, o.imag], dim=-2).view(B, T, K, 2, H), last


def condense_and_read_triton(keys, weights, log_decay, queries, condenser, initial):
    """`condense_and_read` by the fused kernel (condenser_triton.py), which keeps no (B, T, K, H, M) tensor;
    the normaliser, one channel per head, by the recurrence kernel."""
    from .condenser_triton import condense_and_read_fused

    B, T, K, H = keys.shape
    den_0 = None if initial is None else initial.den
    den = scan(weights, log_decay, den_0, kernel=condenser.config.scan_kernel)  # (B, T, K), checked on its own
    readout, re, im = condense_and_read_fused(
        keys,
        weights,
        condenser.frequencies(),
        _wide(condenser.phase_scale),
        condenser.integration_weights().reshape(K, H, condenser.M),
        log_decay,
        queries,
        None if initial is None else initial.re,
        None if initial is None else initial.im,
    )  # (B, T, K, 2, H)
    o = readout / (den.clamp_min(DEN_FLOOR) * math.sqrt(H))[..., None, None]
    return o, (re, im, den[:, -1])


def kernel_pairs(device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """The check `use_triton_kernel` runs once per device: a small random condenser (two query heads over
    four memory heads, one an anchor head) from a state, its output and every input's gradient, by the
    fused kernel on `device` against PyTorch on CPU."""
    config = SeqCondConfig(d_model=32, expand_factor=1.0, seqcond_heads=4, num_query_heads=2, num_anchor_heads=1)
    reference = SequenceCondenser(dataclasses.replace(config, scan_kernel="torch"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    fused = SequenceCondenser(dataclasses.replace(config, scan_kernel="triton")).to(device)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 45, 32, generator=generator)
    with torch.no_grad():
        _, state = reference(torch.randn(2, 7, 32, generator=generator))
    grad = torch.randn(2, 45, 32, generator=generator)
    results = []
    for model, where in ((fused, device), (reference, torch.device("cpu"))):
        inputs = x.to(where, copy=True).requires_grad_()
        y, new = model(inputs, state.to(where))
        y.backward(grad.to(where))
        results.append([y, new.re, new.im, new.den, inputs.grad, *(p.grad for p in model.parameters())])
    return list(zip(*results))


class SequenceCondenser(nn.Module):
    """x (B, T, D) -> (B, T, D): one projection, short conv, condensation, query readout (§1.1 steps 1-14)."""

    def __init__(self, config: SeqCondConfig):
        super().__init__()
        self.config = config
        K, Kq, H, M, E = (
            config.memory_heads,
            config.query_heads,
            config.channels_per_head,
            config.num_thetas,
            config.out_channels_per_head,
        )
        self.K, self.Kq, self.H, self.M, self.E = K, Kq, H, M, E
        self.widths = (K * H, K, Kq * H * M * 2)  # keys, scores, queries (re and im)
        C = sum(self.widths)
        self.in_proj = nn.Linear(config.d_model, C, bias=False)
        # Depthwise causal conv taps (C, kernel); the last tap multiplies the current token.
        self.conv_weight = nn.Parameter(torch.empty(C, config.conv_kernel_size)) if config.use_conv else None
        self.theta_raw = nn.Parameter(torch.empty(K, H, M))
        self.integration_raw = nn.Parameter(torch.empty(Kq, K // Kq, H, M))
        self.decay_raw = nn.Parameter(torch.empty(K))  # lambda = softplus(decay_raw)
        self.score_scale = nn.Parameter(torch.empty(K))  # a in p = softplus(a s + b)
        self.score_bias = nn.Parameter(torch.empty(K))  # b
        self.phase_scale = nn.Parameter(torch.empty(K))  # c in phi = softsign(c k) theta
        self.gate = nn.Linear(config.d_model, K * 2 * H, bias=False)
        self.norm = RMSNorm(K * 2 * H)
        self.readout = nn.Parameter(torch.empty(K, 2 * H, 2 * E))
        self.out = nn.Linear(K * E, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        # The frequency grid, its quadrature and the per-head scalars set where and how the keys are sampled;
        # decay toward 0 would drag them off their designed init (frequencies toward the middle of the range).
        exclude_from_weight_decay(
            self.theta_raw,
            self.integration_raw,
            self.decay_raw,
            self.score_scale,
            self.score_bias,
            self.phase_scale,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The condenser's own parameters (§1.1 init); the linear layers are the model's init_weights' job."""
        K, A, M = self.K, self.config.num_anchor_heads, self.M
        device = self.theta_raw.device
        with torch.no_grad():
            if M == 1:  # theta_k = geomspace(0.001, 3, K) across heads, through the sigmoid; ends held inside (0, 1)
                fraction = (_geomspace(THETA_MIN, THETA_MAX, K, device) - THETA_MIN) / (THETA_MAX - THETA_MIN)
                self.theta_raw.copy_(torch.logit(fraction.clamp(1e-3, 1 - 1e-3))[:, None, None].expand(K, self.H, 1))
            else:  # softplus(raw_m) = geomspace(0.001, 3, M): a monotone grid after the cumsum
                self.theta_raw.copy_(
                    _inverse_softplus(_geomspace(THETA_MIN, THETA_MAX, M, device)).expand(K, self.H, M)
                )
            # decay heads: lambda from 0.001 to 0.1, half-lives of ~700 down to ~7 tokens; anchor heads 0.01 to 0.1
            lam = torch.cat([_geomspace(1e-3, 0.1, K - A, device), _geomspace(1e-2, 0.1, A, device)])
            self.decay_raw.copy_(_inverse_softplus(lam))
        nn.init.zeros_(self.integration_raw)  # uniform 1/M quadrature
        nn.init.ones_(self.score_scale)
        nn.init.zeros_(self.score_bias)
        nn.init.ones_(self.phase_scale)
        bound = math.sqrt(6.0 / (2 * self.H + 2 * self.E))  # glorot uniform per head
        nn.init.uniform_(self.readout, -bound, bound)
        if self.conv_weight is not None:
            nn.init.normal_(self.conv_weight, std=self.conv_weight.shape[1] ** -0.5)
        self.norm.reset_parameters()

    def frequencies(self) -> Tensor:
        """theta (K, H, M) fp32 in [0.001, 3], monotone in m when M > 1."""
        raw = _wide(self.theta_raw)
        if self.M == 1:
            return THETA_MIN + (THETA_MAX - THETA_MIN) * torch.sigmoid(raw)
        steps = F.softplus(raw) + 1e-4
        return THETA_MIN + (THETA_MAX - THETA_MIN) * steps.cumsum(-1) / steps.sum(-1, keepdim=True)

    def integration_weights(self) -> Tensor:
        """w_int (Kq, K / Kq, H, M) fp32, summing to 1 over M."""
        return torch.softmax(_wide(self.integration_raw), dim=-1)

    def token_weights(self, scores: Tensor) -> Tensor:
        """p = clip(softplus(a s + b), 1e-4, 5000) from scores (..., K), fp32."""
        p = F.softplus(_wide(self.score_scale) * _wide(scores) + _wide(self.score_bias))
        return p.clamp(WEIGHT_MIN, WEIGHT_MAX)

    def decay_rates(self) -> Tensor:
        """lambda (K,) fp32 > 0: the first K - num_anchor_heads heads decay, the rest are anchor heads."""
        return F.softplus(_wide(self.decay_raw))

    def kernel_checks(self) -> list[tuple[str, str, Pairs | None]]:
        """The Triton ops this layer may select (`settle_kernel_checks`): the fused condenser and, for its
        normaliser, the recurrence."""
        return [(self.config.scan_kernel, "condenser", kernel_pairs), (self.config.scan_kernel, "recurrence", None)]

    def forward(self, x: Tensor, state: CondenserState | None = None) -> tuple[Tensor, CondenserState]:
        B, T, _ = x.shape
        K, Kq, H, M = self.K, self.Kq, self.H, self.M
        z, conv_tail = self._short_conv(self.in_proj(x), state)  # (B, T, C)
        keys, scores, queries = z.split(self.widths, dim=-1)
        keys = _wide(keys).view(B, T, K, H)

        # Token weights with the decay split into a per-step factor (decay heads) and a weight anchored
        # at position 0 (anchor heads): token s seen from t weighs exp(-lambda (t - s)) p_s or exp(-lambda s) p_s.
        start = torch.zeros(B, dtype=torch.long, device=x.device) if state is None else state.position
        positions = start[:, None] + torch.arange(T, device=x.device)  # (B, T)
        lam = self.decay_rates()
        is_anchor = torch.arange(K, device=x.device) >= K - self.config.num_anchor_heads  # (K,)
        log_decay = torch.where(is_anchor, torch.zeros_like(lam), -lam)  # (K,)
        anchor_log = torch.where(is_anchor, -lam * positions[..., None], torch.zeros_like(lam))  # (B, T, K)
        weights = self.token_weights(scores) * torch.exp(anchor_log)  # (B, T, K)

        queries = queries.view(B, T, Kq, H, M, 2)
        o, (re, im, den) = condense_and_read(keys, weights, log_decay, queries, self, state)  # (B, T, K, 2, H)
        # Copies, so that a state does not keep the whole call's (B, T, ...) tensors alive.
        new_state = CondenserState(conv_tail.clone(), den.clone(), re.clone(), im.clone(), start + T)
        o = o.view(B, T, K * 2 * H)  # per head [Re (H), Im (H)]

        y = gated_rms_norm(o, self.gate(x), self.norm).to(x.dtype)  # norm(o * silu(gate)) in fp32, cast back
        readout = self.readout.view(K, 2 * H, 2, self.E)  # each head's [values ‖ gates]
        y = torch.einsum("btkc,kcge->btgke", y.view(B, T, K, 2 * H), readout)  # (B, T, 2, K, E)
        y = gated_linear(y.flatten(2), self.out, gate="sigmoid")  # [values ‖ gates] (B, T, 2KE) -> (B, T, D)
        return self.dropout(y), new_state

    def _short_conv(self, z: Tensor, state: CondenserState | None) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv over [conv tail; z] then SiLU; returns it and the new tail (B, kernel-1, C)."""
        B, T, C = z.shape
        if self.conv_weight is None:
            return F.silu(z), z.new_zeros(B, 0, C)
        kernel = self.conv_weight.shape[1]
        tail = z.new_zeros(B, kernel - 1, C) if state is None else state.conv.to(z.dtype)
        padded = torch.cat([tail, z], dim=1)  # (B, kernel - 1 + T, C)
        # A sum of shifted products: as fast as a depthwise Conv1d forward, and much faster backward on CPU.
        mixed = sum(padded[:, j : j + T] * self.conv_weight[:, j] for j in range(kernel))  # (B, T, C)
        return F.silu(mixed), padded[:, T:]


def _wide(t: Tensor) -> Tensor:
    """t in fp32, or kept in fp64: the precision of the condenser's weights, phases and sums."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _geomspace(start: float, end: float, n: int, device) -> Tensor:
    return torch.logspace(math.log10(start), math.log10(end), n, device=device)


def _inverse_softplus(y: Tensor) -> Tensor:
    """x with softplus(x) = y, stable for small y: log(expm1(y))."""
    return torch.log(torch.expm1(y))
