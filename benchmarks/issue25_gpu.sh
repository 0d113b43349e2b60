#!/usr/bin/env bash
# Issue 25's GPU check: one script, at most 8 minutes on one H100 / H200 with JAX 0.11.2.
#
#   bash benchmarks/issue25_gpu.sh OUT_DIR              # on the GPU machine
#   DRY_RUN=1 bash benchmarks/issue25_gpu.sh /tmp/dry   # every command on a CPU, tiny sizes
#
# Steps, most important first (limits sum to 480 s; bf16, 16384 tokens,
# width 2048, as the 2026-12-04 table in BENCHMARKS.md):
#   1. the gpu-marked tests of the Hopper kernel and its variants, and the   95 s
#      Triton kernel's variants, compiled on this GPU
#   2. the table's weak cells, mosaic against cuDNN: D=128 at N=4096 and    165 s
#      16384 (120 s), D=64 at N=4096 (45 s); fwd and fwd+bwd, causal and not
#      -> OUT_DIR/mosaic_vs_cudnn{,_d64}/attention_bench.json
#   3. the variant cells at D=128, N=4096, causal: dropout, window,          65 s
#      soft-cap, bias; mosaic, pallas, and cuDNN where jax.nn takes the
#      variant -> OUT_DIR/variants/attention_bench.json
#   4. the Triton forward against JAX's Triton op at D=128 (issue 25 item    40 s
#      4: its tiles are now JAX's) -> OUT_DIR/triton_fwd/attention_bench.json
#   5. the tuning plan beside the defaults: the forward's intra-warpgroup  115 s
#      overlap (M8) with cuDNN, forward at D=128 both ways; dQ added up by
#      the dK/dV kernel (M5) with the backward's clean tile choices (M3, M4)
#      at D=64 and 128, fwd+bwd, not causal (the weakest cells; at 128 M5
#      takes no diagonal mask); the forward's (M1) at D=64; the backward
#      ping-pong (M6) and the persistent causal forward (M7)
#      -> OUT_DIR/schedules_m{8,5,5_d64,1,6,7}/...
# bench-attention rewrites its JSON after every cell, so a step cut by its
# limit keeps what it measured (meta.complete says whether it finished). Each
# step goes on past a failure; the last line names the steps that failed.
#
# Needs python3 (or $PYTHON) with jax[cuda13]==0.11.2, flax, optax,
# orbax-checkpoint, tokenizers, ml-collections, tensorboardX, matplotlib,
# pytest, pytest-xdist; the package is installed editable (--no-deps) when it
# is not importable. The GPU machine's image has all but ml-collections and
# tensorboardX: carry their wheels (see the device tool's README) and put
# them on PYTHONPATH first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: issue25_gpu.sh OUT_DIR}
# shellcheck source=benchmarks/gpu_steps.sh
source benchmarks/gpu_steps.sh

bench() {  # bench NAME SECONDS SUBDIR bench-attention flags...
  local name=$1 limit=$2 sub=$3
  shift 3
  step "$name" "$limit" "$sub.log" "$PYTHON" -m fusedlm.research.cli bench-attention \
    "${SIZES[@]}" --out="$OUT/$sub" "$@"
}

if [ "$DRY" = 1 ]; then
  # The interpreters on a CPU: tiny sizes, the sweep's shape of cells.
  SIZES=(--smoke --dtype=float16 --reps=1 --warmup=0 --no_errors)
  N_MAIN=128; N_VAR=128; D_MAIN=64,128; D_VAR=64; N_PERSIST=128
  TESTS=(-m "not gpu" -k "dispatch or default_block_sizes")
else
  SIZES=(--dtype=bfloat16 --reps=20 --warmup=2)
  N_MAIN=4096,16384; N_VAR=4096; D_MAIN=128; D_VAR=128; N_PERSIST=4096,16384
  TESTS=(-m gpu)
fi

# 1. The Hopper kernel, its variants and the Triton variants, compiled here.
XLA_PYTHON_CLIENT_PREALLOCATE=false step "gpu tests" 95 pytest_gpu.log \
  "$PYTHON" -m pytest tests/kernels/mosaic/test_attention.py \
  tests/kernels/mosaic/test_variants.py tests/kernels/test_variants.py \
  "${TESTS[@]}" -n 4 -q -rfEs

# 2. The weak cells of the 2026-12-04 table: mosaic against cuDNN.
bench "mosaic vs cudnn" 120 mosaic_vs_cudnn --impls=mosaic,cudnn \
  --head_dims="$D_MAIN" --seq_lens="$N_MAIN"
bench "mosaic vs cudnn D=64" 45 mosaic_vs_cudnn_d64 --impls=mosaic,cudnn \
  --head_dims=64 --seq_lens="$N_VAR"

# 3. The variant cells.
bench "variants" 65 variants --impls=mosaic,pallas,cudnn --head_dims="$D_VAR" \
  --seq_lens="$N_VAR" --causal=on --variants=dropout,window,softcap,bias

# 4. The Triton forward beside JAX's Triton op, with cuDNN for the ratio.
bench "triton forward" 40 triton_fwd --impls=pallas,jax-triton,cudnn \
  --head_dims="$D_MAIN" --seq_lens="$N_MAIN" --passes=fwd

# 5. The tuning plan's steps, off by default (BENCHMARKS.md: M1, M3-M8).
bench "M8 forward overlap" 25 schedules_m8 \
  --impls=mosaic,mosaic:fwd_overlap=1,cudnn --head_dims="$D_MAIN" --seq_lens="$N_VAR" \
  --passes=fwd
# (One step per head dim: a sweep runs its head dims in increasing order.)
BWD_TILES=mosaic,mosaic:dq_atomic=1,mosaic:num_stages_bwd=3,mosaic:block_kv_dq=128
bench "M5, M3, M4 backward, D=128" 20 schedules_m5 --impls="$BWD_TILES" \
  --head_dims=128 --seq_lens="$N_VAR" --passes=fwd+bwd --causal=off
bench "M5, M3, M4 backward, D=64" 15 schedules_m5_d64 --impls="$BWD_TILES" \
  --head_dims=64 --seq_lens="$N_VAR" --passes=fwd+bwd --causal=off
bench "M1 forward tiles" 15 schedules_m1 \
  --impls=mosaic,mosaic:block_kv=64,mosaic:num_stages=3 --head_dims=64 \
  --seq_lens="$N_VAR" --passes=fwd --causal=off
bench "M6 backward ping-pong" 20 schedules_m6 \
  --impls=mosaic,mosaic:bwd_pingpong=1 --head_dims="$D_MAIN" --seq_lens="$N_VAR" \
  --passes=fwd+bwd
bench "M7 persistent forward" 20 schedules_m7 \
  --impls=mosaic,mosaic:persistent=132 --head_dims="$D_MAIN" --seq_lens="$N_PERSIST" \
  --passes=fwd --causal=on

echo "=== done in ${SECONDS}s; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} = 0 ]
