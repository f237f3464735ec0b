#!/usr/bin/env bash
# The GPU measurements not yet made (speed target, epoch times, parallel runs, NCCL), as steps of at most 10 minutes.
#
#   scripts/gpu_prepare.sh                 # here, once: wheels the GPU image lacks -> .whl/, CIFAR-10 -> .cache/data/
#   scripts/gpu_session.sh check           # on the GPU machine (with .whl/ and .cache/data/ copied along)
#   scripts/gpu_session.sh bench           # ResNet-20 b128 eager + compiled, every quantizer (the 1.2x target)
#   scripts/gpu_session.sh epochs          # CIFAR-10 ResNet-20, 3 epochs FP and APoT W4A4: per-epoch time
#   scripts/gpu_session.sh parallel        # 4 short cells, --jobs 1 vs --jobs 4 on one GPU
#   scripts/gpu_session.sh bench-more      # b512 and MobileNet-V2 (CIFAR), appended to the same result file
#   scripts/gpu_session.sh members         # K runs as one batched step x amp: bench grid + a batched digits run
#
# Results go to results/bench/ (commit them) and, when $OUT is set (an output folder the GPU machine returns), are copied there too.
# QUICK=1 shrinks every step (CPU dry run of this script: QUICK=1 DEVICE=cpu scripts/gpu_session.sh epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: scripts/gpu_session.sh check|bench|epochs|parallel|bench-more|members}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
cifar=${QREPRO_CIFAR10:-.cache/data/cifar10-jpeg.tar.gz}
[ -e "$cifar" ] || { echo "error: no CIFAR-10 archive at $cifar; set QREPRO_CIFAR10" >&2; exit 2; }
slug=$("$PY" - "$DEVICE" <<'EOF'
import sys, torch
from qrepro.bench import device_slug
print(device_slug(torch.device(sys.argv[1] if sys.argv[1] != "cuda" or torch.cuda.is_available() else "cpu")))
EOF
)
mkdir -p results/bench
save() { if [ -n "${OUT:-}" ]; then cp -r "$@" "$OUT"/ 2>/dev/null || true; fi; }
portable() { "$PY" -m qrepro.tables.portable --text; }  # logs committed under results/ hold no machine paths

if [ "$QUICK" = 1 ]; then
  bench_steps=(--warmup 1 --steps 2 --window 1) epochs=2 subset=(dataset.subset=512) cells_epochs=1
else
  bench_steps=(--warmup 5 --steps 10 --window 5) epochs=3 subset=() cells_epochs=2
fi

case "$step" in
check)  # the CUDA-only tests (CUDA graphs == eager) and the DDP tests; one torchrun rank with NCCL
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  "$PY" -m pytest -q -x tests/test_compile.py tests/test_ddp.py 2>&1 | portable | tee results/bench/"$slug"-check.log
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m qrepro.train +experiment=demo_digits_fp \
    trainer.device="$DEVICE" trainer.epochs=1 logger=none trainer.progress=false out_root=runs/_gpu_check \
    2>&1 | portable | tee -a results/bench/"$slug"-check.log
  save results/bench/"$slug"-check.log ;;
bench)
  "$PY" -m qrepro.bench --device "$DEVICE" --models resnet20 --batch-sizes 128 "${bench_steps[@]}" \
    --note "scripts/gpu_session.sh bench"
  save results/bench/"$slug".json results/bench/"$slug".md ;;
bench-more)
  for m in resnet20:512 mobilenet_v2_cifar:128 mobilenet_v2_cifar:512; do
    "$PY" -m qrepro.bench --device "$DEVICE" --models "${m%%:*}" --batch-sizes "${m##*:}" --modes compiled \
      "${bench_steps[@]}" --append --note "scripts/gpu_session.sh bench-more"
  done
  save results/bench/"$slug".json results/bench/"$slug".md ;;
epochs)  # per-epoch time and the 200-epoch estimate, FP vs APoT W4A4, the trainer's default fast path
  for q in fp:w32a32 apot:w4a4; do
    "$PY" -m qrepro.train dataset=cifar10 dataset.root="$cifar" model=resnet20 quantizer="${q%%:*}" \
      precision="${q##*:}" trainer.epochs="$epochs" trainer.device="$DEVICE" logger=none trainer.progress=false \
      "${subset[@]}" out_root=runs/_gpu_epochs name=epochs_"${q%%:*}"
  done
  "$PY" scripts/epoch_times.py runs/_gpu_epochs --out results/bench/"$slug"-epochs
  save results/bench/"$slug"-epochs.md results/bench/"$slug"-epochs.json ;;
parallel)  # the same 4 cells one at a time, then 4 at once on the one GPU (docs/speed.md section 4)
  sweep="dataset=cifar10 dataset.root=$cifar model=resnet20 quantizer=apot precision=w4a4 seed=0,1,2,3"
  sweep="$sweep trainer.epochs=$cells_epochs logger=none ${subset[*]}"
  for j in 1 4; do
    "$PY" scripts/run_parallel.py --jobs "$j" --device "$DEVICE" --log-dir runs/_gpu_parallel/jobs$j \
      --sweep "$sweep out_root=runs/_gpu_parallel/out$j"
    "$PY" -m qrepro.tables.portable < runs/_gpu_parallel/jobs$j/summary.json > results/bench/"$slug"-parallel-jobs$j.json
  done
  save results/bench/"$slug"-parallel-jobs1.json results/bench/"$slug"-parallel-jobs4.json ;;
members)  # docs/speed.md section 6/7: batched members (K = 1, 2, 4, 8) x amp (off, bf16), eager and compiled
  "$PY" -m qrepro.bench --device "$DEVICE" --models resnet20 --batch-sizes 128 --methods fp,apot,sat,tr \
    --members 1,2,4,8 --amp off,bf16 --modes eager "${bench_steps[@]}" --tag members \
    --note "scripts/gpu_session.sh members"
  "$PY" -m qrepro.train +experiment=demo_digits_apot_w4a4 trainer.members=4 trainer.amp=bf16 trainer.epochs=1 \
    trainer.device="$DEVICE" logger=none trainer.progress=false out_root=runs/_gpu_members \
    2>&1 | portable | tee results/bench/"$slug"-members-run.log
  save results/bench/"$slug"-members.json results/bench/"$slug"-members.md results/bench/"$slug"-members-run.log ;;
*) echo "error: unknown step '$step'; use check|bench|epochs|parallel|bench-more|members" >&2; exit 2 ;;
esac
