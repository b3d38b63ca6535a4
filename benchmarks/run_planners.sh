#!/usr/bin/env bash
# The planner benchmark of issue 3, exactly as run for benchmarks/RESULTS.md.
# Lanes 1 then 3 (bo vs Ax on Hartmann6; Branin; noisy BraninCurrin) and lane 2 (failures, pools) ran at
# the same time on the 2-core machine; the proposal-time runs ran alone afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
LP=.venv/bin/labpilot
D=../shared/datasets
lane1() {
  $LP bench --problems hartmann6 --planners bo,ax,random,sobol --seeds 10 --budget 35 --initial 5 --out benchmarks/planners/hartmann6.json --quiet
}
lane3() {  # after lane 1: Branin (its target is bo's regret alone) and the noisy two-objective problem
  $LP bench --problems branin --planners bo,random,sobol --seeds 10 --budget 30 --initial 5 --out benchmarks/planners/branin.json --quiet
  $LP bench --problems branincurrin-noisy --planners bo,random,sobol --seeds 5 --budget 86 --batch 4 --initial 6 --out benchmarks/planners/branincurrin_noisy.json --quiet
}
lane2() {
  $LP bench --problems branin_failing --planners bo,bo-plain,random --seeds 10 --budget 30 --initial 5 --options '{"bo-plain": {"planner": "bo", "feasibility_model": false}}' --out benchmarks/planners/branin_failing.json --quiet
  $LP bench --problems $D/crossed_barrel --planners bo,random --seeds 10 --budget 100 --initial 5 --out benchmarks/planners/crossed_barrel.json --quiet
  $LP bench --problems $D/suzuki $D/hplc $D/snar $D/alkox $D/photo_pce10 $D/buchwald_a $D/p3ht $D/agnp $D/autoam --planners bo,random --seeds 5 --budget 60 --initial 5 --out benchmarks/planners/datasets.json --quiet
}
timing() {  # alone: proposal time near 35 observations, one point, a batch of 4, and a linear constraint
  $LP bench --problems hartmann6 --planners bo,ax --seeds 3 --budget 35 --initial 30 --out benchmarks/planners/time_q1.json --quiet
  $LP bench --problems hartmann6 --planners bo,ax --seeds 3 --budget 39 --batch 4 --initial 23 --out benchmarks/planners/time_q4.json --quiet
  $LP bench --problems hartmann6-constrained --planners bo,ax --seeds 3 --budget 35 --initial 30 --out benchmarks/planners/time_lincon.json --quiet
}
case "${1:-all}" in
  lane1) lane1 ;; lane2) lane2 ;; lane3) lane3 ;; timing) timing ;;
  all) (lane1; lane3) & lane2 & wait; timing ;;
esac
