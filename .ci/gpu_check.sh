#!/usr/bin/env bash
# Every GPU check of a session in one device command (CI never runs this; the GPU figures in
# README.md come from it). A session has ~15 device minutes, so the work is packed:
#   phase 1, GPU alone (timings): tying_rl --mode=bench eager, the ViT-B/16 path-search bench,
#            tying_rl --mode=bench --compile=True; CPU data preparation runs beside it.
#   phase 2, concurrent (memory, perplexity and accuracy do not depend on what else runs, wall
#            times and tokens/s do): the default runs of the three scripts, the tying_rl ablation
#            (two chains) and the paper-scale memory runs (one chain), under MPS when it starts.
#   phase 3, GPU alone if time is left: recursive.py again, every stage cached, so its serving
#            throughput is measured alone.
# Every job stops at the deadline; out/ (no checkpoints) comes back as one tarball, with
# results.json (every summary.json and bench.json) and log.txt.
#   usage (repo root, on the GPU machine):  bash .ci/gpu_check.sh [DEADLINE_S]
# Data: copy it in here first (git-ignored) and name the folders in the device tool's `carry`:
#   mkdir -p data/ptb data/tiktoken data/cifar10-jpg
#   cp ../shared/data/ptb/* data/ptb/; cp ../shared/data/tiktoken/* data/tiktoken/
#   cp ../shared/data/cifar10-jpg/* data/cifar10-jpg/
set -uo pipefail
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$PWD/data/tiktoken}"
OUT="${OUT:-out/gpu_check}"; DL="${1:-540}"; T0=$SECONDS
mkdir -p "$OUT" out/logs
left() { echo $((DL - (SECONDS - T0))); }
job() {  # job NAME CAP CMD...: run for at most CAP s (0: no cap) and the time left; log to
  local name=$1 cap=$2 t=$SECONDS lim; shift 2  # out/logs/NAME.txt; record rc and wall
  lim=$(left); [ "$cap" -gt 0 ] && [ "$cap" -lt "$lim" ] && lim=$cap
  if [ "$lim" -lt 20 ]; then echo "$name skipped (deadline)" >> out/logs/jobs.txt; return; fi
  timeout -k 5 "$lim" "$@" > "out/logs/$name.txt" 2>&1
  echo "$name rc=$? wall=$((SECONDS - t))s start=$((t - T0))s :: $*" | tee -a out/logs/jobs.txt
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee out/logs/gpu.txt
python -c "import torch; print('torch', torch.__version__)" | tee -a out/logs/gpu.txt

# phase 1: timings, GPU alone (data prepared on the CPU meanwhile)
job prep 0 python -c "import data; data.prepare_text('ptb', 'gpt2'); data.load_images('cifar10')" &
PREP=$!
job tying_bench 90 python tying_rl.py --mode=bench --out_dir=out/tying_bench
job neuron_bench 110 python neuron_path.py --bench=True --model=vit_b_16 --weights=random --bench_images=20 \
    --path_batch=20 --out_dir=out/np_bench
job tying_bench_c 150 python tying_rl.py --mode=bench --compile=True --out_dir=out/tying_bench_c
wait $PREP

# phase 2: concurrent runs; MPS lets their small kernels overlap (skipped if it does not start)
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps; mkdir -p /tmp/mps
if nvidia-cuda-mps-control -d 2>/dev/null && timeout 40 python -c "import torch; torch.ones(1, device='cuda')"; then
  echo "phase 2 under MPS" | tee -a out/logs/jobs.txt
else
  echo quit | nvidia-cuda-mps-control 2>/dev/null; unset CUDA_MPS_PIPE_DIRECTORY
  echo "phase 2 without MPS" | tee -a out/logs/jobs.txt
fi
export OMP_NUM_THREADS=2
job tying_q 0 python tying_rl.py --out_dir=out/tying_rl/q &
job tying_none 0 python tying_rl.py --agent=none --out_dir=out/tying_rl/none &
job recursive 0 python recursive.py &
job neuron 0 python neuron_path.py &
( P="--preset=paper --steps_per_action=1 --eval_max_batches=10"
  job paper_none 0 python tying_rl.py $P --agent=none --episodes=1 --out_dir=out/tying_rl/paper_none
  job paper_random 0 python tying_rl.py $P --agent=random --episodes=2 --out_dir=out/tying_rl/paper_random ) &
( for a in q reinforce random sequence; do
    job abl_$a 0 nice python tying_rl.py --agent=$a --episodes=10 --out_dir=out/tying_rl/abl_$a; done ) &
( for a in none rev universal roundrobin; do
    job abl_$a 0 nice python tying_rl.py --agent=$a --episodes=10 --out_dir=out/tying_rl/abl_$a; done ) &
wait
echo quit | nvidia-cuda-mps-control 2>/dev/null; unset CUDA_MPS_PIPE_DIRECTORY; sleep 2

# phase 3: the serving throughput alone (every stage of recursive.py is cached by now)
if [ -f out/recursive/summary.json ] && [ "$(left)" -gt 60 ]; then
  cp out/recursive/summary.json out/recursive/summary_phase2.json
  job recursive_alone 0 python recursive.py
fi

python - "$OUT" <<'EOF'
import json, pathlib, sys
res = {str(p): json.loads(p.read_text()) for n in ("summary.json", "summary_phase2.json", "bench.json")
       for p in sorted(pathlib.Path("out").rglob(n))}
res["jobs"] = pathlib.Path("out/logs/jobs.txt").read_text().splitlines()
pathlib.Path(sys.argv[1], "results.json").write_text(json.dumps(res, indent=1, default=str))
EOF
for f in out/logs/*.txt; do echo "=== $f"; tail -n 15 "$f"; done > "$OUT/log.txt"
tar czf "$OUT/out.tgz" --exclude='*.pt' --exclude=gpu_check out
ls -la "$OUT"; cat out/logs/jobs.txt
