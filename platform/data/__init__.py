"""Data: tokenizers, token shards on disk, and the LightningDataModule that streams them."""
