#!/usr/bin/env bash
# Build the edge-module image from Dockerfile.amd64: with docker when a daemon answers,
# otherwise with buildah (no daemon needed: vfs storage, chroot isolation).
#
#   deployment/build-image.sh [--tag IMAGE] [--wheels DIR] [--base IMAGE]
#
#   --tag     image name (default: edge-module:<version>-amd64)
#   --wheels  a folder inside the repository with wheels for requirements.lock, to build
#             without a package index (pip wheel -r requirements.lock -w DIR)
#   --base    the base image (default: python:3.11-slim-bookworm; see local-base.sh)
#   --vendor-keys FILE
#             the vendor's public key (base64 or PEM) or key set that the image trusts,
#             inside the repository; without it the image is a development build
#             (docs/licensing.md). Also VENDOR_KEYS=FILE in the environment.
#
# BUILDER=docker or BUILDER=buildah forces one of them.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
tag="edge-module:${version}-amd64"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --wheels) args+=(--build-arg "WHEELS=$2"); shift 2 ;;
    --base) args+=(--build-arg "BASE_IMAGE=$2"); shift 2 ;;
    --vendor-keys) VENDOR_KEYS="$2"; shift 2 ;;
    *) echo "build-image.sh: unknown option $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
done
if [ -n "${VENDOR_KEYS:-}" ]; then
  [ -f "$VENDOR_KEYS" ] || { echo "build-image.sh: no file $VENDOR_KEYS; fix: pass the" \
                             "vendor's PUBLIC key file" >&2; exit 2; }
  if grep -q "PRIVATE KEY" "$VENDOR_KEYS"; then
    echo "build-image.sh: $VENDOR_KEYS holds a private key; fix: pass the public half" \
         "(openssl pkey -in vendor.pem -pubout)" >&2
    exit 2
  fi
  # Into the build context (.dockerignore lets deployment/vendor-keys/ through; git ignores it).
  mkdir -p deployment/vendor-keys
  cp "$VENDOR_KEYS" deployment/vendor-keys/current
  args+=(--build-arg "VENDOR_KEYS=deployment/vendor-keys/current")
else
  echo "build-image.sh: no --vendor-keys: building a DEVELOPMENT image that trusts no" \
       "vendor key (customers need a release image; see docs/licensing.md)" >&2
fi
builder="${BUILDER:-auto}"
if [ "$builder" = auto ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then builder=docker
  elif [ "$builder" = buildah ]; then builder=buildah
  else builder=none; fi
fi
if [ "$builder" = docker ]; then
  exec docker build --platform linux/amd64 -f Dockerfile.amd64 -t "$tag" "${args[@]}" .
elif [ "$builder" = buildah ]; then
  exec buildah --storage-driver "${STORAGE_DRIVER:-vfs}" bud --isolation chroot \
    --format docker --layers=false -f Dockerfile.amd64 -t "$tag" "${args[@]}" .
else
  echo "build-image.sh: neither a docker daemon nor buildah is available; fix: start" \
       "docker, or install buildah (apt-get install buildah)" >&2
  exit 2
fi
