"""LSWT against Hugging Face transformers' LlamaForCausalLM at equal shape: training and decoding tokens/s.

Both models get the same width, depth, heads, SwiGLU width, vocabulary, tied embeddings and sequence
length (LSWT's d_vocab = d_model, so its embedding matches Llama's; it still has its two projections,
LayerNorms and biases). Training: forward + cross-entropy + backward + AdamW step. Decoding, batch 1:
LSWT with its KV state, LSWT re-running the whole prefix for every token (the baseline), and Llama
with its own KV cache. Models take turns and the fastest of `--repeats` rounds counts, so a busy
machine slows each alike. Run from the repository root:

    python -m benchmarks.lswt_vs_llama [--device cuda --dtype bfloat16] [--d_model 256 --seq_len 512 ...]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lctrain.models import build_model, count_parameters


def lswt(args: argparse.Namespace, n_registers: int = 0) -> torch.nn.Module:
    return build_model(
        "lswt", "debug", vocab_size=args.vocab_size, d_vocab=args.d_model, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.d_ff, rope_base=500000.0, n_registers=n_registers,
    )  # fmt: skip


def llama(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=args.d_ff,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
        max_position_embeddings=args.seq_len + args.new_tokens + args.prompt_len, rope_theta=500000.0,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(args: argparse.Namespace):
    dtype = getattr(torch, args.dtype)
    return torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32)


def train_step(args, model, optimizer, tokens) -> None:
    with autocast(args):
        logits = logits_of(model, tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.inference_mode()
def decode_with_state(args, model, prompt) -> None:
    with autocast(args):
        out = model(prompt)
        for _ in range(args.new_tokens):
            out = model(out.logits[:, -1:].argmax(-1), state=out.state)


@torch.inference_mode()
def decode_rerunning_the_prefix(args, model, prompt) -> None:
    ids = prompt
    with autocast(args):
        for _ in range(args.new_tokens + 1):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)  # (1, P + i + 1)


@torch.inference_mode()
def decode_llama_cache(args, model, prompt) -> None:
    with autocast(args):
        out = model(prompt, use_cache=True)
        for _ in range(args.new_tokens):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)


def fastest(calls: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Seconds of the fastest of `repeats` rounds per call; the calls take turns within each round."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def table(title: str, rows: list[tuple[str, float]], unit: str) -> str:
    base = rows[0][1]
    lines = [f"| {title} | {unit} | ratio |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:,.0f} | {value / base:.2f} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--d_ff", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    models = {
        "transformers LlamaForCausalLM": llama(args),
        "LSWT": lswt(args),
        "LSWT, 16 registers": lswt(args, n_registers=16),
    }
    models = {name: m.to(device).train() for name, m in models.items()}
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    steps = {name: (lambda n=name: train_step(args, models[n], optimizers[n], tokens)) for name in models}
    fastest(steps, 1, device)  # warm-up
    train = fastest(steps, args.repeats, device)
    n_tokens = args.batch_size * args.seq_len

    for m in models.values():
        m.eval()
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_len), device=device)
    decode_calls = {
        "LSWT, re-running the prefix": lambda: decode_rerunning_the_prefix(args, models["LSWT"], prompt),
        "LSWT with its state": lambda: decode_with_state(args, models["LSWT"], prompt),
        "Llama with its KV cache": lambda: decode_llama_cache(args, models["transformers LlamaForCausalLM"], prompt),
    }
    fastest(decode_calls, 1, device)
    decode = fastest(decode_calls, max(2, args.repeats // 2), device)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; dtype {args.dtype}; torch {torch.__version__}")
    print(
        f"shape: d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, d_ff {args.d_ff}, "
        f"vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len} tokens; parameters "
        + ", ".join(f"{n} {count_parameters(m) / 1e6:.2f}M" for n, m in models.items())
    )
    print()
    print(table("training", [(n, n_tokens / t) for n, t in train.items()], "tokens/s"))
    print()
    print(f"decoding {args.new_tokens} tokens after a {args.prompt_len}-token prompt, batch 1 (prefill included):")
    print(table("decoding", [(n, args.new_tokens / t) for n, t in decode.items()], "tokens/s"))


if __name__ == "__main__":
    main()
