#!/usr/bin/env bash
# normbench's checks on a CUDA GPU, in one run (a few minutes on one GPU):
#   1. the Triton kernels' tests on CUDA (not the interpreter): tests/test_kernels_triton.py,
#      and the operators through the dispatcher (opcheck, the functional against torch's,
#      the fused ReLU) from tests/test_kernels.py and tests/test_fused_relu.py;
#   2. normbench bench --device cuda: the Triton kernels against torch's cuDNN BatchNorm at
#      the four CPU shapes scaled to a GPU, and at batch 2, with the GPU's copy bandwidth;
#   3. a 1-epoch `normbench run device=cuda` of every norm on the embedded digits set.
# Its figures go to $OUT (default results/gpu_check): tests.log, bench.csv and bench.txt,
# runs.txt (each run's line) and results.txt (the runs' table), and summary.txt.
# Usage (from the repository, with the project installed): bash benchmarks/gpu_check.sh
set -uo pipefail

OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
status=0

python - <<'EOF' || exit 2
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device here")
print("gpu_check:", torch.cuda.get_device_name(), "| torch", torch.__version__)
EOF

echo "== 1. Triton kernels on CUDA" | tee "$OUT/summary.txt"
unset TRITON_INTERPRET
python -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py \
  "tests/test_kernels.py::test_triton_opcheck" \
  "tests/test_kernels.py::test_triton_backend_matches_torch_through_the_functional" \
  tests/test_fused_relu.py 2>&1 | tee "$OUT/tests.log" | tail -3 | tee -a "$OUT/summary.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. normbench bench --device cuda" | tee -a "$OUT/summary.txt"
# the CPU shapes (128x16x32x32, 128x32x16x16, 128x64x8x8, 256x32x16x16) scaled to a GPU
normbench bench --device cuda --repeats 200 \
  --shape 256,64,56,56 --shape 256,128,28,28 --shape 256,256,14,14 --shape 512,128,28,28 \
  --shape 2,64,56,56 --out "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.txt" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python - "$OUT/bench.csv" <<'EOF' | tee -a "$OUT/summary.txt"
import sys
import pandas as pd
frame = pd.read_csv(sys.argv[1])
rows = frame[frame["impl"] != "copy"]
for shape, group in rows.groupby("shape", sort=False):
    cells = [
        f"{r.impl} {r.median_ms:.3f} ms {r.speedup_vs_torch:.2f}x {100 * r.frac_of_machine_bw:.0f}%mem"
        for r in group.itertuples()
    ]
    print(f"{shape}: " + " | ".join(cells))
EOF

echo "== 3. one epoch of every norm on CUDA" | tee -a "$OUT/summary.txt"
: > "$OUT/runs.txt"
for norm in $(python -c "from normbench.norms import norm_names; print(' '.join(norm_names()))"); do
  line=$(normbench run device=cuda norm="$norm" epochs=1 name=gpu_check out_dir="$OUT/runs" \
    --force 2>"$OUT/run_$norm.err" | tail -1; exit "${PIPESTATUS[0]}")
  rc=$?
  echo "$norm: rc=$rc $line" | tee -a "$OUT/runs.txt"
  [ "$rc" -eq 0 ] || status=1
done
cat "$OUT/runs.txt" >> "$OUT/summary.txt"
normbench results "$OUT/runs/gpu_check" > "$OUT/results.txt" 2>&1 || status=1

echo "gpu_check: exit $status; figures in $OUT" | tee -a "$OUT/summary.txt"
exit $status
