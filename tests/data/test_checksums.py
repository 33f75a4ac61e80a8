"""Shard checksums are verified once and remembered: a later open hashes only what changed since, a corrupted
shard is still caught, and a data directory that cannot be written still opens."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from lctrain.data import shards as shards_module
from lctrain.data.datamodule import TokenDataModule
from lctrain.data.shards import VERIFIED_FILE, TokenShards
from tests.helpers import REPO, resolved_config


@pytest.fixture
def data(tmp_path, builtin_data):
    copy = tmp_path / "data"
    shutil.copytree(builtin_data, copy)
    (copy / VERIFIED_FILE).unlink(missing_ok=True)  # whatever the session's other opens remembered
    return copy


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files hashed, in order."""
    names: list[str] = []
    real = shards_module.sha256_of

    def counting(path, *args, **kwargs):
        names.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shards_module, "sha256_of", counting)
    return names


def shard_files(data) -> list[str]:
    index = json.loads((data / "index.json").read_text())
    return [shard["file"] for split in index["splits"].values() for shard in split["shards"]]


def test_a_second_open_hashes_nothing(data, hashed):
    TokenShards.open(data, verify_checksums="once")
    assert sorted(hashed) == sorted(shard_files(data))
    assert sorted(json.loads((data / VERIFIED_FILE).read_text())) == sorted(shard_files(data))
    assert (data / VERIFIED_FILE).stat().st_mode & 0o777 == 0o644  # readable by every reader of the shards
    hashed.clear()
    TokenShards.open(data, verify_checksums="once")
    TokenDataModule(str(data)).setup()  # the datamodule's default is "once"
    assert hashed == []


def test_a_touched_shard_is_hashed_again(data, hashed):
    TokenShards.open(data, verify_checksums="once")
    shard = data / shard_files(data)[0]
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    hashed.clear()
    TokenShards.open(data, verify_checksums="once")
    assert hashed == [shard.name]
    hashed.clear()
    TokenShards.open(data, verify_checksums="once")
    assert hashed == []


def test_a_remembered_shard_corrupted_later_is_named_in_one_line(data):
    TokenShards.open(data, verify_checksums="once")
    shard = data / shard_files(data)[0]
    original = shard.read_bytes()
    shard.write_bytes(original[:5] + bytes([original[5] ^ 1]) + original[6:])  # same size, one bit flipped
    with pytest.raises(ValueError, match=f"^shard {shard} fails its sha256 checksum: corrupted") as error:
        TokenDataModule(str(data), verify_checksums="once").setup()
    assert "\n" not in str(error.value)


def test_a_shard_whose_mtime_is_set_back_is_still_hashed_again(data, hashed):
    """A rewrite that restores the old mtime (cp -p, rsync -t) still changes the ctime."""
    TokenShards.open(data, verify_checksums="once")
    shard = data / shard_files(data)[0]
    stat, original = shard.stat(), shard.read_bytes()
    shard.write_bytes(original[:5] + bytes([original[5] ^ 1]) + original[6:])
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match="fails its sha256 checksum"):
        TokenShards.open(data, verify_checksums="once")


def test_always_hashes_every_time_and_never_only_checks_sizes(data, hashed):
    n_files = len(shard_files(data))
    TokenShards.open(data, verify_checksums="always")
    TokenShards.open(data, verify_checksums="always")
    assert len(hashed) == 2 * n_files
    hashed.clear()
    (data / VERIFIED_FILE).unlink()
    TokenShards.open(data, verify_checksums="never")
    TokenShards.open(data, verify_checksums=False)  # the boolean of earlier configs
    assert hashed == [] and not (data / VERIFIED_FILE).exists()
    TokenShards.open(data, verify_checksums=True)  # reads as "once"
    TokenShards.open(data, verify_checksums=True)
    assert len(hashed) == n_files


def test_a_data_directory_that_cannot_be_written_still_opens(data, hashed, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(shards_module.tempfile, "mkstemp", read_only)
    TokenShards.open(data, verify_checksums="once")
    TokenShards.open(data, verify_checksums="once")
    assert len(hashed) == 2 * len(shard_files(data))  # nothing remembered: verified at every open
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".")) == []


def test_only_the_process_that_remembers_writes_the_record(data, hashed):
    TokenShards.open(data, verify_checksums="once", remember=False)
    assert not (data / VERIFIED_FILE).exists()


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="data.verify_checksums='sometimes' is not one of: once, always, never"):
        TokenDataModule(verify_checksums="sometimes")


def test_the_command_line_takes_the_modes_and_the_old_booleans(builtin_data):
    base = ["--config", str(REPO / "configs/tiny.yaml"), "--data.data_dir", str(builtin_data)]
    assert resolved_config(base)["data"]["verify_checksums"] == "once"
    assert resolved_config([*base, "--data.verify_checksums", "always"])["data"]["verify_checksums"] == "always"
    assert resolved_config([*base, "--data.verify_checksums", "false"])["data"]["verify_checksums"] is False
