#!/bin/sh
# Start the SDXL runner from the container's environment.
#
#   HELIX_GET_JOB_URL   the claim URL; its query names the work to take, e.g.
#                       http://api:8080/api/v1/worker/task?mode=create&type=image&model_name=stabilityai/stable-diffusion-xl-base-1.0
#                       (mode=finetune for a fine-tuning runner). model_name is also the pipeline loaded: a hub
#                       id (downloaded into HF_HOME on first start) or a path inside the container.
#   HELIX_RUNNER_TOKEN  a runner token (`helix runner-token create`).
#   HF_HOME             the Hugging Face cache; put it on a volume so weights are downloaded once (default /data/hf).
#   HELIX_RUNNER_CACHE  fetched inputs and unpacked adapters (default /data/helix-runner).
# Runner options, as environment variables (or as arguments, which win):
#   HELIX_RUNNER_DEVICE=cuda            auto (default), cuda or cpu
#   HELIX_RUNNER_DTYPE=float16          auto (default: bfloat16 or float16 on a GPU), float32, float16, bfloat16
#   HELIX_RUNNER_GPU_MEMORY=0:20GiB     the most GPU memory the pipeline may take (checked before claiming work)
#   HELIX_RUNNER_NAME, HELIX_LOG_LEVEL
# One pipeline serves one task at a time; LoRA adapters are loaded onto it per task and unloaded after.
set -eu

if [ -z "${HELIX_GET_JOB_URL:-}" ]; then
    echo "helix-sdxl: set HELIX_GET_JOB_URL to the API's claim URL, e.g." >&2
    echo "  http://api:8080/api/v1/worker/task?mode=create&type=image&model_name=stabilityai/stable-diffusion-xl-base-1.0" >&2
    exit 2
fi
if [ -z "${HELIX_RUNNER_TOKEN:-}" ]; then
    echo "helix-sdxl: set HELIX_RUNNER_TOKEN to a runner token (make one with: helix runner-token create)" >&2
    exit 2
fi

export HF_HOME="${HF_HOME:-/data/hf}"
export HELIX_RUNNER_CACHE="${HELIX_RUNNER_CACHE:-/data/helix-runner}"
mkdir -p "$HF_HOME" "$HELIX_RUNNER_CACHE"

exec helix-runner --backend sdxl "$@"
