#!/usr/bin/env bash
# The GPU checks and benchmarks in one go, on a CUDA machine with the requirements installed:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
# Runs the tests marked `gpu`, then the benchmarks in bf16 at about 83M parameters per model (LSWT tiny
# with a 32k vocabulary, SeqCond small, SerriformNet at width 768), and writes each output to OUT_DIR.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
}
models=(
    --model lswt=lswt:tiny:vocab_size=32768,rope_base=10000.0,d_ff=1024
    --model seqcond=seqcond:small:vocab_size=32768,seqcond_ratio=3,max_seq_len=16384
    --model serriform=serriform:tiny:vocab_size=32768,d_model=768,n_layers=12
)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
run gpu_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests
# LSWT eager and compiled against eager Llama (bf16 autocast), then MFU at LSWT medium (949M): Llama and the
# compiled LSWT as `fit` trains it only, the memory of the other rows' AdamW states and full logits left out.
run lswt_vs_llama 240 python3 -m benchmarks.lswt_vs_llama --device cuda --dtype bf16 --compile --d_model 768 \
    --n_layers 12 --n_heads 12 --d_ff 3072 --vocab_size 50272 --seq_len 2048 --batch_size 8 --repeats 3
run lswt_vs_llama_medium 240 python3 -m benchmarks.lswt_vs_llama --device cuda --dtype bf16 --compile \
    --size medium --seq_len 2048 --batch_size 8 --repeats 3 --skip registers decoding eager full_logits
run train_throughput 120 python3 -m benchmarks.train_throughput --device cuda --dtype bf16 --batch-size 4 \
    --lengths 2048 4096 8192 16384 --scan-kernels torch triton "${models[@]}"
run kernel_memory 60 python3 -m benchmarks.kernel_memory --device cuda --dtype bf16 --batch-size 4 \
    --lengths 2048 4096 8192 16384 32768 "${models[@]}"
run decode_latency 50 python3 -m benchmarks.decode_latency --device cuda --dtype bf16 "${models[@]}"
run self_extend_memory 40 python3 -m benchmarks.self_extend_memory --device cuda --lengths 4096 16384 32768 \
    --block-size 2048
run gpu_strategies 150 python3 -m benchmarks.gpu_strategies --size small --steps 20
