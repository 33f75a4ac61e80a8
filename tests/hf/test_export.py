"""`lctrain export --format hf`: the directory's files, its refusals, its atomic write, its tokenizer, and a
fresh process that loads it with `trust_remote_code=True` without having imported lctrain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lctrain.hf.export as hf_export
from lctrain.data.tokenizer import ByteTokenizer, train_bpe
from lctrain.export import main as export_main
from lctrain.hf import read_hf_model, write_hf
from lctrain.models.spec import ModelSpec

SPEC = ModelSpec("lswt", overrides={"n_registers": 2})
TEXT = "Grüße aus Köln — 東京 🎉 naïve café <|endoftext|>\n\ttabs"


def checkpoint_file(tmp_path, spec: ModelSpec = SPEC, tokenizer: dict | None = None):
    """A checkpoint file of a random-weight model, as fit writes one (weights under model.*, its spec)."""
    torch.manual_seed(0)
    model = spec.build().eval()
    path = tmp_path / "model.ckpt"
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "model_spec": spec.to_dict()}
    if tokenizer is not None:
        checkpoint["tokenizer"] = tokenizer
    torch.save(checkpoint, path)
    return path, model


def test_the_directory_holds_config_weights_generation_config_tokenizer_and_remote_code(tmp_path, capsys):
    ckpt, model = checkpoint_file(tmp_path)
    assert export_main(["--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "configuration_lctrain.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_lctrain.py",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.ckpt"]  # no temporary left beside it
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "lswt" and config["model_config"]["n_registers"] == 2
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lctrain.LSWTHFConfig",
        "AutoModelForCausalLM": "modeling_lctrain.LSWTForCausalLM",
    }
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name every transformers knows
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == 256
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()} == {0o666 & ~umask}  # weights too


def test_an_existing_directory_is_refused_without_overwrite_and_a_foreign_one_even_with_it(tmp_path, capsys):
    ckpt, _ = checkpoint_file(tmp_path)
    out = tmp_path / "hf"
    args = ["--checkpoint", str(ckpt), "--format", "hf", "--out", str(out)]
    assert export_main(args) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()

    assert export_main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out} exists; pass --overwrite true to replace it, or name another directory"
    )
    assert (out / "model.safetensors").read_bytes() == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert export_main(["--checkpoint", str(ckpt), "--format", "hf", "--out", str(other), "--overwrite", "true"]) == 2
    assert "is not a Hugging Face export of lctrain" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]

    assert export_main([*args, "--overwrite", "true"]) == 0  # an earlier export is replaced
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.ckpt", "notes"]


def test_an_interrupted_export_leaves_nothing_and_keeps_the_previous_export(tmp_path, monkeypatch):
    ckpt, _ = checkpoint_file(tmp_path)

    def fail(*args, **kwargs):  # the weights are written by now; the tokenizer never is
        raise OSError("disk went away")

    monkeypatch.setattr(hf_export, "save_tokenizer", fail)
    with pytest.raises(OSError, match="disk went away"):
        hf_export.write_hf(torch.load(ckpt, weights_only=True), tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]

    monkeypatch.undo()
    write_hf(torch.load(ckpt, weights_only=True), tmp_path / "hf")
    good = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    (tmp_path / "other").mkdir()
    other, _ = checkpoint_file(tmp_path / "other", ModelSpec("serriform"))  # another model: its export would differ
    monkeypatch.setattr(hf_export, "save_tokenizer", fail)
    with pytest.raises(OSError, match="disk went away"):
        hf_export.write_hf(torch.load(other, weights_only=True), tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.ckpt", "other"]


def test_a_failed_swap_puts_the_previous_export_back(tmp_path, monkeypatch):
    ckpt, _ = checkpoint_file(tmp_path)
    write_hf(torch.load(ckpt, weights_only=True), tmp_path / "hf")
    good = (tmp_path / "hf" / "model.safetensors").read_bytes()
    rename = os.rename

    def rename_fails_into_place(src, dst):
        if str(src).startswith(str(tmp_path / ".hf.tmp-")):
            raise OSError("rename failed")
        return rename(src, dst)

    monkeypatch.setattr(hf_export.os, "rename", rename_fails_into_place)
    with pytest.raises(OSError, match="rename failed"):
        write_hf(torch.load(ckpt, weights_only=True), tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.ckpt"]


def test_a_temporary_left_by_a_killed_export_is_removed_by_the_next(tmp_path):
    ckpt, _ = checkpoint_file(tmp_path)
    stale = tmp_path / ".hf.tmp-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    write_hf(torch.load(ckpt, weights_only=True), tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.ckpt"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_dcp_checkpoint_exports_to_the_same_weights(tmp_path, capsys):
    from torch.distributed.checkpoint import FileSystemWriter, save

    spec = ModelSpec("seqcond", overrides={"num_anchor_heads": 2})
    model = spec.build()
    sharded = tmp_path / "step-0000003.ckpt"  # what FSDP2 writes: DCP files and Lightning's meta.pt
    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    save(state, storage_writer=FileSystemWriter(str(sharded)), no_dist=True)
    torch.save({"model_spec": spec.to_dict(), "global_step": 3}, sharded / "meta.pt")

    assert export_main(["--checkpoint", str(sharded), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    read_spec, weights = read_hf_model(tmp_path / "hf")
    assert read_spec.config() == spec.config()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_sharded_weights_are_written_with_an_index_and_read_back(tmp_path):
    ckpt, model = checkpoint_file(tmp_path)
    write_hf(torch.load(ckpt, weights_only=True), tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "hf" / "model.safetensors").exists()

    spec, weights = read_hf_model(tmp_path / "hf")
    assert spec.config() == SPEC.config()
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits, model(ids).logits)


def test_a_directory_that_is_not_an_lctrain_export_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path} has no config.json"):
        read_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'} has model_type 'llama', not one of"):
        read_hf_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'} is not valid JSON"):
        read_hf_model(tmp_path)


def test_the_byte_tokenizer_loads_with_autotokenizer_and_maps_bytes_to_the_same_ids(tmp_path, export_random):
    export_random(SPEC, tmp_path / "hf")
    tokenizer, ours = AutoTokenizer.from_pretrained(tmp_path / "hf"), ByteTokenizer()
    ids = tokenizer(TEXT).input_ids
    assert ids == list(TEXT.encode("utf-8")) == ours.encode(TEXT)  # the literal end-of-text stays bytes too
    assert tokenizer.decode(ids) == TEXT == ours.decode(ids)
    assert tokenizer.decode(ids[:2] + [0xE6]) == ours.decode(ids[:2] + [0xE6])  # a cut character: U+FFFD, as ours
    assert tokenizer.decode([*ids[:5], 256], skip_special_tokens=True) == ours.decode([*ids[:5], 256])
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.eos_token) == (256, 256, "<|endoftext|>")
    batch = tokenizer(["ab", "é!"], padding=True)  # "é" is two bytes; pads go on the left, as generate() needs
    assert batch.input_ids == [[256, 97, 98], [0xC3, 0xA9, 33]]
    assert batch.attention_mask == [[0, 1, 1], [1, 1, 1]]


def test_a_trained_bpe_tokenizer_is_written_as_it_is(tmp_path, export_random):
    bpe = train_bpe([TEXT * 3, "the cat sat on the mat " * 20], vocab_size=300)
    export_random(ModelSpec("serriform"), tmp_path / "hf", tokenizer=bpe.describe())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the cat sat on Köln 🎉"
    assert tokenizer(text).input_ids == bpe.encode(text)
    assert tokenizer.decode(bpe.encode(text)) == text == bpe.decode(bpe.encode(text))
    assert tokenizer.eos_token_id == bpe.eot_id


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import torch
    assert "lctrain" not in sys.modules
    from transformers import AutoModelForCausalLM
    for name in sys.argv[2:]:
        expected = torch.load(f"{sys.argv[1]}/{name}.pt")
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(f"{sys.argv[1]}/{name}", trust_remote_code=True, dtype=dtype)
            with torch.no_grad():
                logits = model(expected["ids"]).logits
            torch.testing.assert_close(logits, expected[dtype], rtol=0, atol=1e-5)
            print(name, type(model).__name__, logits.dtype)
    """
)


def test_a_fresh_process_loads_every_family_with_trust_remote_code(tmp_path, export_random, lctrain_site):
    """The process imports only transformers and torch; the export's own files bring in the installed lctrain
    (here a folder named lctrain on PYTHONPATH, as `pip install --target` lays it out)."""
    names = []
    for spec in (SPEC, ModelSpec("seqcond", overrides={"num_anchor_heads": 2}), ModelSpec("serriform")):
        model = export_random(spec, tmp_path / spec.arch)
        ids = torch.randint(0, 256, (2, 9))
        with torch.no_grad():
            reference = {"ids": ids, torch.float32: model(ids).logits, torch.bfloat16: model.bfloat16()(ids).logits}
        torch.save(reference, tmp_path / f"{spec.arch}.pt")
        names.append(spec.arch)
    env = {
        **os.environ,
        "PYTHONPATH": str(lctrain_site),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # where transformers copies the remote code
    }
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path), *names],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:6] == [
        "lswt LSWTForCausalLM torch.float32",
        "lswt LSWTForCausalLM torch.bfloat16",
        "seqcond SeqCondForCausalLM torch.float32",
        "seqcond SeqCondForCausalLM torch.bfloat16",
        "serriform SerriformForCausalLM torch.float32",
        "serriform SerriformForCausalLM torch.bfloat16",
    ]
    assert (tmp_path / "modules" / "transformers_modules").is_dir()  # it did go through the remote code
