#!/usr/bin/env bash
# Start podman's Docker-compatible API (for kfp.local's DockerRunner: tuneforge run --runner container) at
# /run/podman/podman.sock, with the runtime settings images/local-build.sh wrote (runc, cgroupfs, no rlimits);
# nothing is done when a socket already answers. Root.
set -euo pipefail
CACHE=${TUNEFORGE_CACHE:-$HOME/.cache/tuneforge}/images
SOCKET=/run/podman/podman.sock
if curl -fsS --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1; then
  echo "container-api.sh: $SOCKET answers"; exit 0
fi
[ -x "$CACHE/runc-norlimits" ] || { echo "container-api.sh: run images/local-build.sh first (it writes $CACHE/runc-norlimits)" >&2; exit 1; }
mkdir -p "$(dirname "$SOCKET")"
# From /: the service outlives this checkout, and conmon fails every container once its working directory is gone.
(cd / && CONTAINERS_CONF=$CACHE/containers.conf nohup podman --runtime "$CACHE/runc-norlimits" system service --time=0 \
  "unix://$SOCKET" >"$CACHE/podman-service.log" 2>&1 &)
for _ in $(seq 50); do
  curl -fsS --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1 && { echo "container-api.sh: $SOCKET started"; exit 0; }
  sleep 0.2
done
echo "container-api.sh: podman system service did not answer; see $CACHE/podman-service.log" >&2
exit 1
