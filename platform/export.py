"""Export a checkpoint: `python -m platform.export --checkpoint <sharded dir | file | run dir> --out model.ckpt`.

Writes one file with the model weights, hyper-parameters and tokenizer, which `python -m platform.generate
--checkpoint model.ckpt` loads; sharded FSDP2/FSDP/DeepSpeed checkpoints are consolidated on CPU. With
`--format hf --out DIR` it writes a Hugging Face directory instead (config, safetensors weights, tokenizer)
that `AutoModelForCausalLM.from_pretrained(DIR)` loads (lctrain/hf/).
"""

import sys


def main(args: list[str] | None = None) -> int:
    from lctrain.cluster.consolidate import export_cli
    from lctrain.entry import run_entry_point

    return run_entry_point(export_cli, args)


if __name__ == "__main__":
    sys.exit(main())
