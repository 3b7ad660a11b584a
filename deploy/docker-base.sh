#!/bin/sh
# Make a local Docker base image from Debian's own packages, for a machine that reaches Debian's
# mirror but no container registry: debootstrap a minimal bookworm with Python 3.11, then
# `docker import` it. The Dockerfile builds on it with --build-arg BASE_IMAGE=NAME.
#
#   deploy/docker-base.sh [NAME]        (default bft-base:bookworm; needs root and debootstrap)
#
# The host's CA bundle goes into the image, so that apt and pip inside the build trust the same
# certificates as the host does (a TLS-inspecting proxy's, say). The mirror is the first one
# this machine's apt sources name.
set -eu

name=${1:-bft-base:bookworm}
suite=bookworm
if docker image inspect "$name" >/dev/null 2>&1; then
    echo "docker-base: $name exists"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "docker-base: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || {
    command -v apt-get >/dev/null || { echo "docker-base: debootstrap is missing" >&2; exit 1; }
    apt-get install -y -q debootstrap >/dev/null
}
mirror=$( (grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
           grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}') | grep -v security | head -n 1)
mirror=${mirror:-http://deb.debian.org/debian}

root=$(mktemp -d /tmp/bft-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "docker-base: debootstrap $suite from $mirror into $root"
debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates \
    "$suite" "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# What the slim Python image also leaves out: apt's caches and the package lists.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' - "$name" >/dev/null
echo "docker-base: made $name ($(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}'))"
