#!/usr/bin/env bash
# GPU checks for a session that has the device tool (CI never runs this). One part per call, each
# sized for one device command (<= 10 min); the GPU figures in README.md come from these runs.
#   usage (repo root, on the GPU machine):  bash .ci/gpu_check.sh PART     PART in:
#     tying_bench   tying_rl.py --mode=bench, eager and compiled (tokens/s, MFU, tying/baseline step)
#     tying_repro   the default Q-agent run and the baseline at the same budget (PTB)
#     tying_paper   memory at --preset=paper: baseline vs two sweeps of random ties
#     recursive     the default study + early exit + CDB engine + simulator (PTB)
#     neuron        the default CIFAR-10 ViT run + the ViT-B/16 path-search bench
# Data: copy it in here first (git-ignored) and name the folders in the device tool's `carry`:
#   mkdir -p data/ptb data/tiktoken data/cifar10-jpg
#   cp ../shared/data/ptb/* data/ptb/; cp ../shared/data/tiktoken/* data/tiktoken/
#   cp ../shared/data/cifar10-jpg/* data/cifar10-jpg/
set -uo pipefail
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$PWD/data/tiktoken}"
OUT="${OUT:-out/gpu_check}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
run() { echo "+ $*" | tee -a "$OUT/log.txt"; local t=$SECONDS; "$@" 2>&1 | tee -a "$OUT/log.txt"
        echo "wall $((SECONDS - t)) s" | tee -a "$OUT/log.txt"; }
case "${1:-}" in
  tying_bench)
    run python tying_rl.py --mode=bench --out_dir=out/tying_bench
    run python tying_rl.py --mode=bench --compile=True --out_dir=out/tying_bench_c
    cp out/tying_bench/bench.json "$OUT/tying_bench.json"; cp out/tying_bench_c/bench.json "$OUT/tying_bench_c.json" ;;
  tying_repro)
    run python tying_rl.py --out_dir=out/tying_rl/q
    run python tying_rl.py --agent=none --out_dir=out/tying_rl/none
    cp out/tying_rl/q/summary.json "$OUT/tying_q.json"; cp out/tying_rl/none/summary.json "$OUT/tying_none.json"
    cp out/tying_rl/q/tie_map.png "$OUT/tying_tie_map.png" ;;
  tying_paper)
    run python tying_rl.py --preset=paper --agent=none --episodes=1 --eval_max_batches=10 --out_dir=out/tying_rl/paper_none
    run python tying_rl.py --preset=paper --agent=random --episodes=2 --eval_max_batches=10 --out_dir=out/tying_rl/paper_random
    cp out/tying_rl/paper_none/summary.json "$OUT/paper_none.json"; cp out/tying_rl/paper_random/summary.json "$OUT/paper_random.json" ;;
  recursive)
    run python recursive.py
    cp out/recursive/summary.json "$OUT/recursive.json"; cp out/recursive/*.png "$OUT/" ;;
  neuron)
    run python neuron_path.py
    run python neuron_path.py --bench=True --model=vit_b_16 --weights=random --bench_images=40 --out_dir=out/np_bench
    cp out/neuron_path/summary.json "$OUT/neuron.json"; cp out/np_bench/bench.json "$OUT/neuron_bench.json" ;;
  *) echo "usage: bash .ci/gpu_check.sh tying_bench|tying_repro|tying_paper|recursive|neuron"; exit 2 ;;
esac
