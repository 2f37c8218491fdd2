#!/usr/bin/env bash
# Build, tag and optionally push the stage images.
#
#   images/build.sh [--push] [--dry-run] [cpu] [cuda] [export] [mlflow]     (no names: all four)
#
# TUNEFORGE_REGISTRY and TUNEFORGE_IMAGE_TAG name the images; the pipeline compiler reads the same two
# variables, so a pipeline compiled in the same shell runs exactly the images pushed here.
#   TUNEFORGE_REGISTRY   default ghcr.io/tuneforge
#   TUNEFORGE_IMAGE_TAG  default the package version (tuneforge/__init__.py)
#   CONTAINER_ENGINE     docker, podman or buildah; default the first one found that works
#   BASE_IMAGE           passed as the BASE_IMAGE build argument when set
#   BUILD_OPTS           extra options for every build (e.g. --build-arg TORCH_INDEX_URL=...)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/tuneforge/__init__.py")
REGISTRY=${TUNEFORGE_REGISTRY:-ghcr.io/tuneforge}
TAG=${TUNEFORGE_IMAGE_TAG:-$VERSION}
REVISION=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)

push=0 dry_run=0 names=()
for arg in "$@"; do
  case "$arg" in
    --push) push=1 ;;
    --dry-run) dry_run=1 ;;
    cpu|cuda|export|mlflow) names+=("$arg") ;;
    *) echo "images/build.sh: unknown argument '$arg' (expected --push, --dry-run, cpu, cuda, export, mlflow)" >&2; exit 2 ;;
  esac
done
[ ${#names[@]} -gt 0 ] || names=(cpu cuda export mlflow)

engine=${CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
  for candidate in docker podman buildah; do
    if command -v "$candidate" >/dev/null && { [ "$candidate" != docker ] || docker info >/dev/null 2>&1; }; then
      engine=$candidate; break
    fi
  done
fi
if [ -z "$engine" ] && [ $dry_run -eq 0 ]; then
  echo "images/build.sh: no container engine found (docker with a running daemon, podman or buildah)" >&2
  exit 1
fi
engine=${engine:-docker}
build_cmd=("$engine" build)
[ "$engine" = buildah ] && build_cmd=(buildah build)

run() {
  echo "+ $*"
  [ $dry_run -eq 1 ] || "$@"
}

for name in "${names[@]}"; do
  case "$name" in
    cuda|mlflow) dockerfile=images/Dockerfile.$name ;;
    *) dockerfile=images/Dockerfile ;;
  esac
  image="$REGISTRY/tuneforge-$name:$TAG"
  args=(--file "$dockerfile" --target "$name" --tag "$image"
        --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION")
  [ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  # shellcheck disable=SC2206
  [ -n "${BUILD_OPTS:-}" ] && args+=(${BUILD_OPTS})
  (cd "$ROOT" && run "${build_cmd[@]}" "${args[@]}" .)
  [ $push -eq 0 ] || run "$engine" push "$image"
done
