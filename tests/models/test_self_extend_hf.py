"""SelfExtend on Hugging Face models (lctrain.self_extend): tiny random-weight Llama, Mistral and Qwen2 with grouped
KV heads, saved to a temporary directory and loaded with `from_pretrained` (nothing is downloaded).

With the window covering the input the logits are the unpatched model's; with a smaller one they are what the
float64 reference (tests/reference/self_extend.py) gives at the same positions, left padding included;
`generate()` (prefill, then decoding from the cache) equals a greedy loop of full forwards; `remove` restores
the model. The platform's own exported models switch their built-in SelfExtend; `python -m platform.generate
--hf_model` streams what `generate()` gives.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lctrain import self_extend
from lctrain.entry import run_entry_point
from lctrain.inference.generation import generate_cli
from tests.reference.self_extend import self_extend_reference

VOCAB = 128
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: two query heads per key head
    vocab_size=VOCAB,
    rope_theta=10000.0,
    # Large weights make attention sharp, so that moving a key's position changes the logits visibly.
    initializer_range=0.2,
    bos_token_id=None,
    eos_token_id=None,  # no token ends generation: every run produces all its tokens
    pad_token_id=0,
)
FAMILIES = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {}),  # the default 4096-token sliding window, longer than every input here
    "qwen2": (Qwen2Config, {}),
}
G, W = 3, 5  # G does not divide W; inputs are several windows long


@pytest.fixture(scope="module", params=list(FAMILIES))
def model_dir(request, tmp_path_factory):
    """A tiny random model of the family, saved and ready to load from a local directory."""
    config_class, extra = FAMILIES[request.param]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_class(**SHAPE, **extra))
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return directory


def load(directory, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths, padded on the left with id 0: ids and attention mask (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :], mask[b, width - len(row) :] = row, 1
    return ids, mask


def attention_layers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj")]


def reference_attention(layer, hidden_states, pads, group_size: int, window_size: int, base: float):
    """One attention layer by the plain-loop reference: the layer's own projections, then
    `self_extend_reference` over the un-rotated q, k, v and each row's pads."""
    B, T, _ = hidden_states.shape
    Dh = layer.head_dim
    q = layer.q_proj(hidden_states).view(B, T, -1, Dh).transpose(1, 2)  # (B, H, T, Dh)
    k = layer.k_proj(hidden_states).view(B, T, -1, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
    v = layer.v_proj(hidden_states).view(B, T, -1, Dh).transpose(1, 2)
    y = self_extend_reference(q, k, v, group_size=group_size, window_size=window_size, rope_base=base, pads=pads)
    return layer.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


def reference_logits(model, ids, mask, group_size: int, window_size: int) -> torch.Tensor:
    """The model's logits in float64 with every attention layer computed by `reference_attention`."""
    model = copy.deepcopy(model).double()
    pads = (mask == 0).sum(dim=1).tolist()
    base = model.config.rope_parameters["rope_theta"]
    for layer in attention_layers(model):
        layer.forward = lambda hidden_states, *args, layer=layer, **kwargs: (
            reference_attention(layer, hidden_states, pads, group_size, window_size, base),
            None,
        )
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def greedy_loop(model, ids, mask, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """n greedy tokens, each from a full forward over everything so far (no cache): tokens and logits."""
    logits_seen = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]  # (B, V)
            logits_seen.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, logits_seen


def test_a_window_covering_the_input_leaves_the_logits_unchanged(model_dir):
    model = load(model_dir)
    ids = tokens(2, 24)
    with torch.no_grad():
        plain = model(ids).logits
        self_extend.apply(model, group_size=4, window_size=24)
        patched = model(ids).logits
    assert (patched - plain).abs().max().item() < 1e-5


def test_a_smaller_window_equals_the_float64_reference_with_left_padding(model_dir):
    model = load(model_dir, torch.float64)
    ids, mask = left_padded([tokens(1, 23)[0], tokens(1, 16, seed=2)[0]])
    expected = reference_logits(model, ids, mask, G, W)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        self_extend.apply(model, group_size=G, window_size=W)
        patched = model(ids, attention_mask=mask).logits
    real = mask.bool()
    # Llama-family RMSNorm normalises in float32 even in a float64 model, hence 1e-6 and not 1e-12 ...
    assert (patched - expected)[real].abs().max().item() < 1e-6
    assert (plain - expected)[real].abs().max().item() > 1e-2  # SelfExtend changed what the model computes
    # ... which one attention layer, on its own, meets.
    layer = attention_layers(model)[0]
    x = torch.randn(2, 23, SHAPE["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = layer(x, position_embeddings=None, attention_mask=None)[0]
        want = reference_attention(layer, x, [0, 0], G, W, SHAPE["rope_theta"])
    assert (got - want).abs().max().item() < 1e-12


def test_generate_equals_a_greedy_loop_of_full_forwards(model_dir):
    model = load(model_dir, torch.float64)
    self_extend.apply(model, group_size=G, window_size=W)
    ids, mask = left_padded([tokens(1, 17)[0], tokens(1, 9, seed=2)[0]])
    n = 12  # decoding crosses several groups past the window
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected, expected_logits = greedy_loop(model, ids, mask, n)
    assert torch.equal(out.sequences, expected)
    for got, want in zip(out.logits, expected_logits):
        assert (got - want).abs().max().item() < 1e-6  # float64, but RMSNorm normalises in float32


def test_each_row_of_a_left_padded_batch_is_what_it_would_be_alone(model_dir):
    model = self_extend.apply(load(model_dir), group_size=G, window_size=W)
    rows = [tokens(1, 19)[0], tokens(1, 8, seed=3)[0]]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for b, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            assert (batch[b, ids.shape[1] - len(row) :] - alone).abs().max().item() < 1e-5
            alone_generated = model.generate(row[None], attention_mask=torch.ones_like(row[None]), max_new_tokens=6)
            assert torch.equal(generated[b, ids.shape[1] :], alone_generated[0, len(row) :])


def test_remove_restores_the_model(model_dir):
    model = load(model_dir)
    ids = tokens(1, 20)
    with torch.no_grad():
        plain = model(ids).logits
        self_extend.apply(model, group_size=G, window_size=W)
        assert not torch.allclose(model(ids).logits, plain)
        self_extend.apply(model, group_size=2, window_size=4)  # applying again replaces the settings
        self_extend.remove(model)
        assert torch.equal(model(ids).logits, plain)
    assert not self_extend.is_applied(model)
    assert not any("forward" in vars(m) for m in model.modules())
    assert not model.base_model._forward_pre_hooks


def test_a_sliding_window_is_off_while_applied(tmp_path):
    """Mistral's window of 8 would hide the keys SelfExtend groups (and a windowed cache would drop them):
    the patched model sees the whole context, in `generate()` too, and `remove` puts the window back."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(MistralConfig(**SHAPE, sliding_window=8)).save_pretrained(tmp_path)
    model = load(tmp_path)
    ids, mask = tokens(1, 20), torch.ones(1, 20, dtype=torch.long)
    with torch.no_grad():
        windowed = model(ids).logits
        self_extend.apply(model, group_size=4, window_size=32)
        assert model.config.sliding_window is None
        full = model(ids).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        expected, _ = greedy_loop(model, ids, mask, 8)
        self_extend.remove(model)
    unwindowed = load(tmp_path)
    unwindowed.config.sliding_window = None
    with torch.no_grad():
        assert (full - unwindowed(ids).logits).abs().max().item() < 1e-5
    assert (full - windowed).abs().max().item() > 1e-3
    assert torch.equal(generated, expected)
    assert model.config.sliding_window == 8


def test_rope_scaling_and_unknown_models_are_refused(tmp_path):
    scaled = AutoModelForCausalLM.from_config(
        LlamaConfig(**{**SHAPE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    )
    with pytest.raises(ValueError, match="SelfExtend needs plain RoPE, but this llama model uses rope_type='linear'"):
        self_extend.apply(scaled, group_size=G, window_size=W)
    with pytest.raises(ValueError, match="does not know the attention of Linear"):
        self_extend.apply(torch.nn.Linear(2, 2), group_size=G, window_size=W)


# --- the platform's exported models -----------------------------------------------------------------------------


def test_an_exported_lswt_model_switches_its_own_self_extend(tmp_path):
    from lctrain.hf import write_hf
    from lctrain.models.spec import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec("lswt", "debug", {"vocab_size": 257, "rope_reversed": False})
    platform_model = spec.build().eval()
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in platform_model.state_dict().items()},
        "model_spec": spec.to_dict(),
        "tokenizer": {"kind": "bytes"},
    }
    write_hf(checkpoint, tmp_path / "hf")
    model = load(tmp_path / "hf")
    extended = spec.replace(self_extend={"group_size": G, "window_size": W}).build().eval()
    extended.load_state_dict(platform_model.state_dict())
    ids = torch.randint(0, 257, (1, 21))
    with torch.no_grad():
        plain = model(ids).logits
        self_extend.apply(model, group_size=G, window_size=W)
        assert (model(ids).logits - extended(ids).logits).abs().max().item() < 1e-5
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        expected, _ = greedy_loop(model, ids, torch.ones_like(ids), 6)
        assert torch.equal(generated, expected)
        self_extend.remove(model)
        assert torch.equal(model(ids).logits, plain)


# --- python -m platform.generate --hf_model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer (w0 ... w125 and an end-of-text token) in one directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory = tmp_path_factory.mktemp("llama-tok")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>").save_pretrained(directory)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE)).save_pretrained(directory)
    return directory


def test_the_generate_command_streams_what_generate_gives_with_self_extend(llama_with_tokenizer, capsys):
    prompt = " ".join(f"w{(7 * i) % 120}" for i in range(20))
    args = ["--hf_model", str(llama_with_tokenizer), "--prompt", prompt, "--temperature", "0"]
    args += ["--max_new_tokens", "10", "--self_extend.group_size", str(G), "--self_extend.window_size", str(W)]
    assert run_entry_point(generate_cli, args) == 0
    printed = capsys.readouterr().out

    tokenizer = PreTrainedTokenizerFast.from_pretrained(llama_with_tokenizer)
    model = self_extend.apply(load(llama_with_tokenizer), group_size=G, window_size=W)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    assert len(new) > 0
    assert printed == prompt + " " + tokenizer.decode(new) + "\n"  # the word-level decoder joins words with spaces


@pytest.mark.parametrize(
    "case, message",
    [
        ("both models", "give one model: --checkpoint"),
        ("no model", "give one model: --checkpoint"),
        ("not a model directory", "no config.json there"),
    ],
)
def test_the_generate_command_refuses_a_wrong_model_in_one_line(case, message, tmp_path, capsys):
    args = ["--prompt", "w1 w2"]
    if case == "both models":
        args += ["--checkpoint", str(tmp_path), "--hf_model", str(tmp_path)]
    elif case == "not a model directory":
        args += ["--hf_model", str(tmp_path)]
    assert run_entry_point(generate_cli, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
