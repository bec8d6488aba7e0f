#!/usr/bin/env bash
# The GPU measurements of doc/PERFORMANCE.md, one after another, each under its own time limit, each report
# saved as soon as it is done, so that a short loan of a GPU machine gives what it can.
#
#   bench/gpu_measurements.sh OUT_DIR [MEASUREMENT ...]
#
# MEASUREMENT (all, in this order, when none is named):
#   headline  SD 1.5, 512 px, batch 8, bf16, SDPA, UNet + text encoder: bare step and train.py (--full)
#   cached    the same with cache_latents
#   levers    bench/step_levers.py on the cached setting: the bare step with channels_last, fused AdamW, bf16
#             frozen parts, bf16 weights, bf16 norms, then combined, and at batch 16 and 32 (about 1.5 min)
#   batch1    batch 1, AdamW8bit, gradient checkpointing: peak memory (target under 10 GB)
#   example   UNet only, against diffusers' train_text_to_image.py ($DIFFUSERS_EXAMPLE), with and without
#             cache_latents in train.py
#   compile   the bare step with torch.compile
#
# Each writes OUT_DIR/<measurement>.md (the bench's report) and OUT_DIR/<measurement>.log (everything it
# printed). Environment: PYTHON (default python3), DIFFUSERS_EXAMPLE (the example script's path; without it,
# `example` is skipped and says why), STEPS (timed steps, default 10), LIMIT_S (seconds per measurement,
# default 200), WORKDIR (where the model folders go, about 4.3 GB each; default the system's temporary
# folder). MODEL, RESOLUTION, PRECISION and DEVICE (sd15, 512, bf16, cuda) are for trying the script out on
# a CPU with the tiny model (MODEL=tiny RESOLUTION=256 PRECISION=fp32 DEVICE=cpu).
set -u
out=${1:?usage: bench/gpu_measurements.sh OUT_DIR [headline cached levers batch1 example compile]}
shift
measurements=${*:-headline cached levers batch1 example compile}
python=${PYTHON:-python3}
steps=${STEPS:-10}
limit=${LIMIT_S:-200}
cd "$(dirname "$0")/.."
mkdir -p "$out"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$python" -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)" 2>&1
  "$python" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
  df -h "${WORKDIR:-${TMPDIR:-/tmp}}" 2>&1 | tail -1
} | tee "$out/machine.txt"

measure() {  # name, the script under bench/, then its own arguments (the model, resolution, precision,
             # device, steps and warm-up are added)
  local name=$1 script=$2
  shift 2
  echo "== $name: bench/$script $*"
  local started=$SECONDS
  timeout --kill-after=20 "$limit" "$python" -u "bench/$script" --model "${MODEL:-sd15}" \
      --resolution "${RESOLUTION:-512}" --precision "${PRECISION:-bf16}" --device "${DEVICE:-cuda}" \
      --steps "$steps" --warmup 3 "$@" >"$out/$name.log" 2>&1
  local status=$?
  # The report is what follows the last line that names the command (train_throughput.py prints the bare
  # step's table early, then the whole report), without FlopCounterMode's notes.
  grep -v "^There are modules" "$out/$name.log" \
    | awk '/^`python bench\//{report=""} {report=report $0 "\n"} END{printf "%s", report}' >"$out/$name.md"
  echo "   exit status $status after $((SECONDS - started)) s"
  tail -n 30 "$out/$name.md"
}

bench() {  # name, then bench/train_throughput.py's arguments
  local name=$1
  shift
  measure "$name" train_throughput.py --repeats 1 --trainer_timeout_s $((limit * 3 / 5)) \
      ${WORKDIR:+--workdir "$WORKDIR"} "$@"
}

for measurement in $measurements; do
  case $measurement in
    headline) bench headline --batch 8 --train_text_encoder --full ;;
    cached) bench cached --batch 8 --train_text_encoder --full --cache_latents ;;
    levers) measure levers step_levers.py --batch 8 --train_text_encoder --cache_latents --batches 16 32 ;;
    batch1) bench batch1 --batch 1 --optimizer adamw8bit --gradient_checkpointing --full ;;
    example)
      if [ -z "${DIFFUSERS_EXAMPLE:-}" ]; then
        echo "== example: skipped: set DIFFUSERS_EXAMPLE to diffusers' examples/text_to_image/train_text_to_image.py" \
          | tee "$out/example.md"
      elif ! "$python" -c "import datasets, torchvision" 2>/dev/null; then
        echo "== example: skipped: the example needs the datasets and torchvision packages" | tee "$out/example.md"
      else
        bench example --batch 8 --full --diffusers_example "$DIFFUSERS_EXAMPLE"
        bench example_cached --batch 8 --full --cache_latents --diffusers_example "$DIFFUSERS_EXAMPLE"
      fi ;;
    compile) bench compile --batch 8 --train_text_encoder --compile ;;
    *) echo "unknown measurement: $measurement (headline cached levers batch1 example compile)" >&2; exit 2 ;;
  esac
done
