"""benchmarks/lswt_vs_llama.py at a tiny shape on the CPU: the compiled LSWT rows beside eager Llama, the
MFU column against a hand computation of 6N + attention FLOPs, and the options that set the shape."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import lswt_vs_llama as bench
from lctrain.models import count_parameters, flops
from lctrain.training.module import compile_blocks as lctrain_compile_blocks

D, L, H, F, V, T, B = 32, 2, 2, 64, 64, 16, 2
TINY = f"--d_model {D} --n_layers {L} --n_heads {H} --d_ff {F} --vocab_size {V} --seq_len {T} --batch_size {B}"
TINY += " --repeats 1 --contexts 8 --new_tokens 2 --register_seq_len 32"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def training_rows(output: str) -> dict[str, list[str]]:
    """The training table's rows by model label (the table between its heading and the next blank line)."""
    table = output.split("\ntraining, ", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[1] == "| model | tokens/s | vs Llama | GFLOPs/token | MFU |"
    return {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in table[3:])}


def test_compiled_lswt_rows_beside_eager_llama(capsys, monkeypatch):
    compiled_with = []

    def compile_blocks(model, options, device):
        compiled_with.append(options)
        return lctrain_compile_blocks(model, options, device)

    monkeypatch.setattr(bench, "compile_blocks", compile_blocks)
    bench.main([*TINY.split(), "--dtype", "bf16", "--compile", "--compile_backend", "aot_eager"])
    output = capsys.readouterr().out
    assert output.startswith("CPU, 1 thread(s), process CPU time (bf16 autocast, fp32 weights")
    rows = training_rows(output)
    compiled = [label for label in rows if label.endswith(", compiled")]
    assert compiled == [bench.NO_REGISTERS + ", compiled", bench.SEED + ", compiled", bench.SEED_CHUNKED + ", compiled"]
    assert list(rows)[0] == bench.LLAMA and rows[bench.LLAMA][1] == "1.00"
    assert len(rows) == 7  # Llama, and each LSWT row eager and compiled
    for label, (tokens_per_s, ratio, _, utilisation) in rows.items():
        assert float(tokens_per_s.replace(",", "")) > 0 and float(ratio) > 0, label
        assert utilisation == "-", label  # no known peak on a CPU
    assert compiled_with == [{"backend": "aot_eager"}] * 3  # each compiled row's blocks, as `fit` compiles them
    assert "| LSWT, 16 registers |" in output  # the registers table
    assert "| 8 |" in output  # the decoding table's one context


def test_mfu_is_tokens_per_second_times_flops_per_token_over_the_peak(capsys, monkeypatch):
    peak = 1e9
    monkeypatch.setattr(flops, "peak_flops", lambda device: peak)
    bench.main([*TINY.split(), "--skip", "registers", "decoding"])
    rows = training_rows(capsys.readouterr().out)

    # FLOPs per token by hand: 6 per parameter (registers aside) + 12 d_model S per layer over S keys.
    shape = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H)
    llama = LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=H, tie_word_embeddings=True))
    n_llama = sum(p.numel() for p in {id(p): p for p in llama.parameters()}.values())
    n_seed = count_parameters(bench.lswt(bench.parse_arguments(TINY.split()), 16))
    registers = L * 2 * 16 * D  # 16 keys and 16 values of width d_model per layer
    expected = {
        bench.LLAMA: 6 * n_llama + 12 * L * D * T,
        bench.SEED: 6 * (n_seed - registers) + 12 * L * D * (T + 16),
        bench.SEED_CHUNKED: 6 * (n_seed - registers) + 12 * L * D * (T + 16),
    }
    for label, per_token in expected.items():
        tokens_per_s, _, gflops, utilisation = rows[label]
        assert float(gflops) == pytest.approx(per_token / 1e9, rel=5e-3), label
        hand = float(tokens_per_s.replace(",", "")) * per_token / peak  # tokens/s printed whole: rel < 1e-3
        assert float(utilisation.rstrip("%")) / 100 == pytest.approx(hand, rel=2e-3), label
    assert rows[bench.NO_REGISTERS][3].endswith("%")


def test_mfu_function():
    assert bench.mfu(2000.0, 3e9, 1e13) == pytest.approx(0.6)
    assert bench.mfu(2000.0, 3e9, None) is None


def test_a_size_sets_the_shape_and_explicit_values_win():
    args = bench.parse_arguments(["--size", "medium"])
    assert (args.d_model, args.n_layers, args.n_heads, args.d_ff, args.vocab_size) == (1536, 24, 24, 6144, 50272)
    args = bench.parse_arguments(["--size", "medium", "--vocab_size", "1000"])
    assert (args.d_model, args.vocab_size) == (1536, 1000)
    args = bench.parse_arguments([])
    assert (args.d_model, args.n_layers, args.vocab_size) == (256, 4, 8192)


@pytest.mark.parametrize(
    "argv, message",
    [(["--size", "huge"], "--size: unknown size 'huge'"), (["--skip", "eager"], "--skip eager leaves no LSWT row")],
)
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_arguments(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
