#!/usr/bin/env bash
# Make a local Debian bookworm + Python 3.11 base image with debootstrap, for build
# hosts that cannot pull from a container registry, and tag it as the Dockerfile's
# default base (python:3.11-slim-bookworm) in buildah's storage. Needs root,
# debootstrap and buildah.
#
#   deployment/local-base.sh [--tag IMAGE] [--mirror URL]
set -euo pipefail
tag="docker.io/library/python:3.11-slim-bookworm"
mirror="http://deb.debian.org/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --mirror) mirror="$2"; shift 2 ;;
    *) echo "local-base.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
storage=(--storage-driver "${STORAGE_DRIVER:-vfs}")
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
ctr=$(buildah "${storage[@]}" from scratch)
mnt=$(buildah "${storage[@]}" mount "$ctr")
cp -a "$rootfs"/. "$mnt"/
buildah "${storage[@]}" umount "$ctr" >/dev/null
buildah "${storage[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd python3 "$ctr"
buildah "${storage[@]}" commit --quiet "$ctr" "$tag" >/dev/null
buildah "${storage[@]}" rm "$ctr" >/dev/null
echo "$tag"
