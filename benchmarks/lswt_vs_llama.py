"""LSWT against Hugging Face transformers' LlamaForCausalLM at equal shape: training and decoding speed.

Both models get the same width, depth, heads, SwiGLU width, vocabulary, tied embeddings and sequence
length (LSWT's d_vocab = d_model, so its embedding matches Llama's; it still has its two projections,
LayerNorms and biases). Three tables:

- training tokens/s (forward + cross-entropy + backward + AdamW step) of Llama, LSWT without registers
  and LSWT in the seed's configuration (16 registers, reversed RoPE, input/output projections), the last
  also with the loss as training computes it: the output head and cross-entropy in chunks of
  `--loss_chunk_size` tokens (`head_losses`), never the batch's full logits;
- registers at a long sequence (`--register_seq_len`, batch 1): tokens/s and peak allocated memory of a
  training step with 16 registers against none (goal: >= 0.9x the throughput, <= 1.1x the memory);
- decoding ms/token at batch 1 after a prompt of each `--contexts` length: LSWT (seed configuration) with
  its state against Llama with its KV cache (goal: LSWT <= Llama at every context). Prefill is not timed.

Models take turns within each round and the fastest of `--repeats` rounds counts, so a busy machine slows
each alike; times are this process's CPU time (common.seconds). Run from the repository root:

    python -m benchmarks.lswt_vs_llama [--threads 1] [--d_model 256 --seq_len 512 ...]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, peak_above_start, seconds
from lctrain.models import build_model, count_parameters
from lctrain.training.losses import head_losses, token_weights

SEED = "LSWT seed configuration (16 registers, reversed RoPE, projections)"
SEED_CHUNKED = "the same, chunked loss (as `fit` trains)"


def lswt(args: argparse.Namespace, n_registers: int = 0) -> torch.nn.Module:
    return build_model(
        "lswt", "debug", vocab_size=args.vocab_size, d_vocab=args.d_model, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.d_ff, rope_base=500000.0, rope_reversed=True,
        n_registers=n_registers,
    )  # fmt: skip


def llama(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    longest = max([args.seq_len, args.register_seq_len, *args.contexts]) + args.new_tokens + 1
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=args.d_ff,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
        max_position_embeddings=longest, rope_theta=500000.0, tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)


def train_step(model, optimizer, tokens) -> None:
    logits = model(tokens[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def chunked_train_step(model, optimizer, tokens, chunk_size: int) -> None:
    """train_step with the loss of `fit`: hidden states only, the head and cross-entropy chunk by chunk."""
    targets = tokens[:, 1:]
    out = model(tokens[:, :-1], return_hidden=True, return_logits=False)
    loss = head_losses(model.output_head, out.hidden, targets, token_weights(targets), chunk_size=chunk_size).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def fastest(calls: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """The smallest of `repeats` rounds of each call's own timing; the calls take turns within each round."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            best[name] = min(best[name], call())
    return best


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    return lambda: seconds(fn, "cpu", 1)


def peak_training_bytes(model, tokens) -> int:
    """Peak allocated bytes above the start during one forward and backward (torch's allocator accounting)."""
    from torch.profiler import ProfilerActivity, profile

    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # allocated before, so the peak holds activations and transients
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits = model(tokens[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        del logits
    return peak_above_start(prof)


@torch.inference_mode()
def lswt_decoder(model, prompt, n_tokens: int) -> Callable[[], float]:
    """Seconds to decode n_tokens after the prompt, from one prefilled state (immutable, so reused)."""
    out = model(prompt)

    def run() -> float:
        def decode():
            state, token = out.state, out.logits[:, -1:].argmax(-1)
            for _ in range(n_tokens):
                step = model(token, state=state)
                state, token = step.state, step.logits[:, -1:].argmax(-1)

        with torch.inference_mode():
            return seconds(decode, "cpu", 1)

    return run


@torch.inference_mode()
def llama_decoder(model, prompt, n_tokens: int) -> Callable[[], float]:
    """The same for Llama; its cache grows in place, so each round starts from a copy (not timed)."""
    out = model(prompt, use_cache=True)

    def run() -> float:
        cache = copy.deepcopy(out.past_key_values)

        def decode():
            past, token = cache, out.logits[:, -1:].argmax(-1)
            for _ in range(n_tokens):
                step = model(token, past_key_values=past, use_cache=True)
                past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)

        with torch.inference_mode():
            return seconds(decode, "cpu", 1)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--d_ff", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--register_seq_len", type=int, default=4096)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--new_tokens", type=int, default=16, help="decoded tokens per round and context")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the fastest counts")
    parser.add_argument("--loss_chunk_size", type=int, default=1024, help="tokens per chunk of the chunked loss")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["training", "registers", "decoding"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    models = {"transformers LlamaForCausalLM": llama(args), "LSWT, no registers": lswt(args), SEED: lswt(args, 16)}
    print(f"CPU, {torch.get_num_threads()} thread(s), process CPU time; torch {torch.__version__}")
    print(
        f"shape: d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, d_ff {args.d_ff}, "
        f"vocab {args.vocab_size}; parameters "
        + ", ".join(f"{n} {count_parameters(m) / 1e6:.2f}M" for n, m in models.items())
    )

    if "training" not in args.skip:
        tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1))
        chunked = copy.deepcopy(models[SEED])
        optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
        optimizers[SEED_CHUNKED] = torch.optim.AdamW(chunked.parameters(), lr=1e-4)
        steps = {n: timed(lambda n=n: train_step(models[n], optimizers[n], tokens)) for n in models}
        steps[SEED_CHUNKED] = timed(
            lambda: chunked_train_step(chunked, optimizers[SEED_CHUNKED], tokens, args.loss_chunk_size)
        )
        fastest(steps, 1)  # warm-up
        train = fastest(steps, args.repeats)
        n_tokens = args.batch_size * args.seq_len
        base = train["transformers LlamaForCausalLM"]
        rows = [[n, f"{n_tokens / t:,.0f}", f"{base / t:.2f}"] for n, t in train.items()]
        print(f"\ntraining, batch {args.batch_size} x {args.seq_len} tokens; chunks of {args.loss_chunk_size} tokens")
        print(markdown_table(["model", "tokens/s", "vs Llama"], rows))

    if "registers" not in args.skip:
        T = args.register_seq_len
        pair = {"LSWT, no registers": lswt(args), "LSWT, 16 registers": lswt(args, 16)}
        tokens = torch.randint(0, args.vocab_size, (1, T + 1))
        optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in pair.items()}
        steps = {n: timed(lambda n=n: train_step(pair[n], optimizers[n], tokens)) for n in pair}
        fastest(steps, 1)
        train = fastest(steps, args.repeats)
        peaks = {n: peak_training_bytes(m, tokens) for n, m in pair.items()}
        t0, p0 = train["LSWT, no registers"], peaks["LSWT, no registers"]
        rows = [
            [n, f"{T / t:,.0f}", f"{t0 / t:.2f}", f"{peaks[n] / 2**20:,.0f}", f"{peaks[n] / p0:.2f}"]
            for n, t in train.items()
        ]
        print(f"\nregisters, training step at batch 1 x {T} tokens (goal: >= 0.90x tokens/s, <= 1.10x memory)")
        print(markdown_table(["model", "tokens/s", "vs none", "peak MiB", "vs none"], rows))

    if "decoding" not in args.skip:
        for m in models.values():
            m.eval()
        rows = []
        for context in args.contexts:
            prompt = torch.randint(0, args.vocab_size, (1, context))
            calls = {
                "llama": llama_decoder(models["transformers LlamaForCausalLM"], prompt, args.new_tokens),
                "lswt": lswt_decoder(models[SEED], prompt, args.new_tokens),
            }
            best = fastest(calls, args.repeats)
            ms = {k: 1e3 * v / args.new_tokens for k, v in best.items()}
            rows.append([f"{context:,}", f"{ms['llama']:.2f}", f"{ms['lswt']:.2f}", f"{ms['lswt'] / ms['llama']:.2f}"])
        print(f"\ndecoding, batch 1, {args.new_tokens} tokens after a prompt (goal: LSWT / Llama <= 1.00)")
        print(markdown_table(["context", "Llama KV cache ms/token", f"{SEED} ms/token", "LSWT / Llama"], rows))


if __name__ == "__main__":
    main()
