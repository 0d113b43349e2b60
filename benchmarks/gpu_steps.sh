# What the GPU check scripts (benchmarks/issue*_gpu.sh) share; sourced, not run.
#
# Expects OUT (the output folder) set by the caller. Sets PYTHON (default
# python3), DRY (DRY_RUN, 0 or 1) and FAILED, defines `step`, and installs
# the package editable (--no-deps) when it is not importable.
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
DRY=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1
FAILED=()

step() {  # step NAME SECONDS LOG command...: runs under its own time limit, goes on past a failure
  local name=$1 limit=$2 log=$3
  shift 3
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - start))s"
  if [ "$rc" != 0 ]; then FAILED+=("$name (rc $rc)"); fi
}

if ! "$PYTHON" -c "import fusedlm.research" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
