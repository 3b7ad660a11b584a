#!/bin/bash
# The whole container cycle on this machine's Docker engine (`make docker-test`): build the
# image, `docker-compose up -d`, wait for healthy replicas, write and read files through the
# client container's BFS mount, stop one replica container and go on, start it again and see it
# catch up, then `down -v`. Starts dockerd when it is missing and we are root. Everything talks
# only between the project's containers and the host's loopback.
#
#   deploy/docker-test.sh               BASE_IMAGE=python:3.11-slim to build on the registry's image
set -euo pipefail
cd "$(dirname "$0")/.."

project=bft-docker-test
export BFT_ADMIN0=${BFT_ADMIN0:-17100} BFT_ADMIN1=${BFT_ADMIN1:-17101}
export BFT_ADMIN2=${BFT_ADMIN2:-17102} BFT_ADMIN3=${BFT_ADMIN3:-17103}
export DOCKER_BUILDKIT=0   # the classic builder: Debian's engine has no buildx
compose() { docker-compose -p "$project" "$@"; }
say() { printf 'docker-test: %s\n' "$*"; }
fail() { say "FAILED: $*"; compose ps || true; compose logs --tail 30 || true; exit 1; }

# -- an engine ----------------------------------------------------------------------------------
if ! command -v docker-compose >/dev/null || ! command -v dockerd >/dev/null; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || fail "docker.io and docker-compose are not installed"
    say "installing Debian's docker.io, docker-compose and debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "no Docker engine answers, and only root may start dockerd"
    say "starting dockerd (log: /tmp/bft-dockerd.log)"
    nohup dockerd >/tmp/bft-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || fail "dockerd did not start; see /tmp/bft-dockerd.log"
fi

# -- the image ----------------------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=bft-base:bookworm
    deploy/docker-base.sh "$BASE_IMAGE"
fi
say "building bft-bfs on $BASE_IMAGE"
docker build -q -t bft-bfs --build-arg BASE_IMAGE="$BASE_IMAGE" . >/dev/null

# -- up, healthy --------------------------------------------------------------------------------
trap 'say "down -v"; compose down -v --remove-orphans >/dev/null 2>&1 || true' EXIT
compose down -v --remove-orphans >/dev/null 2>&1 || true
compose up -d 2>&1 | grep -v '^Creating' || true
healthy() {  # service...: every one of them reports healthy
    for s in "$@"; do
        id=$(compose ps -q "$s")
        [ -n "$id" ] && [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ] || return 1
    done
}
wait_healthy() {
    for _ in $(seq 120); do healthy "$@" && return 0; sleep 1; done
    fail "not healthy within 120 s: $*"
}
wait_healthy replica0 replica1 replica2 replica3 client
say "4 replicas and the client healthy"
for i in 0 1 2 3; do
    port=$(eval echo "\$BFT_ADMIN$i")
    curl -fsS "http://127.0.0.1:$port/status" | grep -q "\"replica\": $i" || fail "admin port $port (replica $i) not published"
done

# Only its own private key in each replica container, and no replica key in the client's.
for i in 0 1 2 3; do
    keys=$(compose exec -T "replica$i" ls /cluster/keys | tr -d '\r' | tr '\n' ' ')
    [ "$keys" = "replica-$i.key " ] || fail "replica$i holds keys: $keys"
    [ "$(compose exec -T "replica$i" id -u | tr -d '\r')" = 10001 ] || fail "replica$i does not run as bft"
done
compose exec -T client sh -c 'ls /cluster/keys | grep -q replica' && fail "the client holds a replica key"

# -- files through the mount --------------------------------------------------------------------
exec_client() { compose exec -T client "$@"; }
work=$(mktemp -d); trap 'rm -rf "$work"; say "down -v"; compose down -v --remove-orphans >/dev/null 2>&1 || true' EXIT
head -c 3000000 /dev/urandom > "$work/big"
exec_client mkdir -p /mnt/bfs/docs
exec_client sh -c 'cat > /mnt/bfs/docs/big' < "$work/big"
for i in $(seq 20); do echo "note $i" | exec_client sh -c "cat > /mnt/bfs/docs/note-$i.txt"; done
exec_client cat /mnt/bfs/docs/big > "$work/big.back"
cmp "$work/big" "$work/big.back" || fail "the 3 MB file read back differs"
[ "$(exec_client ls /mnt/bfs/docs | wc -l)" = 21 ] || fail "ls shows $(exec_client ls /mnt/bfs/docs | wc -l) entries, not 21"
[ "$(exec_client cat /mnt/bfs/docs/note-7.txt)" = "note 7" ] || fail "note-7.txt"
say "wrote and read back 21 files (one of 3 MB) through the client container's mount"

# -- one replica stopped, then back ---------------------------------------------------------------
status_json() { exec_client bft status --config /cluster/cluster.toml --json --timeout 2 || true; }
executed_of() {  # replica, from status JSON on stdin
    python3 -c 'import json,sys; r=[x for x in json.load(sys.stdin) if x["replica"]==int(sys.argv[1])][0]; print(r.get("executed", -1))' "$1"
}
compose stop replica2 >/dev/null 2>&1
say "replica2 stopped"
for i in $(seq 40); do
    exec_client sh -c "mkdir -p /mnt/bfs/while-down && echo $i > /mnt/bfs/while-down/f$i"
done
[ "$(exec_client ls /mnt/bfs/while-down | wc -l)" = 40 ] || fail "writes with replica2 stopped"
exec_client cmp -s /mnt/bfs/docs/note-3.txt /mnt/bfs/docs/note-3.txt || fail "reads with replica2 stopped"
target=$(status_json | executed_of 0)
say "40 files written with replica2 stopped; replica 0 executed $target"
compose start replica2 >/dev/null 2>&1
caught=""
for _ in $(seq 60); do
    now=$(status_json | executed_of 2)
    if [ "${now:--1}" -ge "$target" ]; then caught=$now; break; fi
    sleep 1
done
[ -n "$caught" ] || fail "replica2 did not catch up to $target (at ${now:-?})"
wait_healthy replica2
say "replica2 restarted and caught up (executed $caught >= $target)"
[ "$(exec_client cat /mnt/bfs/while-down/f17)" = 17 ] || fail "read after the restart"
status_json > "$work/status.json"
python3 - "$work/status.json" <<'PY' || fail "replicas disagree"
import json, sys
rows = json.load(open(sys.argv[1]))
assert all(not r["error"] for r in rows), rows
assert len({r["view"] for r in rows}) == 1, rows
print("docker-test: status:", ", ".join(f"replica {r['replica']} view {r['view']} executed {r['executed']}" for r in rows))
PY
say "PASSED"
