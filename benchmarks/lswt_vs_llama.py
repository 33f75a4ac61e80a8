"""LSWT against Hugging Face transformers' LlamaForCausalLM at equal shape: training and decoding speed.

Both models get the same width, depth, heads, SwiGLU width, vocabulary, tied embeddings and sequence
length (LSWT's d_vocab = d_model, so its embedding matches Llama's; it still has its two projections,
LayerNorms and biases). With `--size NAME` LSWT is that named size as it is (its own d_vocab, so its
projections narrow the embedding) and Llama takes the size's d_model, layers, heads, d_ff and vocabulary.
Three tables:

- training tokens/s (forward + cross-entropy + backward + AdamW step) of Llama, LSWT without registers
  and LSWT in the seed's configuration (16 registers, reversed RoPE, input/output projections), the last
  also with the loss as training computes it: the output head and cross-entropy in chunks of
  `--loss_chunk_size` tokens (`head_losses`), never the batch's full logits. With `--compile` each LSWT
  row is measured again with its blocks compiled as `fit` compiles them (`compile_blocks`); Llama stays
  eager (transformers' SDPA attention). Goals on one GPU in bf16: compiled LSWT >= 1.2x Llama's tokens/s,
  and MFU >= 45% at `--size medium`. The MFU column is tokens/s x training FLOPs per token / the device's
  bf16 dense peak (`lctrain.models.flops`; "-" where the peak is unknown, as on CPUs). `--skip eager` and
  `--skip full_logits` leave rows out (each row keeps its own AdamW state, 12 bytes per parameter: at
  `medium` all seven rows do not fit beside the activations of 8 x 2048 tokens);
- registers at a long sequence (`--register_seq_len`, batch 1): tokens/s and peak allocated memory of a
  training step with 16 registers against none (goal: >= 0.9x the throughput, <= 1.1x the memory);
- decoding ms/token at batch 1 after a prompt of each `--contexts` length: LSWT (seed configuration) with
  its state against Llama with its KV cache (goal: LSWT <= Llama at every context). Prefill is not timed.
  These two tables measure the eager models, with or without `--compile`.

`--dtype bf16` is mixed precision as training runs it, for both models alike: fp32 weights and AdamW
state, forward and loss under `torch.autocast(bf16)`. Models take turns within each round and the fastest
of `--repeats` rounds counts (the first round, which also compiles, never counts), so a busy machine slows
each alike; times are this process's CPU time on a CPU and wall-clock after synchronising on a GPU
(common.seconds). Run from the repository root:

    python -m benchmarks.lswt_vs_llama [--device cuda] [--dtype bf16] [--compile] [--size medium]
        [--threads 1] [--d_model 256 --seq_len 512 ...] [--skip registers decoding eager]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import DTYPES, describe_device, markdown_table, seconds, step_peak
from lctrain.models import build_model, count_parameters, flops
from lctrain.models.registry import config_for
from lctrain.training.losses import head_losses, token_weights
from lctrain.training.module import compile_blocks, compile_options

LLAMA = "transformers LlamaForCausalLM"
NO_REGISTERS = "LSWT, no registers"
SEED = "LSWT seed configuration (16 registers, reversed RoPE, projections)"
SEED_CHUNKED = "LSWT seed configuration, chunked loss (as `fit` trains)"
COMPILED = ", compiled"
SHAPE = ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size")
# The shape without --size: a few million parameters, quick on a CPU.
DEFAULT_SHAPE = dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, vocab_size=8192)


def lswt(args: argparse.Namespace, n_registers: int = 0) -> torch.nn.Module:
    """LSWT of the run's shape: `--size` as it is, else d_vocab = d_model (an embedding as wide as Llama's)."""
    shape = {key: getattr(args, key) for key in SHAPE}
    extra = {} if args.size else dict(d_vocab=args.d_model, rope_base=500000.0, rope_reversed=True)
    with torch.device(args.device):  # built and initialised where it runs
        return build_model("lswt", args.size or "debug", **shape, **extra, n_registers=n_registers)


def llama(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    longest = max([args.seq_len, args.register_seq_len, *args.contexts]) + args.new_tokens + 1
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=args.d_ff,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
        max_position_embeddings=longest, rope_theta=500000.0, tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device(args.device):
        return LlamaForCausalLM(config)


def compiled(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """A copy of `model` with its blocks compiled as `fit` compiles them, from the same initial weights."""
    model = copy.deepcopy(model)
    options = compile_options({"backend": args.compile_backend} if args.compile_backend else True)
    compile_blocks(model, options, torch.device(args.device))
    return model


def llama_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Llama's training FLOPs per token by the rule of `lctrain.models.flops` (which counts only this
    project's families): 6 per parameter (the tied embedding once, as the head) plus 12·d_model·S per
    layer for attention over the S = seq_len keys of a row."""
    config = model.config
    return 6 * count_parameters(model) + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the FLOP/s the model's arithmetic needs at this throughput over the peak."""
    return None if peak is None else tokens_per_second * flops_per_token / peak


def autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The forward and loss context of `--dtype`: bf16 autocast over fp32 weights, or nothing in fp32."""
    if args.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.dtype])


def train_step(model, optimizer, tokens, args: argparse.Namespace) -> None:
    with autocast(args):
        logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the gradients do not outlive the step: one model's at a time


def chunked_train_step(model, optimizer, tokens, args: argparse.Namespace) -> None:
    """train_step with the loss of `fit`: hidden states only, the head and cross-entropy chunk by chunk."""
    targets = tokens[:, 1:]
    with autocast(args):
        out = model(tokens[:, :-1], return_hidden=True, return_logits=False)
        weights = token_weights(targets)
        loss = head_losses(model.output_head, out.hidden, targets, weights, chunk_size=args.loss_chunk_size).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fastest(calls: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """The smallest of `repeats` rounds of each call's own timing; the calls take turns within each round."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            best[name] = min(best[name], call())
    return best


def timed(fn: Callable[[], object], device: str) -> Callable[[], float]:
    return lambda: seconds(fn, device, 1)


def peak_training_bytes(model, tokens, args: argparse.Namespace) -> int:
    """Peak allocated bytes above the start during one forward and backward: on CUDA the caching
    allocator's peak, elsewhere torch's allocator accounting in the profiler."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # allocated before, so the peak holds activations and transients

    def step() -> None:
        with autocast(args):
            logits = model(tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        del logits
        loss.backward()

    try:
        return step_peak(step, args.device)
    finally:
        model.zero_grad(set_to_none=True)


def lswt_decoder(model, prompt, n_tokens: int, args: argparse.Namespace) -> Callable[[], float]:
    """Seconds to decode n_tokens after the prompt, from one prefilled state (immutable, so reused)."""
    with torch.inference_mode(), autocast(args):
        out = model(prompt)

    def decode():
        state, token = out.state, out.logits[:, -1:].argmax(-1)
        for _ in range(n_tokens):
            step = model(token, state=state)
            state, token = step.state, step.logits[:, -1:].argmax(-1)

    def run() -> float:
        with torch.inference_mode(), autocast(args):
            return seconds(decode, args.device, 1)

    return run


def llama_decoder(model, prompt, n_tokens: int, args: argparse.Namespace) -> Callable[[], float]:
    """The same for Llama; its cache grows in place, so each round starts from a copy (not timed)."""
    with torch.inference_mode(), autocast(args):
        out = model(prompt, use_cache=True)

    def run() -> float:
        cache = copy.deepcopy(out.past_key_values)

        def decode():
            past, token = cache, out.logits[:, -1:].argmax(-1)
            for _ in range(n_tokens):
                step = model(token, past_key_values=past, use_cache=True)
                past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)

        with torch.inference_mode(), autocast(args):
            return seconds(decode, args.device, 1)

    return run


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", help="an LSWT size (e.g. medium) that sets the shape of both models")
    parser.add_argument("--d_model", type=int, help=f"default: the size's, else {DEFAULT_SHAPE['d_model']}")
    parser.add_argument("--n_layers", type=int, help=f"default: the size's, else {DEFAULT_SHAPE['n_layers']}")
    parser.add_argument("--n_heads", type=int, help=f"default: the size's, else {DEFAULT_SHAPE['n_heads']}")
    parser.add_argument("--d_ff", type=int, help=f"default: the size's, else {DEFAULT_SHAPE['d_ff']}")
    parser.add_argument("--vocab_size", type=int, help=f"default: the size's, else {DEFAULT_SHAPE['vocab_size']}")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--register_seq_len", type=int, default=4096)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--new_tokens", type=int, default=16, help="decoded tokens per round and context")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the fastest counts")
    parser.add_argument("--loss_chunk_size", type=int, default=1024, help="tokens per chunk of the chunked loss")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16: autocast over fp32 weights")
    parser.add_argument("--compile", action="store_true", help="also measure LSWT with its blocks compiled")
    parser.add_argument("--compile_backend", help="torch.compile backend (default inductor; aot_eager for tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["training", "registers", "decoding", "eager", "full_logits"],
        help="tables to leave out; in the training table, eager: the eager LSWT rows (with --compile), "
        "full_logits: the LSWT rows that form the batch's full logits",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is visible")
    if "eager" in args.skip and not args.compile:
        parser.error("--skip eager leaves no LSWT row without --compile; add --compile or drop eager")
    size = {}
    if args.size:
        try:
            config = config_for("lswt", args.size)
        except ValueError as e:
            parser.error(f"--size: {e}")
        size = {key: getattr(config, key) for key in SHAPE}
    for key in SHAPE:
        if getattr(args, key) is None:
            setattr(args, key, size.get(key, DEFAULT_SHAPE[key]))
    return args


def training_table(args: argparse.Namespace, models: dict[str, torch.nn.Module]) -> None:
    """Tokens/s, the ratio to Llama and MFU of each model's training step, models taking turns."""
    variants = {}  # label -> (model, chunked loss)
    lswt_rows = [(NO_REGISTERS, False), (SEED, False), (SEED_CHUNKED, True)]
    if "full_logits" in args.skip:
        lswt_rows = lswt_rows[2:]
    eager_rows = [] if "eager" in args.skip else [""]
    for label, chunked in lswt_rows:
        eager = models[SEED if chunked else label]
        for suffix in eager_rows + ([COMPILED] if args.compile else []):
            model = compiled(eager, args) if suffix else copy.deepcopy(eager) if chunked else eager
            variants[label + suffix] = (model, chunked)
    variants = {LLAMA: (models[LLAMA], False), **variants}

    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=args.device)
    steps = {}
    for label, (model, chunked) in variants.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = chunked_train_step if chunked else train_step
        steps[label] = timed(lambda s=step, m=model, o=optimizer: s(m, o, tokens, args), args.device)
    fastest(steps, 1)  # warm-up, compilation included
    train = fastest(steps, args.repeats)

    peak = flops.peak_flops(args.device)
    n_tokens = args.batch_size * args.seq_len
    base = train[LLAMA]
    rows = []
    for label, t in train.items():
        model = variants[label][0]
        if label == LLAMA:
            per_token = llama_flops_per_token(model, args.seq_len)
        else:
            per_token = flops.flops_per_token("lswt", model.config, args.seq_len)
        utilisation = mfu(n_tokens / t, per_token, peak)
        shown = "-" if utilisation is None else f"{100 * utilisation:.1f}%"
        rows.append([label, f"{n_tokens / t:,.0f}", f"{base / t:.2f}", f"{per_token / 1e9:.3g}", shown])
    peak_text = "unknown peak: no MFU" if peak is None else f"MFU against {peak / 1e12:,.0f} TFLOP/s (bf16 dense)"
    print(
        f"\ntraining, batch {args.batch_size} x {args.seq_len} tokens; chunks of {args.loss_chunk_size} tokens; "
        f"{peak_text}"
    )
    print(markdown_table(["model", "tokens/s", "vs Llama", "GFLOPs/token", "MFU"], rows))


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    models = {LLAMA: llama(args), NO_REGISTERS: lswt(args), SEED: lswt(args, 16)}
    precision = "bf16 autocast, fp32 weights" if args.dtype == "bf16" else "fp32"
    timing = "; wall-clock after synchronising" if args.device.startswith("cuda") else ""  # the CPU's is said
    print(f"{describe_device(args.device, precision)}{timing}")
    print(
        f"shape: {f'LSWT {args.size}, ' if args.size else ''}d_model {args.d_model}, {args.n_layers} layers, "
        f"{args.n_heads} heads, d_ff {args.d_ff}, vocab {args.vocab_size}; parameters "
        + ", ".join(f"{n} {count_parameters(m) / 1e6:.2f}M" for n, m in models.items())
    )

    if "training" not in args.skip:
        training_table(args, models)

    if "registers" not in args.skip:
        T = args.register_seq_len
        pair = {NO_REGISTERS: lswt(args), "LSWT, 16 registers": lswt(args, 16)}
        tokens = torch.randint(0, args.vocab_size, (1, T + 1), device=args.device)
        optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in pair.items()}
        steps = {n: timed(lambda n=n: train_step(pair[n], optimizers[n], tokens, args), args.device) for n in pair}
        fastest(steps, 1)
        train = fastest(steps, args.repeats)
        peaks = {n: peak_training_bytes(m, tokens, args) for n, m in pair.items()}
        t0, p0 = train[NO_REGISTERS], peaks[NO_REGISTERS]
        rows = [
            [n, f"{T / t:,.0f}", f"{t0 / t:.2f}", f"{peaks[n] / 2**20:,.0f}", f"{peaks[n] / p0:.2f}"]
            for n, t in train.items()
        ]
        print(f"\nregisters, training step at batch 1 x {T} tokens (goal: >= 0.90x tokens/s, <= 1.10x memory)")
        print(markdown_table(["model", "tokens/s", "vs none", "peak MiB", "vs none"], rows))
        del pair, optimizers

    if "decoding" not in args.skip:
        for m in models.values():
            m.eval()
        rows = []
        for context in args.contexts:
            prompt = torch.randint(0, args.vocab_size, (1, context), device=args.device)
            calls = {
                "llama": llama_decoder(models[LLAMA], prompt, args.new_tokens, args),
                "lswt": lswt_decoder(models[SEED], prompt, args.new_tokens, args),
            }
            best = fastest(calls, args.repeats)
            ms = {k: 1e3 * v / args.new_tokens for k, v in best.items()}
            rows.append([f"{context:,}", f"{ms['llama']:.2f}", f"{ms['lswt']:.2f}", f"{ms['lswt'] / ms['llama']:.2f}"])
        print(f"\ndecoding, batch 1, {args.new_tokens} tokens after a prompt (goal: LSWT / Llama <= 1.00)")
        print(markdown_table(["context", "Llama KV cache ms/token", f"{SEED} ms/token", "LSWT / Llama"], rows))


if __name__ == "__main__":
    main()
