#!/usr/bin/env bash
# One node with 8 H100 80 GB GPUs: a single JAX process drives all 8 local GPUs as one mesh
# (data=1, fsdp=8, tensor=1 in the *_8xh100 presets). Stages run one after another from their presets:
#
#   bash launch/gpu_node_8xh100.sh configs/qwen2vl_7b_nli_8xh100.yaml model.checkpoint=/ckpt/Qwen2-VL-7B-Instruct \
#       data.root=/data/nli_for_simcse.csv
#   bash launch/gpu_node_8xh100.sh configs/qwen2vl_7b_mbeir_8xh100.yaml data.root=/data/M-BEIR
#   bash launch/gpu_node_8xh100.sh configs/qwen2vl_7b_elva_rl_8xh100.yaml data.root=/data/M-BEIR
#
# Install once on the node: pip install -e ".[cuda]"   (jax[cuda12]==0.10.2, the same jax as the core pin)
# Check a preset against the node before renting it (no GPU needed, docs/scaling.md):
#   python -m elva_jax.plan --config configs/qwen2vl_7b_mbeir_8xh100.yaml --topology h100:8
set -euo pipefail
cfg="${1:?usage: bash launch/gpu_node_8xh100.sh CONFIG [key=value ...]}"; shift

# One process for the whole node: never start jax.distributed, even inside a SLURM allocation.
unset ELVA_DISTRIBUTED JAX_COORDINATOR_ADDRESS ELVA_NUM_PROCESSES ELVA_PROCESS_ID
export SLURM_NTASKS=1
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}"

# XLA reserves this share of each GPU's memory up front (default 0.75). The presets are planned to stay
# under 90 % of 80 GiB (72 GiB); 0.92 leaves ~6 GiB for the CUDA context, cuBLAS/cuDNN workspaces and NCCL.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# Preallocate that share as one arena (the default): no fragmentation from growing the pool mid-run.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"

# --xla_gpu_enable_latency_hiding_scheduler: schedule the FSDP all-gathers and gradient reduce-scatters of
#   each scanned layer so they overlap the previous layer's matmuls (NVLink traffic hidden behind compute).
# --xla_gpu_enable_triton_gemm=false: bf16 matmuls go to cuBLAS (the LoRA and projection shapes here are
#   large and regular; the Triton GEMM autotuner only lengthens the compile).
XLA_FLAGS_8XH100="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
export XLA_FLAGS="${XLA_FLAGS_8XH100}${XLA_FLAGS:+ $XLA_FLAGS}"

# Compiled programs are cached on disk: a restart after preemption (SIGTERM saves a checkpoint) skips the
# minutes of compiling the 7B train step.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/elva_jax/xla}"

n_gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if [ "${n_gpus:-0}" -lt 8 ]; then
  echo "warning: expected 8 GPUs, nvidia-smi lists ${n_gpus:-0}; the mesh takes the devices JAX finds" >&2
fi
exec python -m elva_jax.train --config "$cfg" "$@"
