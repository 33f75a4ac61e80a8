"""Warm-start embeddings from a local Hugging Face directory: a tiny OPT model and tokenizer that the
tests create and save themselves (never a download) (docs/architectures.md)."""

from __future__ import annotations

import pytest
import torch

from lctrain.data.tokenizer import load_tokenizer, tokenizer_from_path
from lctrain.models import build_model
from lctrain.training.module import LanguageModelModule
from lctrain.training.warm_start import read_input_embeddings, warm_start_embeddings

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door " * 4


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    """A 1-layer OPT with a 16-wide embedding of rank 6, and a byte-level BPE tokenizer, saved locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("hf") / "tiny-opt"
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.train_from_iterator([TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(path)
    vocab = len(tokenizer)
    config = OPTConfig(
        vocab_size=vocab, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=1, ffn_dim=32,
        num_attention_heads=2, max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = OPTForCausalLM(config)
    with torch.no_grad():  # rank 6, so a projection to 6 or more columns keeps every inner product
        model.get_input_embeddings().weight.copy_(torch.randn(vocab, 6) @ torch.randn(6, 16) * 0.1)
    model.save_pretrained(path)
    return path, model.get_input_embeddings().weight.detach().clone()


def lswt(vocab, d_vocab):
    torch.manual_seed(0)
    return build_model("lswt", "debug", vocab_size=vocab, d_vocab=d_vocab)


def test_warm_start_loads_exactly_the_saved_matrix(opt_dir):
    path, saved = opt_dir
    torch.testing.assert_close(read_input_embeddings(path), saved, rtol=0, atol=0)
    model = lswt(*saved.shape)
    warm_start_embeddings(model, str(path))
    assert torch.equal(model.embed.weight.detach(), saved)
    ids = torch.tensor([[3, 4, 5]])
    hidden = model(ids, return_hidden=True).hidden
    torch.testing.assert_close(model(ids).logits, model.output_proj(hidden) @ saved.T)  # tied: the output side too


def test_a_larger_vocabulary_keeps_its_extra_rows_and_a_narrower_width_keeps_inner_products(opt_dir):
    path, saved = opt_dir
    V = saved.shape[0]
    model = lswt(V + 5, 8)
    extra = model.embed.weight.detach()[V:].clone()
    warm_start_embeddings(model, str(path))
    loaded = model.embed.weight.detach()
    assert loaded.shape == (V + 5, 8)
    assert torch.equal(loaded[V:], extra)
    torch.testing.assert_close(loaded[:V] @ loaded[:V].T, saved @ saved.T, rtol=0, atol=1e-5)


def test_a_smaller_vocabulary_is_cut_and_a_wider_embedding_is_zero_padded(opt_dir):
    path, saved = opt_dir
    model = lswt(saved.shape[0] - 10, 24)
    warm_start_embeddings(model, str(path))
    loaded = model.embed.weight.detach()
    assert torch.equal(loaded[:, :16], saved[:-10])
    assert torch.equal(loaded[:, 16:], torch.zeros(saved.shape[0] - 10, 8))


def test_the_module_warm_starts_and_freezes_the_embedding(opt_dir):
    path, saved = opt_dir
    lm = LanguageModelModule(
        "lswt", "debug", model_config={"d_vocab": 16}, vocab_size=saved.shape[0], scheduler=None,
        warm_start={"path": str(path), "freeze": True},
    )  # fmt: skip
    lm.configure_model()
    assert torch.equal(lm.model.embed.weight.detach(), saved)
    assert not lm.model.embed.weight.requires_grad
    optimized = {id(p) for group in lm.configure_optimizers().param_groups for p in group["params"]}
    assert id(lm.model.embed.weight) not in optimized
    assert id(lm.model.input_proj.weight) in optimized


def test_its_tokenizer_is_the_saved_one_and_travels_in_the_index(opt_dir):
    """Data for a warm-started model is prepared with the model directory's tokenizer (`--tokenizer <dir>`)."""
    from transformers import AutoTokenizer

    path, _ = opt_dir
    tokenizer = tokenizer_from_path(path)
    reference = AutoTokenizer.from_pretrained(path, local_files_only=True)
    text = "the lazy fox sleeps by the door"
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eot_id == 2
    assert tokenizer.vocab_size == len(reference)
    rebuilt = load_tokenizer(tokenizer.describe())  # what a checkpoint carries: no need for the directory
    assert rebuilt.encode(text) == tokenizer.encode(text) and rebuilt.eot_id == 2


def test_a_directory_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.warm_start.path .* is not a local Hugging Face model directory"):
        warm_start_embeddings(lswt(64, 16), str(tmp_path))
