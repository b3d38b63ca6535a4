#!/usr/bin/env bash
# The planner benchmark of issue 3, exactly as run for benchmarks/RESULTS.md.
# On the 2-core machine lane A ran beside lanes B and then B2 + D; the proposal-time runs
# ran alone afterwards (nothing else on the machine). Regrets do not depend on the machine's load
# (every run is seeded); proposal times do, so they are read from the timing runs only.
set -euo pipefail
cd "$(dirname "$0")/.."
# "python -m" so that the checkout the script sits in is what runs (labpilot would import the installed copy)
LP=".venv/bin/python -m orchestrator.cli"
D=../shared/datasets
O=benchmarks/planners
# bo: the planner as `labpilot bench` (and a campaign with LABPILOT_TRAINER=off) runs it: its own GP, refitted warm on every ask; bo-cold: the GP
# fitted from scratch on every ask (warm_start: false); bo-trainer: bo on the surrogate trainer's
# versions, the path of `labpilot run` (trained after every result, off the proposal's clock)
VARIANTS='{"bo-cold": {"planner": "bo", "warm_start": false}, "bo-trainer": {"planner": "bo", "surrogate_trainer": true}}'
laneA() {  # bo against Ax's default on Hartmann6; Branin; failures with and without the feasibility model
  $LP bench --problems hartmann6 --planners bo,bo-trainer,ax,random,sobol --seeds 10 --budget 35 --initial 5 --options "$VARIANTS" --out $O/hartmann6.json --quiet
  $LP bench --problems branin --planners bo,bo-cold,bo-trainer,random,sobol --seeds 10 --budget 30 --initial 5 --options "$VARIANTS" --out $O/branin.json --quiet
  $LP bench --problems branin_failing --planners bo,bo-plain,random --seeds 10 --budget 30 --initial 5 --options '{"bo-plain": {"planner": "bo", "feasibility_model": false}}' --out $O/branin_failing.json --quiet
}
laneE() {  # bo against Ax both ways, in one run: `ax` (Ax fed the paired 5-point design, a fresh Client per ask)
  # and `ax-native` (one Client for the run, Ax's own initial design, as Ax's documentation runs it)
  $LP bench --problems hartmann6 --planners bo,ax,ax-native --seeds 5 --budget 35 --initial 5 --out $O/hartmann6_ax_native.json --quiet
}
laneF() {  # what the ax row is on a categorical table: the share of its proposals that were Ax's Sobol fallback
  $LP bench --problems $D/buchwald_a --planners bo,ax,random --seeds 3 --budget 50 --initial 5 --out $O/buchwald_a_ax.json --quiet
}
reference() {  # Ax's Client on Hartmann6 with no labpilot code in the loop, as Ax's documentation runs it:
  # on Hartmann6 in numpy, and on BoTorch's Hartmann6 (the bench's function, float32 constants)
  .venv/bin/python benchmarks/ax_standalone.py --seeds 0 1 2 3 4 --trials 35 --out $O/ax_standalone_hartmann6.json
  .venv/bin/python benchmarks/ax_standalone.py --seeds 0 1 2 3 4 --trials 35 --function botorch --out $O/ax_standalone_hartmann6_botorch.json
}
campaign() {  # bo on the surrogate trainer's versions, as `labpilot run` proposes (widening capped, restarts)
  $LP bench --problems branin --planners bo-trainer --seeds 10 --budget 30 --initial 5 --options "$VARIANTS" --out $O/campaign_path_branin.json --quiet
  $LP bench --problems hartmann6 --planners bo-trainer --seeds 10 --budget 35 --initial 5 --options "$VARIANTS" --out $O/campaign_path_hartmann6.json --quiet
}
laneB() {  # two noisy objectives in batches of 4, with the benchmark's reference point (as BoTorch's
  # published qNEHVI run has it; without one bo infers it from the data: 53.5 against 56.8 on 4 seeds,
  # benchmarks/planners/branincurrin_reference.*)
  $LP bench --problems branincurrin-noisy --planners bo,random,sobol --seeds 10 --budget 86 --batch 4 --initial 6 --options '{"bo": {"reference_point": [18, 6]}}' --out $O/branincurrin_noisy.json --quiet
}
laneB2() {  # the crossed-barrel pool
  $LP bench --problems $D/crossed_barrel --planners bo,random --seeds 10 --budget 100 --initial 5 --out $O/crossed_barrel.json --quiet
}
laneC() {  # the RL planner, on the first 5 of the paired seeds (same initial designs) as bo in lane A
  $LP bench --problems branin --planners rl --seeds 5 --budget 30 --initial 5 --out $O/rl_branin.json --quiet
  $LP bench --problems hartmann6 --planners rl --seeds 5 --budget 35 --initial 5 --out $O/rl_hartmann6.json --quiet
}
laneD() {  # every other dataset in ../shared/datasets
  $LP bench --problems $D/suzuki $D/hplc $D/snar $D/alkox $D/photo_pce10 $D/buchwald_a $D/p3ht $D/agnp $D/autoam --planners bo,random --seeds 10 --budget 50 --initial 5 --out $O/datasets.json --quiet
}
timing() {  # alone: proposal time near 35 observations, one point, a batch of 4, and a linear constraint
  $LP bench --problems hartmann6 --planners bo,ax --seeds 5 --budget 35 --initial 30 --out $O/time_q1.json --quiet
  $LP bench --problems hartmann6 --planners bo,ax --seeds 5 --budget 39 --batch 4 --initial 23 --out $O/time_q4.json --quiet
  $LP bench --problems hartmann6-constrained --planners bo,ax --seeds 5 --budget 35 --initial 30 --out $O/time_lincon.json --quiet
}
# Two lanes share the 2 cores: one torch thread each (two threads each oversubscribe the cores and
# slow both several-fold). The timing runs, alone, keep torch's default.
lanes_env() { export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1; }
case "${1:-all}" in
  laneA|laneB|laneB2|laneC|laneD|laneE|laneF|reference|campaign) lanes_env; "$1" ;;
  timing) timing ;;
  all) (lanes_env; laneA & laneB & wait; laneB2 & laneC & wait; laneD & campaign & wait; laneE; laneF; reference); timing ;;
  *) echo "usage: $0 [all|laneA|laneB|laneB2|laneC|laneD|laneE|laneF|reference|campaign|timing]" >&2; exit 2 ;;
esac
