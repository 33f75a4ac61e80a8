"""Retrieval grids against greedy decoding, chunked against one-shot, two gloo ranks against one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from lctrain.data.tokenizer import ByteTokenizer
from lctrain.evaluation.ranks import Ranks
from lctrain.evaluation.retrieval import (
    answer_logits,
    example_hits,
    mqar_examples,
    mqar_grid,
    passkey_examples,
    passkey_grid,
)
from lctrain.evaluation.sources import LoadedModel
from lctrain.models.output import ModelOutput
from lctrain.models.sampling import generate
from lctrain.models.spec import ModelSpec

VOCAB = 257  # the byte tokenizer's
START_METHOD = "fork"  # the ranks inherit the loaded modules; spawned ones would import torch again, ~10x slower
LENGTHS, DEPTHS, EXAMPLES, SEED, DIGITS = [190, 230], [0.0, 0.5, 1.0], 2, 7, 3


class Hinted(nn.Module):
    """A model plus a hint: while the tokens read so far are a prefix of one of the `taught` sequences, the
    logits of its next token get +bias. So greedy decoding writes a taught sequence's continuation and
    nothing else. The hint rides in the hidden states, so `output_head` applied to them adds it too."""

    def __init__(self, inner: nn.Module, taught: list[list[int]], bias: float = 100.0):
        super().__init__()
        self.inner, self.taught, self.bias = inner, taught, bias

    def forward(self, input_ids, state=None, *, return_hidden=False, return_logits=True) -> ModelOutput:
        inner_state, seen = state if state is not None else (None, input_ids[:, :0])
        out = self.inner(input_ids, state=inner_state, return_hidden=True, return_logits=False)
        seen = torch.cat([seen, input_ids], dim=1)  # (B, t): every token read so far
        first = seen.shape[1] - input_ids.shape[1]  # position of input_ids[:, 0]
        hint = out.hidden.new_zeros(*input_ids.shape, VOCAB)  # (B, T, V)
        for b in range(seen.shape[0]):
            for ids in self.taught:
                ids = torch.tensor(ids)
                n = min(len(ids), seen.shape[1])
                differ = (seen[b, :n] != ids[:n]).nonzero()
                common = int(differ[0]) if len(differ) else n  # seen[b, :common] == ids[:common]
                stop = max(first, min(common, len(ids) - 1))
                read = torch.arange(first, stop)  # positions p of this call whose next token ids[p + 1] is taught
                hint[b, read - first, ids[read + 1]] = self.bias
        hidden = torch.cat([out.hidden, hint], dim=-1)
        logits = self.output_head(hidden) if return_logits else None
        return ModelOutput(logits, (out.state, seen), {}, hidden if return_hidden else None)

    def output_head(self, hidden: Tensor) -> Tensor:
        return self.inner.output_head(hidden[..., :-VOCAB]) + hidden[..., -VOCAB:]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    sizes = {"vocab_size": VOCAB, "d_vocab": 32, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64}
    return ModelSpec("lswt", "debug", sizes).build().double().eval()


def loaded(model: nn.Module) -> LoadedModel:
    return LoadedModel("tiny", model, ByteTokenizer(), "lswt", 0, None, None)


def taught_passkeys(length: int) -> list[list[int]]:
    """Examples 0 and 3 taught right; example 1 taught with its key's last digit wrong; the others not at all."""
    cases = passkey_examples(ByteTokenizer(), length, DEPTHS, EXAMPLES, SEED, DIGITS)
    wrong = list(cases[1][0])
    wrong[-1] = ord("0") + (wrong[-1] - ord("0") + 1) % 10
    return [cases[0][0], cases[3][0], wrong]


def hinted_model() -> nn.Module:
    return Hinted(tiny_model(), [ids for length in LENGTHS for ids in taught_passkeys(length)])


def greedy_answer_right(model: nn.Module, ids: list[int], marks: list[int]) -> int:
    """Greedy decoding from the tokens before the answer writes the answer exactly: 1, else 0."""
    start = marks.index(1)
    prompt = torch.tensor([ids[:start]])
    written = [int(t) for t in generate(model, prompt, len(ids) - start, temperature=0)]
    return int(written == ids[start:])


def test_passkey_hits_are_those_of_greedy_decoding():
    model = hinted_model()
    for length in LENGTHS:
        cases = passkey_examples(ByteTokenizer(), length, DEPTHS, EXAMPLES, SEED, DIGITS)
        assert all(len(ids) == length - 1 for ids, _ in cases)  # the end-of-text id makes L
        hits = example_hits(loaded(model), cases, batch_size=4, chunk_len=50)
        expected = [greedy_answer_right(model, ids, marks) for ids, marks in cases]
        assert hits.tolist() == expected
        assert expected == [1, 0, 0, 1, 0, 0]  # taught right, taught one digit wrong, untaught

    grid = passkey_grid(loaded(model), LENGTHS, DEPTHS, EXAMPLES, SEED, DIGITS, batch_size=4, chunk_len=50)
    assert (grid.task, grid.row_name, grid.rows, grid.columns, grid.examples) == (
        "passkey", "length", LENGTHS, DEPTHS, EXAMPLES
    )  # fmt: skip
    # example i has depth i % 3: cell (L, d) = mean of examples d and d + 3
    assert grid.accuracy == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


def test_mqar_hits_are_those_of_greedy_decoding_per_query():
    cases = mqar_examples(ByteTokenizer(), 6, 3, SEED)
    ids, marks = cases[0]
    assert len(ids) == 4 * 6 + 1 and sum(marks) == 6
    taught = list(ids)
    taught[-3] = taught[-3] + 1 if taught[-3] < 33 + 63 else 33 + 32  # query 5's value taught wrong
    model = Hinted(tiny_model(), [taught])
    hits = example_hits(loaded(model), cases, per_token=True, batch_size=2, chunk_len=5)
    assert hits.shape == (3, 6)
    right, asked = [0, 0, 0], [0, 0, 0]  # per column: 3 bins of 2 pairs each
    for (ids, marks), row in zip(cases, hits.tolist()):
        answers = [p for p, m in enumerate(marks) if m]
        expected = [
            int(next(generate(model, torch.tensor([ids[:p]]), 1, temperature=0)).item() == ids[p]) for p in answers
        ]
        assert row == expected
        keys = ids[0:12:2]
        for p, hit in zip(answers, expected):
            column = keys.index(ids[p - 1]) * 3 // 6  # the asked pair's index among the 6, in thirds
            right[column] += hit
            asked[column] += 1
    assert hits[0].tolist() == [1, 1, 1, 1, 0, 0]  # the hint stops where the taught value differs
    assert hits[1:].sum() == 0
    assert asked == [6, 6, 6]

    grid = mqar_grid(loaded(model), [6], examples=3, seed=SEED, bins=3, batch_size=2)
    assert grid.accuracy == [[r / a for r, a in zip(right, asked)]]
    assert (grid.rows, grid.columns) == ([6], [0.0, 1 / 3, 2 / 3])


def test_chunked_equals_one_shot():
    model = tiny_model()
    cases = passkey_examples(ByteTokenizer(), 230, DEPTHS, 1, SEED, DIGITS)
    ids = torch.tensor([e[0] for e in cases])
    answers = torch.tensor([e[1] for e in cases], dtype=torch.bool)[:, 1:]
    answers[:, 100] = True  # an answer position far from the end, inside the chunk where scoring starts
    whole = answer_logits(model, ids[:, :-1], answers, None)
    chunked = answer_logits(model, ids[:, :-1], answers, 17)
    assert whole.shape == (answers.sum(), VOCAB)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-10)
    direct = model(ids[:, :-1]).logits[answers]  # the full logits at the marked positions
    torch.testing.assert_close(whole, direct, rtol=0, atol=1e-10)

    hinted = hinted_model()
    one_shot = passkey_grid(loaded(hinted), LENGTHS, DEPTHS, EXAMPLES, SEED, DIGITS, chunk_len=None)
    assert passkey_grid(loaded(hinted), LENGTHS, DEPTHS, EXAMPLES, SEED, DIGITS, chunk_len=23) == one_shot


def test_too_short_a_length_names_the_option():
    with pytest.raises(ValueError, match=r"--retrieval\.lengths.*at least 1\d\d") as error:
        passkey_grid(loaded(tiny_model()), [64, 256], DEPTHS, EXAMPLES, SEED, DIGITS)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="depths"):
        passkey_grid(loaded(tiny_model()), [256], [1.5], EXAMPLES, SEED, DIGITS)


def test_progress_counts_the_tokens_run():
    told = []
    passkey_grid(loaded(tiny_model()), [200], [0.0, 1.0], 3, SEED, DIGITS, batch_size=4, progress=told.append)
    assert told == [4 * 198, 2 * 198]  # 6 examples of 199 ids, inputs without the last


def grids_on_rank(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ranks = Ranks(rank, world)
        model = loaded(hinted_model())
        # 3 depths x 2 examples = 6 examples on 2 ranks; batch_size 2 so ranks run several batches
        passkey = passkey_grid(model, LENGTHS, DEPTHS, EXAMPLES, SEED, DIGITS, ranks, batch_size=2, chunk_len=64)
        hits = example_hits(model, passkey_examples(ByteTokenizer(), 190, DEPTHS, 1, SEED, DIGITS), ranks=ranks)
        mqar = mqar_grid(model, [4, 6], examples=3, seed=SEED, bins=2, ranks=ranks, batch_size=1)  # 3 on 2 ranks
        if rank == 0:
            torch.save({"passkey": passkey, "hits": hits, "mqar": mqar}, out_file)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one(tmp_path):
    args = (2, str(tmp_path / "init"), str(tmp_path / "two.pt"))
    mp.start_processes(grids_on_rank, args=args, nprocs=2, join=True, start_method=START_METHOD)
    two = torch.load(tmp_path / "two.pt", weights_only=False)

    model = loaded(hinted_model())
    assert two["passkey"] == passkey_grid(model, LENGTHS, DEPTHS, EXAMPLES, SEED, DIGITS)
    assert two["passkey"].accuracy == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]  # rank 1's examples count too
    one_hits = example_hits(model, passkey_examples(ByteTokenizer(), 190, DEPTHS, 1, SEED, DIGITS))
    assert torch.equal(two["hits"], one_hits)
    assert two["mqar"] == mqar_grid(model, [4, 6], examples=3, seed=SEED, bins=2)
