#!/usr/bin/env bash
# The GPU checks of the fast-recipe work, prepared to run in one call on a lent GPU machine
# (the `device` tool: its image has PyTorch and Lightning but not Hydra, and reaches nothing).
#
# Here, once:   bash benchmarks/gpu_checks.sh pack
#   fills .device/ (ignored by git; name it in the call's `carry`): the wheels the device image
#   lacks (hydra-core, omegaconf, antlr4) and the offline CIFAR-10 copy with its unpacker.
# There:        bash benchmarks/gpu_checks.sh quick          (about 5 minutes)
#   the CUDA-graph tests (forward and backward capture), then one epoch of the tutorial's
#   recipe eager, with --fast, and with --fast plus cuDNN autotuning and fused Adam, each
#   timed, each entry into $OUT.
# There:        bash benchmarks/gpu_checks.sh baseline       (about 4 minutes)
#   the tutorial's own code (benchmarks/tutorial_train.py) on the same card: the epochs that
#   fit in 200 s of its 50-epoch schedule, each one's time and test accuracy.
# There:        bash benchmarks/gpu_checks.sh bf16           (about 4 minutes)
#   benchmarks model_step: the published models' training step in fp32 and bf16, eager and
#   captured, MDEQ-large and the DEQ-Transformer medium at the WikiText-103 batch included.
# There:        bash benchmarks/gpu_checks.sh mutate         (about 4 minutes)
#   benchmarks/capture_mutants.py: hand-made mutants of solvers/capture.py against the
#   CUDA-graph tests (mutmut is not in the image, and reads them as untested on a CPU).
# There:        bash benchmarks/gpu_checks.sh reproduce cifar_tutorial   (the 50 epochs)
#   benchmarks/reproduce.py --fast, its entry into $OUT/cuda.json (copy that entry into
#   benchmarks/results/cuda.json here, under `reproduction`).
# One session's 15 device minutes hold `quick` and `baseline`, or `reproduce` alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.device
OUT=${OUT:-/tmp/deqlab-out}
DATA=/tmp/deqlab-data

setup() {  # on the device: install what the image lacks, unpack the data
  python3 -m pip install -q --no-index --no-deps "$PACK"/wheels/*.whl
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # deqlab from this clone, not installed
  [ -d "$DATA/cifar10/test" ] || python3 "$PACK/prepare.py" "$DATA" >/dev/null
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  mkdir -p "$OUT"
}

case "${1:-}" in
pack)
  mkdir -p "$PACK/wheels"
  python3 -m pip download -q --no-deps -d "$PACK/wheels" hydra-core==1.3.8 omegaconf==2.3.1
  python3 -m pip wheel -q --no-deps -w "$PACK/wheels" antlr4-python3-runtime==4.9.3
  cp ../shared/data/prepare.py ../shared/data/cifar10-jpg.tar.gz "$PACK/"
  du -sh "$PACK"
  ;;
quick)
  setup
  python3 -m pytest -q -p no:cacheprovider tests/test_capture.py tests/test_capture_backward.py \
    -k "captured or capture_refuses" 2>&1 | tail -15
  # one epoch each: eager (the baseline, rerun on this card), --fast, and --fast with cuDNN
  # autotuning and Adam's fused kernel (levers kept only if they pay)
  for variant in eager fast tuned; do
    flags=() extra=()
    [ "$variant" != eager ] && flags=(--fast)
    [ "$variant" = tuned ] && extra=(+trainer.benchmark=true +optim.optimizer.fused=true)
    /usr/bin/time -f "$variant: %e s" python3 -m benchmarks.reproduce --experiment cifar_tutorial \
      --data "$DATA" "${flags[@]}" --runs "/tmp/runs-$variant" --out "$OUT/one_epoch_$variant.json" \
      -- trainer.max_epochs=1 "${extra[@]}"
  done
  ;;
baseline)
  setup
  python3 -m benchmarks.tutorial_train --data "$DATA" --epochs 50 --max-seconds 200 \
    --out "$OUT/tutorial_code.json"
  ;;
bf16)
  setup
  python3 -m benchmarks --only model_step --repeats 3 --device cuda | tee "$OUT/model_step.txt"
  cp benchmarks/results/cuda.json "$OUT/"
  ;;
mutate)
  setup
  python3 -m benchmarks.capture_mutants
  ;;
reproduce)
  setup
  python3 -m benchmarks.reproduce --experiment "${2:?experiment}" --data "$DATA" --fast \
    --out "$OUT/cuda.json"
  ;;
*)
  echo "usage: $0 pack | quick | baseline | bf16 | mutate | reproduce EXPERIMENT" >&2
  exit 2
  ;;
esac
