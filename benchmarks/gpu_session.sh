#!/usr/bin/env bash
# The GPU benchmark session, one device call (10 minutes at most) per invocation, from the repository root:
#
#   OUT=/path MOHD_GIT_SHA=<sha of the tree> bash benchmarks/gpu_session.sh      # call 1: the default stages
#   OUT=/path MOHD_GIT_SHA=<sha> bash benchmarks/gpu_session.sh e2e-large        # call 2: the 7.24B model
#   OUT=/path MOHD_GIT_SHA=<sha> bash benchmarks/gpu_session.sh all              # everything, in one call
#
# Each e2e provider compiles the whole model (5 compiles per shape, 2 for training, times unknown until
# the first run), so the work is planned as two calls: the default stages, then e2e-large alone. `all`
# runs everything in one call, in the order below, as far as the budget goes.
# Stages, in priority order:
#   env        GPU, python and package versions
#   install    pip install --no-deps --no-build-isolation -e . (registers the 'mohd' backend)
#   tests      MOHDIFY_TEST_CUDA=1 pytest tests/codegen (the CUDA kernel tests; interpreter-only modules skip)
#   e2e-small  bench_e2e --shape small: dense / ideal / mohd at delta 0.5 and 0.25 (D 2048, 0.85B)
#   train      bench_train: D 2048 model, 8 x 2048 tokens, dense vs mohd at delta 0.5
#   ops        run_all.py, the op benchmarks
#   e2e-large  bench_e2e --shape large (D 4096, 7.24B); not in the default list
# and always a summary of the JSON files at the end.
# Each stage runs under `timeout` with min(its cap, what is left of BUDGET_S); a stage that would get
# less than 30 s is skipped and says so. The e2e and train scripts rewrite their JSON after every
# provider, so a stage that times out still returns what it finished. Files in $OUT (6 of the 8 a
# device call brings back):
#   session.log (everything printed, each stage's limit, time and exit code), e2e_small.json,
#   e2e_large.json, train.json, mohd_ops.json, mohd_ops.txt
# A list of stages without `install` still installs first when the 'mohd' backend is not registered
# (a fresh machine). Environment: OUT (required), MOHD_GIT_SHA (recorded in the JSON when the copy has
# no .git), PYTHON (default python), BUDGET_S (default 555), and extra arguments: SMALL_ARGS and
# LARGE_ARGS (bench_e2e, e.g. "--densities 0.25 --providers ideal,mohd"), TRAIN_ARGS (bench_train).
set -u -o pipefail
: "${OUT:?set OUT to the folder for results}"
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-555}
SMALL_ARGS=${SMALL_ARGS:-}
LARGE_ARGS=${LARGE_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
LOG="$OUT/session.log"
T0=$SECONDS
unset TRITON_INTERPRET            # real kernels, never the interpreter
export PYTHONUNBUFFERED=1         # a timed-out stage keeps its last lines in the log
stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
  stages=(env install tests e2e-small train ops)
elif [ "${stages[*]}" = all ]; then
  stages=(env install tests e2e-small train ops e2e-large)
fi

say() { echo "$*" | tee -a "$LOG"; }

run_stage() {   # run_stage NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - T0)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 30)); then
    say "=== $name: SKIPPED (${left}s of the ${BUDGET_S}s budget left)"
    return
  fi
  say "=== $name: start at +$((SECONDS - T0))s, limit ${limit}s: $*"
  local start=$SECONDS rc
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local note=""
  if ((rc == 124 || rc == 137)); then note=" TIMED OUT"; fi
  say "=== $name: rc=$rc$note after $((SECONDS - start))s"
}

env_report() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "pytest", "hypothesis", "networkx", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as err:
        print(name, "MISSING:", err)
EOF
}

install() {
  "$PY" -m pip install --no-deps --no-build-isolation -e . -q && "$PY" - <<'EOF'
import torch, mohdify
if "mohd" not in torch._dynamo.list_backends(exclude_tags=()):
    raise SystemExit("installed, but torch.compile does not list the backend 'mohd'")
print("mohdify", mohdify.__version__, "installed; torch.compile backend 'mohd' registered")
EOF
}

kernel_tests() {
  if ! "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
    echo "pytest or hypothesis is not installed on this machine: kernel tests not run"
    return 3
  fi
  # The CUDA kernel tests live in test_kernel_dispatch.py. The other tests/codegen files run the kernels
  # on CPU tensors under the Triton interpreter, which MOHDIFY_TEST_CUDA=1 turns off: tests/conftest.py
  # skips them then.
  MOHDIFY_TEST_CUDA=1 "$PY" -m pytest tests/codegen -q -rfEs -p no:cacheprovider
}

summary() {
  "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("e2e_small.json", "e2e_large.json", "train.json"):
    path = out / name
    if not path.exists():
        print(f"--- {name}: not written")
        continue
    d = json.loads(path.read_text())
    env = d["env"]
    print(f"--- {name}: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, sha {env['git_sha']}, "
          f"model {d['model_impl']} ({d.get('model_fallback_reason') or 'as requested'}), {d['dtype']}")
    print(d.get("table") or "(incomplete: the stage stopped before the end; rows so far below)")
    for r in d["rows"]:
        if "table" not in d:
            print({k: r.get(k) for k in ("provider", "delta", "tok_per_s", "ms_per_step", "speedup_vs_dense")})
        if r.get("error"):
            print(f"ERROR {r['provider']} delta {r.get('delta')}: {r['error']}")
        if "target_met" in r:
            print(f"target {r['provider']} delta {r.get('delta')}: {'MET' if r['target_met'] else 'NOT MET'}")
ops = out / "mohd_ops.txt"
print(f"--- mohd_ops.txt: {'written' if ops.exists() else 'not written'}")
EOF
}

# `timeout` runs programs, not shell functions: the function stages run in `bash -c` with these exported.
export PY
export -f env_report install kernel_tests

backend_registered() {
  "$PY" -c "import torch, sys; sys.exit('mohd' not in torch._dynamo.list_backends(exclude_tags=()))" 2>/dev/null
}
if [[ " ${stages[*]} " != *" install "* ]] && ! backend_registered; then
  stages=(install "${stages[@]}")
fi

for stage in "${stages[@]}"; do
  case "$stage" in
    env) run_stage env 40 bash -c env_report ;;
    install) run_stage install 90 bash -c install ;;
    tests) run_stage tests 100 bash -c kernel_tests ;;
    # perf_hints logs why inductor skipped CUDA graphs, if it did.
    # shellcheck disable=SC2086  # *_ARGS are word lists on purpose
    e2e-small) run_stage e2e-small 200 env TORCH_LOGS=perf_hints "$PY" benchmarks/bench_e2e.py --shape small \
        $SMALL_ARGS --out "$OUT" ;;
    train) run_stage train 160 "$PY" benchmarks/bench_train.py $TRAIN_ARGS --out "$OUT" ;;
    e2e-large) run_stage e2e-large 540 env TORCH_LOGS=perf_hints "$PY" benchmarks/bench_e2e.py --shape large \
        $LARGE_ARGS --out "$OUT" ;;
    ops) run_stage ops 150 "$PY" benchmarks/run_all.py --out "$OUT" ;;
    *) say "=== unknown stage '$stage' (stages: env install tests e2e-small train ops e2e-large, or all)" ;;
  esac
done
say "=== summary at +$((SECONDS - T0))s"
summary 2>&1 | tee -a "$LOG"
