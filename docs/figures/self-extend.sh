#!/usr/bin/env bash
# Perplexity by context length of the default model and the passkey models, and the passkey grids, at 1x-16x
# their trained length, with plain RoPE and two SelfExtend settings. From the repository root:
#   bash docs/figures/self-extend.sh
# Trains what is missing (a finished run is reused: --ckpt_path auto), then writes docs/figures/self-extend/
# and docs/figures/passkey/ (report.md, plots, CSV, JSON, evaluate.log).
set -euo pipefail
python -m platform.fit --config configs/tiny.yaml --ckpt_path auto
python -m platform.fit --config configs/passkey/lswt.yaml --ckpt_path auto
python -m platform.fit --config configs/passkey/lswt.yaml --data.layout random --trainer.max_steps 2600 \
    --trainer.default_root_dir runs/passkey/lswt-offsets --ckpt_path auto
python -m platform.evaluate --config configs/evaluate/self-extend.yaml
python -m platform.evaluate --config configs/evaluate/passkey.yaml
