#!/usr/bin/env bash
# Create (or re-create) the llmux pod: pod llmux_pod publishing 127.0.0.1:8081, and
# container llmux_ctr in it with the GPU (CDI), the config and the models mounted
# read-only. Running it again replaces both. See deploy/podman/README.md.
set -euo pipefail

POD=llmux_pod
CTR=llmux_ctr
PUBLISH=127.0.0.1:8081:8081
IMAGE=localhost/llmux:cuda
CONFIG_DIR="${HOME}/llmux/config"
MODELS_DIR="${HOME}/llmux/models"
CONFIG_FILE=llmux.yaml
STATE_VOLUME=llmux-state
GPU=1
KEEP_ID=0
# llmux drains requests for up to server.shutdown_grace_s (30 s by default): podman
# waits longer than that before it sends SIGKILL.
STOP_TIMEOUT=45
LLMUX_UID=10001
HEALTH_CMD="/opt/venv/bin/python -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/health', timeout=4)\""

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Create the pod ${POD} (publishing ${PUBLISH}) and run the llmux
container ${CTR} in it. An existing pod or container of these names is
removed first (the container gets ${STOP_TIMEOUT} s to drain its requests).

Options:
  --image IMAGE        container image                      [${IMAGE}]
  --config-dir DIR     host directory mounted at /config:ro  [${CONFIG_DIR}]
                       (the config file and api_keys.yaml: llmux refuses to serve
                       0.0.0.0 without API keys)
  --models-dir DIR     host directory mounted at /models:ro  [${MODELS_DIR}]
  --config-file NAME   config file inside --config-dir      [${CONFIG_FILE}]
  --state-volume NAME  volume for measured footprints       [${STATE_VOLUME}]
  --cpu                no GPU (omit --device nvidia.com/gpu=all)
  --keep-id            rootless: map your user to the container's llmux user, so
                       files only you can read in --config-dir stay readable
  -h, --help           show this help
EOF
}

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --image) IMAGE="${2:?--image needs a value}"; shift 2 ;;
        --config-dir) CONFIG_DIR="${2:?--config-dir needs a value}"; shift 2 ;;
        --models-dir) MODELS_DIR="${2:?--models-dir needs a value}"; shift 2 ;;
        --config-file) CONFIG_FILE="${2:?--config-file needs a value}"; shift 2 ;;
        --state-volume) STATE_VOLUME="${2:?--state-volume needs a value}"; shift 2 ;;
        --cpu) GPU=0; shift ;;
        --keep-id) KEEP_ID=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

[[ -d "${CONFIG_DIR}" ]] || die "no config directory ${CONFIG_DIR} (see --config-dir)"
[[ -f "${CONFIG_DIR}/${CONFIG_FILE}" ]] || die "no ${CONFIG_FILE} in ${CONFIG_DIR}"
[[ -f "${CONFIG_DIR}/api_keys.yaml" ]] ||
    die "no api_keys.yaml in ${CONFIG_DIR}: llmux refuses to serve 0.0.0.0 without keys"
[[ -d "${MODELS_DIR}" ]] || die "no models directory ${MODELS_DIR} (see --models-dir)"

# Idempotent: whatever a previous run left is replaced.
if podman container exists "${CTR}"; then
    echo "removing the existing container ${CTR}"
    podman rm --force --time "${STOP_TIMEOUT}" "${CTR}"
fi
if podman pod exists "${POD}"; then
    echo "removing the existing pod ${POD}"
    podman pod rm --force --time "${STOP_TIMEOUT}" "${POD}"
fi

pod_args=(--name "${POD}" --publish "${PUBLISH}")
if [[ "${KEEP_ID}" == 1 ]]; then
    pod_args+=(--userns "keep-id:uid=${LLMUX_UID},gid=${LLMUX_UID}")
fi
podman pod create "${pod_args[@]}"

run_args=(
    --detach
    --name "${CTR}"
    --pod "${POD}"
    --init
    --restart unless-stopped
    --stop-timeout "${STOP_TIMEOUT}"
    --health-cmd "${HEALTH_CMD}"
    --health-interval 30s
    --health-start-period 60s
    --health-retries 3
    --volume "${CONFIG_DIR}:/config:ro,Z"
    --volume "${MODELS_DIR}:/models:ro,Z"
    --volume "${STATE_VOLUME}:/state:Z"
)
if [[ "${GPU}" == 1 ]]; then
    run_args+=(--device nvidia.com/gpu=all)
fi
podman run "${run_args[@]}" "${IMAGE}" \
    serve --config "/config/${CONFIG_FILE}" --host 0.0.0.0 --port 8081 \
    --api-keys /config/api_keys.yaml

echo "llmux: http://${PUBLISH%:*}  (podman logs -f ${CTR}; podman healthcheck run ${CTR})"
