#!/usr/bin/env bash
# The four debug models side by side, by context length and by token position: LSWT, LSWT with Transformer-XL
# memory, SeqCond and SerriformNet, each trained for 600 optimizer steps of 16 x 256 tokens of the built-in
# corpus (LSWT-XL: 2 accumulated micro-batches of 16 x 128, each carrying its cache). From the repository root:
#   bash docs/figures/families.sh
# Trains what is missing (a finished run is reused: --ckpt_path auto), then writes docs/figures/families/.
set -euo pipefail
same=(--trainer.max_steps 600 --trainer.val_check_interval 200 --ckpt_path auto)
python -m platform.fit --config configs/tiny.yaml --trainer.default_root_dir runs/families/lswt "${same[@]}"
python -m platform.fit --config configs/lswt/debug.yaml --trainer.default_root_dir runs/families/lswt-xl \
    --data.batch_size 16 "${same[@]}" --trainer.val_check_interval 400
python -m platform.fit --config configs/seqcond/debug.yaml --trainer.default_root_dir runs/families/seqcond "${same[@]}"
python -m platform.fit --config configs/serriform/full.yaml --trainer.default_root_dir runs/families/serriform \
    "${same[@]}"
python -m platform.fit --config configs/serriform/full.yaml --trainer.default_root_dir runs/families/serriform-rotary \
    --model.model_config.positions rotary "${same[@]}"
python -m platform.evaluate --config configs/evaluate/families.yaml
