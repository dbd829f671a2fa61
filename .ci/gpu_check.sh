#!/usr/bin/env bash
# Every GPU check of a session in one device command (CI never runs this; the GPU figures in
# README.md come from it). A session has ~15 device minutes, so the work is packed in 3 phases:
#   1. ALONE, one job at a time on the GPU: timings (ms/step, tokens/s, MFU, wall time).
#   2. SHARED, all jobs at once under MPS: memory, perplexity, accuracy and tie maps do not depend
#      on what else runs; wall times and tokens/s do, so these give none.
#   3. LAST, alone again if time is left: recursive.py with every stage cached by phase 2, so its
#      serving throughput (the CDB engine against static batching and CSB) is measured alone.
# Every job stops at the one deadline. out/ (no checkpoints) comes back as one tarball, with
# results.json (every summary.json and bench.json) and log.txt.
#   usage (repo root, GPU machine):  bash .ci/gpu_check.sh [DEADLINE_S] [ALONE] [SHARED] [LAST]
#   ALONE, SHARED, LAST: space-separated job names from cmd() below ("" = none). The README's
#   "Still to measure" list needs about three sessions. Rough times from the 2026-11-27 H100
#   session: tying_bench_c 2-3 min (compiles), neuron_bench ~1 min, paper_* 1.5 min each,
#   abl_* 2.5-3.5 min shared, tying_q / tying_none 5520 steps (episode 32 of 60 in 406 s, shared),
#   recursive > 8 min from scratch, neuron 6 min shared (50 epochs). The defaults fit one ~9-minute
#   command (the last ablations may stop at the deadline); then
#     bash .ci/gpu_check.sh 560 "tying_q" "" ""      and the same with tying_none (alone, to the end)
#     bash .ci/gpu_check.sh 560 "" "recursive neuron_e100" "recursive_alone recursive_compile"
# Data: copy it in here first (git-ignored) and name the folders in the device tool's `carry`:
#   mkdir -p data/ptb data/tiktoken data/cifar10-jpg
#   cp ../shared/data/ptb/* data/ptb/; cp ../shared/data/tiktoken/* data/tiktoken/
#   cp ../shared/data/cifar10-jpg/* data/cifar10-jpg/
set -uo pipefail
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$PWD/data/tiktoken}"
CIFAR_JPG=data/cifar10-jpg/cifar10-jpg-q75.tar.gz
OUT="${OUT:-out/gpu_check}"; DL="${1:-540}"; T0=$SECONDS
ALONE="${2-tying_bench_c neuron_bench paper_none paper_random2}"
SHARED="${3-abl_sequence abl_universal abl_roundrobin abl_random}"
LAST="${4-}"
rm -rf out/logs; mkdir -p "$OUT" out/logs; touch out/logs/jobs.txt  # a warm machine keeps out/: fresh logs

cmd() {  # job name -> command line
  local P="--preset=paper --steps_per_action=1 --eval_max_batches=10"
  case $1 in
    tying_bench)    echo python tying_rl.py --mode=bench --out_dir=out/tying_bench ;;
    tying_bench_c)  echo python tying_rl.py --mode=bench --compile=True --out_dir=out/tying_bench_c ;;
    neuron_bench)   echo python neuron_path.py --bench=True --model=vit_b_16 --weights=random --bench_images=20 \
                         --path_batch=20 --out_dir=out/np_bench ;;
    paper_none)     echo python tying_rl.py $P --agent=none --episodes=1 --out_dir=out/tying_rl/paper_none ;;
    # seed 1342: the random agent's two sweeps leave exactly 2 of 48 blocks trainable (the peer
    # reference's state; seed 1337 leaves 4). Only the agent's generator decides this, found on the CPU.
    paper_random2)  echo python tying_rl.py $P --agent=random --episodes=2 --seed=1342 --out_dir=out/tying_rl/paper_random2 ;;
    tying_q)        echo python tying_rl.py --out_dir=out/tying_rl/q ;;
    tying_none)     echo python tying_rl.py --agent=none --out_dir=out/tying_rl/none ;;
    abl_*)          echo nice python tying_rl.py --agent=${1#abl_} --episodes=10 --out_dir=out/tying_rl/$1 ;;
    recursive|recursive_alone) echo python recursive.py ;;
    # after recursive_alone (LAST): the fixed-shape compiled engine step; its summary.json replaces
    # recursive_alone's, whose table stays in out/logs/recursive_alone.txt and out/recursive/log.jsonl
    recursive_compile) echo python recursive.py --engine_compile=True ;;
    # offline: CIFAR-10 from its JPEG copy (data/cifar10-jpg), one use of imagefolder:PATH
    neuron)         echo python neuron_path.py --dataset=imagefolder:$CIFAR_JPG ;;
    neuron_e100)    echo python neuron_path.py --dataset=imagefolder:$CIFAR_JPG --epochs=100 \
                         --out_dir=out/neuron_path_e100 ;;
    *)              echo false unknown job "$1" ;;
  esac
}
left() { echo $((DL - (SECONDS - T0))); }
job() {  # job NAME: run cmd NAME for at most the time left; log to out/logs/NAME.txt; record rc, wall
  local name=$1 t=$SECONDS lim; lim=$(left)
  if [ "$lim" -lt 20 ]; then echo "$name skipped (deadline)" >> out/logs/jobs.txt; return; fi
  [ "$name" = recursive_alone ] && [ -f out/recursive/summary.json ] && cp out/recursive/summary.json out/recursive/summary_shared.json
  case $name in neuron|neuron_e100) wait "$PREP" 2>/dev/null ;; esac  # the CIFAR cache: never two writers
  local od; od=$(cmd "$name" | grep -o -- '--out_dir=[^ ]*' | cut -d= -f2)
  case $name in  # a fresh measurement on every call: the scripts refuse a used out_dir
    tying*|paper_*|abl_*|neuron_bench) [ -n "$od" ] && rm -rf "$od" ;;
  esac
  timeout -k 5 "$lim" $(cmd "$name") > "out/logs/$name.txt" 2>&1
  echo "$name rc=$? wall=$((SECONDS - t))s start=$((t - T0))s :: $(cmd "$name")" | tee -a out/logs/jobs.txt
  cp out/logs/jobs.txt "$OUT"/ 2>/dev/null  # something comes back even if the command itself is cut
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee out/logs/gpu.txt
python -c "import torch; print('torch', torch.__version__)" | tee -a out/logs/gpu.txt

# phase 1: timings, GPU alone. The PTB cache is built first (seconds; a job that trains at once would
# race it), the CIFAR cache on the CPU meanwhile
python -c "import data; data.prepare_text('ptb', 'gpt2')" > out/logs/prep.txt 2>&1
python -c "import data; data.load_images('imagefolder:$CIFAR_JPG', size=32)" >> out/logs/prep.txt 2>&1 &
PREP=$!
for j in $ALONE; do job "$j"; done
wait $PREP

# phase 2: concurrent runs; MPS lets their small kernels overlap (skipped if it does not start)
if [ -n "$SHARED" ] && [ "$(left)" -ge 20 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps; mkdir -p /tmp/mps
  if nvidia-cuda-mps-control -d 2>/dev/null && timeout 40 python -c "import torch; torch.ones(1, device='cuda')"; then
    echo "phase 2 under MPS" | tee -a out/logs/jobs.txt
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null; unset CUDA_MPS_PIPE_DIRECTORY
    echo "phase 2 without MPS" | tee -a out/logs/jobs.txt
  fi
  export OMP_NUM_THREADS=2
  for j in $SHARED; do job "$j" & done
  wait
  echo quit | nvidia-cuda-mps-control 2>/dev/null; unset CUDA_MPS_PIPE_DIRECTORY OMP_NUM_THREADS; sleep 2
fi

# phase 3: alone again (recursive_alone reuses every stage phase 2 cached)
for j in $LAST; do job "$j"; done

python - "$OUT" <<'EOF'
import json, pathlib, sys
def load(p):  # a job killed while writing its summary must not cost the others' results
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        return {"unreadable": str(e)}
res = {str(p): load(p) for n in ("summary.json", "summary_shared.json", "bench.json")
       for p in sorted(pathlib.Path("out").rglob(n))}
res["jobs"] = pathlib.Path("out/logs/jobs.txt").read_text().splitlines()
pathlib.Path(sys.argv[1], "results.json").write_text(json.dumps(res, indent=1, default=str))
EOF
for f in out/logs/*.txt; do echo "=== $f"; tail -n 15 "$f"; done > "$OUT/log.txt"
find out -type f -size +20M > out/logs/big.lst  # e.g. a ckpt.pt.tmp left by a job cut mid-save
tar czf "$OUT/out.tgz" --exclude='*.pt' --exclude='*.tmp' --exclude='*.part' --exclude=gpu_check -X out/logs/big.lst out
ls -la "$OUT"; cat out/logs/jobs.txt
