#!/usr/bin/env bash
# Build the CPU image with podman where no base image can be pulled, and run a tiny stage inside it.
#
#   sudo images/local-build.sh [cpu] [export] [mlflow]     (root: debootstrap, podman with runc and cgroupfs)
#
# No names: cpu. The export and mlflow images are built the same way and checked with an import.
#
# 1. debootstrap makes a Debian bookworm root filesystem with python3 (3.11, as in python:3.11-slim)
#    and imports it as localhost/tuneforge-base:bookworm.
# 2. images/build.sh builds tuneforge-cpu on that base. pip inside the build reaches PyPI through the
#    host's network and trusts the host's CA bundle (mounted, never copied into a layer); the CPU torch
#    wheel comes from TORCH_WHEEL (default: the one in /opt/wheels) through images/wheels/.
#    TORCH_INDEX_URL replaces the PyTorch index (unreachable here) with PyPI: the local wheel wins.
# 3. The image runs data-prep and a 4-step SFT of the tiny model with a read-only root filesystem, as
#    user 10001, with no network, writing only to the mounted /workspace and /cache.
# Slow (a first run takes about 15 minutes), so it is not part of the test suite.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${TUNEFORGE_CACHE:-$HOME/.cache/tuneforge}/images
ROOTFS=$CACHE/rootfs-bookworm
BASE=localhost/tuneforge-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
TORCH_WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1)}
export TUNEFORGE_REGISTRY=${TUNEFORGE_REGISTRY:-localhost/tuneforge}
export TUNEFORGE_IMAGE_TAG=${TUNEFORGE_IMAGE_TAG:-dev}
IMAGE=$TUNEFORGE_REGISTRY/tuneforge-cpu:$TUNEFORGE_IMAGE_TAG

for tool in debootstrap podman runc; do
  command -v $tool >/dev/null || { echo "local-build.sh: $tool is missing (apt-get install podman buildah debootstrap runc)" >&2; exit 1; }
done
# crun refuses this machine's hybrid cgroups ("cgroups in hybrid mode not supported"); runc does not.
mkdir -p "$CACHE"
printf '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n' > "$CACHE/containers.conf"
export CONTAINERS_CONF=$CACHE/containers.conf

if ! podman image exists "$BASE"; then
  if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    rm -rf "$ROOTFS.partial"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS.partial" "$MIRROR"
    mv "$ROOTFS.partial" "$ROOTFS"
  fi
  tar -C "$ROOTFS" -c . | podman import --change 'CMD ["python3"]' - "$BASE"
fi

if [ -n "$TORCH_WHEEL" ]; then
  cp -u "$TORCH_WHEEL" "$ROOT/images/wheels/"
fi
# The llama.cpp wheel `make setup` compiled once (same Debian, same Python): the export image's build takes it
# instead of compiling llama.cpp again.
LLAMA_WHEEL=$(ls "${WHEELHOUSE:-$HOME/.cache/tuneforge/wheels}"/llama_cpp_python-0.3.36-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$LLAMA_WHEEL" ]; then
  cp -u "$LLAMA_WHEEL" "$ROOT/images/wheels/"
fi

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(cpu)
BASE_IMAGE=$BASE CONTAINER_ENGINE=podman \
BUILD_OPTS="--network=host --volume $HOST_CA:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt --build-arg TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}" \
  "$ROOT/images/build.sh" "${names[@]}"

# runc sets the container's rlimits with prlimit from outside, which some sandboxed hosts refuse
# ("error setting rlimits for ready process"); builds set none. Runs go through a runc that drops them.
cat > "$CACHE/runc-norlimits" <<'WRAPPER'
#!/bin/sh
prev=
for arg in "$@"; do
  if [ "$prev" = "--bundle" ] || [ "$prev" = "-b" ]; then
    python3 -c 'import json, sys; p = sys.argv[1] + "/config.json"; c = json.load(open(p)); c["process"].pop("rlimits", None); json.dump(c, open(p, "w"))' "$arg"
  fi
  prev=$arg
done
exec runc "$@"
WRAPPER
chmod +x "$CACHE/runc-norlimits"
podman_run() { podman --runtime "$CACHE/runc-norlimits" run "$@"; }

for name in "${names[@]}"; do
  case "$name" in
    export) podman_run --rm "$TUNEFORGE_REGISTRY/tuneforge-export:$TUNEFORGE_IMAGE_TAG" python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)" ;;
    mlflow) podman_run --rm "$TUNEFORGE_REGISTRY/tuneforge-mlflow:$TUNEFORGE_IMAGE_TAG" mlflow --version ;;
  esac
done
[[ " ${names[*]} " == *" cpu "* ]] || exit 0
# make images-local: the container runner's tests run every stage in the images; this check would repeat two.
[ "${SKIP_STAGE_CHECK:-0}" = 1 ] && exit 0

echo "== image"
podman image inspect "$IMAGE" --format 'user={{.Config.User}} size={{.Size}} labels={{json .Labels}}'
tools=$(podman_run --rm "$IMAGE" sh -c 'for t in gcc cc g++ make cmake git; do command -v $t; done; echo checked')
if [ "$tools" != checked ]; then
  echo "local-build.sh: build tools found in the final image: $tools" >&2; exit 1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/out" "$WORK/cache"
chown -R 10001:10001 "$WORK/out" "$WORK/cache"
cp -r "$ROOT/examples" "$WORK/examples"
in_image() {
  podman_run --rm --network=none --read-only --tmpfs /tmp --user 10001 \
    --volume "$WORK/examples:/examples:ro" --volume "$WORK/out:/workspace" --volume "$WORK/cache:/cache" \
    --env MLFLOW_TRACKING_URI=sqlite:////workspace/mlflow.db "$IMAGE" "$@"
}
echo "== tuneforge stage data-prep (in the image)"
in_image tuneforge stage data-prep --config /examples/tiny.yaml --output /workspace/data --set workdir=/workspace/run
echo "== tuneforge stage sft (in the image)"
in_image tuneforge stage sft --config /examples/tiny.yaml --output /workspace/sft --input data=/workspace/data \
  --set workdir=/workspace/run --set sft.max_steps=4 --set sft.save_steps=2 --set sft.eval_steps=2
test -f "$WORK/out/sft/manifest.json"
echo "local-build.sh: $IMAGE built and ran data-prep and sft"
