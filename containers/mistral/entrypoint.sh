#!/bin/sh
# Start the Mistral runner from the container's environment.
#
#   HELIX_GET_JOB_URL   the claim URL; its query names the work to take, e.g.
#                       http://api:8080/api/v1/worker/task?mode=create&type=text&model_name=mistralai/Mistral-7B-Instruct-v0.1
#                       (mode=finetune for a fine-tuning runner). model_name is also the model loaded: a hub id
#                       (downloaded into HF_HOME on first start) or a path inside the container.
#   HELIX_RUNNER_TOKEN  a runner token (`helix runner-token create`).
#   HF_HOME             the Hugging Face cache; put it on a volume so weights are downloaded once (default /data/hf).
#   HELIX_RUNNER_CACHE  fetched files and unpacked adapters (default /data/helix-runner).
# Runner options, as environment variables (or as arguments, which win):
#   HELIX_RUNNER_MAX_PARALLEL=8         chats generated together on the one loaded model
#   HELIX_RUNNER_DEVICE=cuda            auto (default), cuda or cpu
#   HELIX_RUNNER_DTYPE=bfloat16         auto (default), float32, float16, bfloat16
#   HELIX_RUNNER_GPU_MEMORY="0:20GiB 1:20GiB"   most memory per GPU
#   HELIX_RUNNER_CPU_MEMORY=32GiB       offload what does not fit on the GPUs
#   HELIX_RUNNER_QUANTIZE=8bit|4bit     load in 8 or 4 bits with bitsandbytes (GPU only)
#   HELIX_RUNNER_NAME, HELIX_LOG_LEVEL
set -eu

if [ -z "${HELIX_GET_JOB_URL:-}" ]; then
    echo "helix-mistral: set HELIX_GET_JOB_URL to the API's claim URL, e.g." >&2
    echo "  http://api:8080/api/v1/worker/task?mode=create&type=text&model_name=mistralai/Mistral-7B-Instruct-v0.1" >&2
    exit 2
fi
if [ -z "${HELIX_RUNNER_TOKEN:-}" ]; then
    echo "helix-mistral: set HELIX_RUNNER_TOKEN to a runner token (make one with: helix runner-token create)" >&2
    exit 2
fi

export HF_HOME="${HF_HOME:-/data/hf}"
export HELIX_RUNNER_CACHE="${HELIX_RUNNER_CACHE:-/data/helix-runner}"
# Telemetry hosts may be unreachable from a GPU box: axolotl would spend minutes retrying them.
export AXOLOTL_DO_NOT_TRACK="${AXOLOTL_DO_NOT_TRACK:-1}" DO_NOT_TRACK="${DO_NOT_TRACK:-1}" WANDB_MODE="${WANDB_MODE:-disabled}"
mkdir -p "$HF_HOME" "$HELIX_RUNNER_CACHE"

case "${HELIX_RUNNER_QUANTIZE:-}" in
    "") ;;
    8bit) set -- --load-in-8bit "$@" ;;
    4bit) set -- --load-in-4bit "$@" ;;
    *) echo "helix-mistral: HELIX_RUNNER_QUANTIZE must be 8bit or 4bit, not ${HELIX_RUNNER_QUANTIZE}" >&2; exit 2 ;;
esac

exec helix-runner --backend mistral "$@"
