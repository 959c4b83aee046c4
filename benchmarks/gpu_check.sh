#!/usr/bin/env bash
# normbench's checks on a CUDA GPU, in one run of about five minutes on one GPU:
#   1. the Triton kernels' tests on CUDA (not the interpreter): tests/test_kernels_triton.py,
#      and the operators through the dispatcher (opcheck, the functional against torch's,
#      the fused ReLU) from tests/test_kernels.py and tests/test_fused_relu.py;
#   2. normbench bench --device cuda: the Triton kernels against torch's cuDNN BatchNorm at
#      the four CPU shapes scaled to a GPU, and at batch 2, with the GPU's copy bandwidth;
#   3. a 1-epoch `normbench run device=cuda` of every norm on the embedded digits set;
#   4. small_cnn on MNIST-sized inputs (28x28, batch 128): custom_bn against torch_bn, each
#      in both memory layouts (memory_format=auto keeps CUDA contiguous until measured);
#   5. precision and processes: small_cnn at 28x28 in float32, bf16 and fp16 (custom_bn and
#      torch_bn; the CPU has no fp16), and, where the machine has two GPUs or more, a
#      2-process run on NCCL (sync_bn, 64 images a process) beside the 1-process custom_bn
#      run of the same global batch of 128, whose training losses it should match.
# Its figures go to $OUT (default results/gpu_check), ten files, so that the device tool
# brings them all back: summary.txt (the machine and every step's outcome), tests.log,
# bench.csv and bench.txt, runs.txt (each run's last line, and the end of its errors when
# it failed), runs.csv and results.txt (the runs' rows and table), layout.txt,
# precision.txt and processes.txt. Each step has a time limit (GPU_CHECK_LIMITS, seconds for
# the five steps), so the whole run stays under the device tool's 10 minutes a command and
# what was measured comes back. GPU_CHECK_STEPS picks steps (default "1 2 3 4 5"), to run
# one again alone.
#
# Usage, from the repository with the project installed: bash benchmarks/gpu_check.sh
# On the device tool's GPU machine, whose image holds torch, triton, pandas, typer and rich
# but not Hydra: first, here, `bash benchmarks/gpu_wheels.sh` (it writes the missing
# packages' wheels to .whl/, which git ignores); then
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# The script installs the wheels and runs normbench from the checkout.
# DEVICE=cpu runs the same steps on the CPU (Triton's interpreter, the CPU bench shapes,
# fewer repeats), to try the script itself on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-results/gpu_check}
DEVICE=${DEVICE:-cuda}
read -r LIMIT_TESTS LIMIT_BENCH LIMIT_RUNS LIMIT_LAYOUT LIMIT_PRECISION \
  <<<"${GPU_CHECK_LIMITS:-185 120 125 55 75}"
LIMIT_PRECISION=${LIMIT_PRECISION:-75}  # an older four-limit GPU_CHECK_LIMITS
STEPS=" ${GPU_CHECK_STEPS:-1 2 3 4 5} "
if ! [[ "$STEPS" =~ ^[[:space:]1-5]+$ ]] || [[ "$STEPS" =~ ^[[:space:]]*$ ]]; then
  echo "gpu_check: GPU_CHECK_STEPS=${GPU_CHECK_STEPS-}: give step numbers 1-5, with spaces" >&2
  exit 2
fi
# wanted N: step N is among GPU_CHECK_STEPS
wanted() { [[ "$STEPS" == *" $1 "* ]]; }
mkdir -p "$OUT"
status=0
PY=$(command -v python || command -v python3)

# 0. Set-up where the project is not installed (the device machine): the wheels from .whl/
# into a folder of their own, and a `normbench` command that runs this checkout.
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu_check: Hydra is not installed and there is no .whl folder: run" \
      "bash benchmarks/gpu_wheels.sh here and carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/normbench_site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/normbench_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v normbench >/dev/null; then
  mkdir -p /tmp/normbench_bin
  printf '#!%s\nfrom normbench.cli import app\napp(prog_name="normbench")\n' "$PY" \
    >/tmp/normbench_bin/normbench
  chmod +x /tmp/normbench_bin/normbench
  export PATH=/tmp/normbench_bin:$PATH PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

"$PY" - "$DEVICE" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import platform
import sys

import torch

device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device here (DEVICE=cpu tries the script on the CPU)")
try:
    import triton

    tv = triton.__version__
except ImportError:
    tv = "not installed"
cpu = next(
    (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
    platform.processor(),
)
gpu = torch.cuda.get_device_name() if device == "cuda" else "none (DEVICE=cpu)"
print(f"gpu_check: {gpu} | CPU {cpu} | torch {torch.__version__} | triton {tv}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2

# step NAME LIMIT CMD...: CMD under a time limit; a failure or a timeout sets the exit status
step() {
  local name=$1 limit=$2
  shift 2
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu_check: $name stopped at its limit of $limit s" | tee -a "$OUT/summary.txt"
  fi
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

if wanted 1; then
echo "== 1. Triton kernels on ${DEVICE}" | tee -a "$OUT/summary.txt"
parallel=()
# pytest-xdist, where installed (the device image has it), compiles the kernels in parallel
if [ "$DEVICE" = cuda ] && "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
[ "$DEVICE" = cuda ] && unset TRITON_INTERPRET
start=$SECONDS
step tests "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
  tests/test_kernels_triton.py \
  "tests/test_kernels.py::test_triton_opcheck" \
  "tests/test_kernels.py::test_triton_backend_matches_torch_through_the_functional" \
  tests/test_fused_relu.py >"$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
echo "(tests: $((SECONDS - start)) s)" | tee -a "$OUT/summary.txt"
fi

if wanted 2; then
echo "== 2. normbench bench --device ${DEVICE}" | tee -a "$OUT/summary.txt"
if [ "$DEVICE" = cuda ]; then
  # the CPU shapes (128x16x32x32, 128x32x16x16, 128x64x8x8, 256x32x16x16) scaled to a GPU
  shapes=(--shape 256,64,56,56 --shape 256,128,28,28 --shape 256,256,14,14
    --shape 512,128,28,28 --shape 2,64,56,56)
  repeats=200
else
  shapes=()
  repeats=20
fi
start=$SECONDS
step bench "$LIMIT_BENCH" normbench bench --device "$DEVICE" --repeats "$repeats" "${shapes[@]}" \
  --out "$OUT/bench.csv" >"$OUT/bench.txt" 2>&1
if [ -s "$OUT/bench.csv" ]; then
  "$PY" - "$OUT/bench.csv" <<'EOF' | tee -a "$OUT/summary.txt"
import sys

import pandas as pd

frame = pd.read_csv(sys.argv[1])
rows = frame[frame["impl"] != "copy"]
for shape, group in rows.groupby("shape", sort=False):
    cells = [
        f"{r.impl} {r.median_ms:.3f} ms {r.speedup_vs_torch:.2f}x"
        f" {100 * r.frac_of_machine_bw:.0f}%mem"
        for r in group.itertuples()
    ]
    print(f"{shape}: " + " | ".join(cells))
EOF
else
  tail -5 "$OUT/bench.txt" | tee -a "$OUT/summary.txt"
fi
echo "(bench: $((SECONDS - start)) s)" | tee -a "$OUT/summary.txt"
fi

if wanted 3; then
echo "== 3. one epoch of every norm on ${DEVICE}" | tee -a "$OUT/summary.txt"
runs=$(mktemp -d)
: >"$OUT/runs.txt"
start=$SECONDS
for norm in $("$PY" -c "from normbench.norms import norm_names; print(' '.join(norm_names()))"); do
  left=$((LIMIT_RUNS - (SECONDS - start)))
  if [ "$left" -le 0 ]; then
    echo "$norm: not run, step 3's limit of $LIMIT_RUNS s is spent" | tee -a "$OUT/runs.txt"
    status=1
    continue
  fi
  step "run $norm" "$left" normbench run device="$DEVICE" norm="$norm" epochs=1 name=gpu_check \
    out_dir="$runs" --force >"$runs/$norm.out" 2>"$runs/$norm.err"
  rc=$?
  echo "$norm: rc=$rc $(tail -1 "$runs/$norm.out")" | tee -a "$OUT/runs.txt"
  [ "$rc" -eq 0 ] || tail -5 "$runs/$norm.err" | sed 's/^/    /' >>"$OUT/runs.txt"
done
echo "(runs: $((SECONDS - start)) s)" | tee -a "$OUT/runs.txt"
cat "$OUT/runs.txt" >>"$OUT/summary.txt"
normbench results "$runs/gpu_check" >"$OUT/results.txt" 2>&1 || status=1
[ -f "$runs/gpu_check/runs.csv" ] && cp "$runs/gpu_check/runs.csv" "$OUT/runs.csv"
rm -rf "$runs"
fi

if wanted 4; then
echo "== 4. small_cnn at 28x28 on ${DEVICE}: custom_bn vs torch_bn, both memory layouts" |
  tee -a "$OUT/summary.txt"
start=$SECONDS
# COLUMNS: rich's table as wide as the variants' names, one line a row
COLUMNS=160 step layout "$LIMIT_LAYOUT" "$PY" benchmarks/norm_speed.py --synthetic-mnist 6000 \
  --epochs 1 --repeats 2 --batch-sizes 128 --override device="$DEVICE" --norms \
  torch_bn:memory_format=contiguous custom_bn:memory_format=contiguous \
  torch_bn:memory_format=channels_last custom_bn:memory_format=channels_last \
  >"$OUT/layout.txt" 2>&1
tail -11 "$OUT/layout.txt" | tee -a "$OUT/summary.txt"
echo "(layout: $((SECONDS - start)) s)" | tee -a "$OUT/summary.txt"
fi

if wanted 5; then
  echo "== 5. precision and processes on ${DEVICE}" | tee -a "$OUT/summary.txt"
  start=$SECONDS
  variants=(custom_bn custom_bn:precision=bf16 torch_bn torch_bn:precision=bf16)
  # fp16 (with its gradient scaler) runs on CUDA only: the CPU refuses it in one line
  [ "$DEVICE" = cuda ] && variants+=(custom_bn:precision=fp16 torch_bn:precision=fp16)
  COLUMNS=160 step precision "$LIMIT_PRECISION" "$PY" benchmarks/norm_speed.py \
    --synthetic-mnist 6000 --epochs 1 --repeats 2 --batch-sizes 128 \
    --override device="$DEVICE" --norms "${variants[@]}" >"$OUT/precision.txt" 2>&1
  tail -13 "$OUT/precision.txt" | tee -a "$OUT/summary.txt"
  gpus=0
  [ "$DEVICE" = cuda ] && gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  gpus=${gpus:-0}
  : >"$OUT/processes.txt"
  if [ "$DEVICE" = cuda ] && [ "$gpus" -lt 2 ]; then
    echo "processes: one GPU here ($gpus): no NCCL check" | tee -a "$OUT/processes.txt"
  else
    # the same global batch on 1 and 2 processes (NCCL on CUDA, gloo on the CPU); their
    # per-epoch training losses compared from metrics.csv
    dp=$(mktemp -d)
    common=(device="$DEVICE" epochs=2 batch_size=128 name=gpu_check_dp out_dir="$dp"
      eval.bn_stats=false)
    for setting in "norm=custom_bn processes=1" "norm=sync_bn processes=2"; do
      left=$((LIMIT_PRECISION - (SECONDS - start)))
      if [ "$left" -le 0 ]; then
        echo "$setting: not run, step 5's limit of $LIMIT_PRECISION s is spent" |
          tee -a "$OUT/processes.txt"
        status=1
        continue
      fi
      # shellcheck disable=SC2086  # the setting's words are overrides
      step "processes $setting" "$left" normbench run "${common[@]}" \
        $setting --force >"$dp/out.txt" 2>"$dp/err.txt"
      echo "$setting: rc=$? $(tail -1 "$dp/out.txt")" | tee -a "$OUT/processes.txt"
      tail -3 "$dp/err.txt" | sed 's/^/    /' >>"$OUT/processes.txt"
    done
    "$PY" - "$dp/gpu_check_dp" <<'EOF' 2>&1 | tee -a "$OUT/processes.txt"
import json
import sys
from pathlib import Path

import pandas as pd

losses = {}
for summary in Path(sys.argv[1]).glob("runs/*/summary.json"):
    record = json.loads(summary.read_text())
    metrics = pd.read_csv(summary.parent / "metrics.csv")
    train = metrics[(metrics.split == "train") & (metrics.metric == "loss")]
    losses[f"{record['norm']} x{record['world_size']}"] = train.set_index("epoch").value
print("train loss per epoch:", {k: [round(v, 5) for v in s] for k, s in losses.items()})
if len(losses) != 2:
    raise SystemExit("processes: the two runs did not both record their losses")
one, two = losses.values()
difference = ((one - two).abs() / one.abs()).max()
print(f"largest relative difference: {difference:.2e}")
if not difference < 1e-4:  # float32 sums in another order: 1.4e-5 on the CPU
    raise SystemExit("processes: the 2-process losses differ from the 1-process run's")
EOF
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    rm -rf "$dp"
  fi
  cat "$OUT/processes.txt" >>"$OUT/summary.txt"
  echo "(precision and processes: $((SECONDS - start)) s)" | tee -a "$OUT/summary.txt"
fi

echo "gpu_check: exit $status; figures in $OUT" | tee -a "$OUT/summary.txt"
exit $status
