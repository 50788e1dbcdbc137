#!/usr/bin/env bash
# The docker-compose stack for real: the engine, the images, the stack up and down.
#
#   deploy/containers/stack.sh up       engine + images + router-cluster:local, then the
#                                       stack, waiting until the front answers
#   deploy/containers/stack.sh down     stop and remove what `up` started (containers,
#                                       network, the helpers it ran); nothing left running
#   deploy/containers/stack.sh setup    only the engine: Docker if a daemon answers, else
#                                       rootful podman (installed with apt-get as root) and
#                                       its Docker API for Debian's docker-compose
#   deploy/containers/stack.sh images   only the base images: pulled from the registry, or,
#                                       where none is reachable, STAND-INS made here
#   deploy/containers/stack.sh build    only router-cluster:local (deploy/Dockerfile)
#   deploy/containers/stack.sh compose ARGS...   docker-compose on the stack (ps, logs, kill...)
#
# Stand-ins. With no container registry reachable (this project's CI machines reach PyPI,
# Debian and npm only), each upstream image the compose file names is replaced by one built
# here from Debian bookworm (debootstrap, then deploy/containers/standins/*.Containerfile),
# tagged with the upstream name so the compose file runs unchanged, and labelled
# io.router-cluster.standin=<the name it stands in for>. `images` prints which is which:
#
#   docker.io/library/python:3.11-slim   Debian's python3 3.11 (the image's build and runtime)
#   docker.io/library/redis:7-alpine     Debian's redis-server 7.0
#   docker.io/library/haproxy:2.9-alpine Debian's haproxy 2.6
#   docker.io/prom/prometheus:v2.53.1    Debian's prometheus 2.42
#   docker.io/grafana/grafana:11.1.0     none (Debian has no Grafana): not started
#
# ROUTER_STANDINS=auto (default: stand-ins only for what cannot be pulled), always, never.
# ROUTER_GATEWAY_PORT, ROUTER_PROMETHEUS_PORT: the host ports of the front and Prometheus
# (8080, 9090). Run from anywhere; paths are the repository's.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/deploy/containers"
PROJECT=${ROUTER_COMPOSE_PROJECT:-router-cluster}
STATE=${ROUTER_STACK_STATE:-/tmp/router-cluster-stack}
PODMAN_SOCK=/run/podman/podman.sock
STANDINS=${ROUTER_STANDINS:-auto}
BASE=localhost/debian:bookworm-local
# upstream name -> stand-in Containerfile ('' : none can be made here)
declare -A STANDIN=(
  [docker.io/library/python:3.11-slim]=python.Containerfile
  [docker.io/library/redis:7-alpine]=redis.Containerfile
  [docker.io/library/haproxy:2.9-alpine]=haproxy.Containerfile
  [docker.io/prom/prometheus:v2.53.1]=prometheus.Containerfile
  [docker.io/grafana/grafana:11.1.0]=''
)

say() { printf 'stack: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

mkdir -p "$STATE"

# --- the engine ------------------------------------------------------------------------

engine() {
  # Docker when its daemon answers; else podman, started here (its state in $STATE)
  if [ -z "${ROUTER_ENGINE:-}" ]; then
    if command -v docker >/dev/null 2>&1 && timeout 5 docker info >/dev/null 2>&1 \
       && ! docker info 2>/dev/null | grep -i podman >/dev/null; then
      ROUTER_ENGINE=docker
    else
      ROUTER_ENGINE=podman
    fi
  fi
  echo "$ROUTER_ENGINE"
}

apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
    || die "missing: $* (install them: apt-get install -y $*; this needs root and apt)"
  say "installing $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup() {
  local e missing=()
  e=$(engine)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  if [ "$e" = podman ]; then
    command -v podman >/dev/null 2>&1 || missing+=(podman)
    command -v buildah >/dev/null 2>&1 || missing+=(buildah)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v fuse-overlayfs >/dev/null 2>&1 || missing+=(fuse-overlayfs)
    command -v slirp4netns >/dev/null 2>&1 || missing+=(slirp4netns)
    command -v newuidmap >/dev/null 2>&1 || missing+=(uidmap)
    # the compose network's DNS (service names): netavark with aardvark-dns; Debian's podman
    # only recommends them, and without them it falls back to CNI, which resolves no names
    [ -x /usr/lib/podman/netavark ] || missing+=(netavark)
    [ -x /usr/lib/podman/aardvark-dns ] || missing+=(aardvark-dns)
  fi
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  if [ "$e" = podman ]; then
    [ "$(id -u)" = 0 ] || die "podman runs rootful here: run as root (or start Docker)"
    podman_limits
    podman_runtime
    podman_network
    podman_service
  fi
}

podman_limits() {
  # Without CAP_SYS_RESOURCE (containers in CI, some VMs) every `podman run` fails raising
  # its rlimits to podman's defaults ("error setting rlimits"); give limits it may set.
  local conf=/etc/containers/containers.conf
  grep -q '^default_ulimits' "$conf" 2>/dev/null && return
  if capsh --has-p=cap_sys_resource >/dev/null 2>&1; then return; fi
  say "setting default_ulimits in $conf (no CAP_SYS_RESOURCE here)"
  conf_set containers 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]'
}

conf_set() {  # conf_set SECTION LINE: LINE added under [SECTION] of containers.conf
  local conf=/etc/containers/containers.conf
  mkdir -p /etc/containers
  if grep -q "^\[$1\]" "$conf" 2>/dev/null; then
    sed -i "/^\[$1\]/a $2" "$conf"
  else
    printf '[%s]\n%s\n' "$1" "$2" >>"$conf"
  fi
}

podman_runtime() {
  # crun (podman's default runtime on Debian 12) refuses a hybrid cgroup layout whose unified
  # hierarchy holds controllers (cgroup v1 with, say, hugetlb on v2: "cgroups in hybrid mode
  # not supported"); runc runs there. Chosen in containers.conf, for podman run and build.
  local conf=/etc/containers/containers.conf controllers=/sys/fs/cgroup/unified/cgroup.controllers
  [ -r "$controllers" ] && [ -n "$(tr -d ' \n' <"$controllers")" ] || return 0
  grep -q '^runtime *= *"runc"' "$conf" 2>/dev/null && return
  command -v runc >/dev/null 2>&1 || apt_install runc
  say "hybrid cgroups with controllers on v2 ($(cat "$controllers")): podman runs with runc"
  conf_set engine 'runtime = "runc"'
}

podman_network() {
  # netavark chosen outright: podman keeps CNI, which resolves no service names, once it has
  # made a network with it (and on a machine where it ran before netavark was installed)
  local conf=/etc/containers/containers.conf
  grep -q '^network_backend *= *"netavark"' "$conf" 2>/dev/null && return
  [ "$(podman info --format '{{.Host.NetworkBackend}}' 2>/dev/null)" = netavark ] && return
  say "the compose network needs netavark (names through aardvark-dns): chosen in $conf"
  conf_set network 'network_backend = "netavark"'
  # CNI's networks (not its images or containers' data) are left behind: podman would refuse
  # to switch with containers still on them, so a stack still up must go down first
  if [ -n "$(podman ps -aq 2>/dev/null)" ]; then
    die "containers exist under podman's CNI networking: remove them (stack.sh down) and run again"
  fi
}

service_runtime() {  # the OCI runtime of the podman service answering on the socket
  curl -fsS --unix-socket "$PODMAN_SOCK" http://d/v4.0.0/libpod/info 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["host"]["ociRuntime"]["name"])'
}

podman_service() {
  # The Docker API that docker-compose talks to (no systemd socket here: started by hand)
  if curl -fsS --unix-socket "$PODMAN_SOCK" http://d/_ping >/dev/null 2>&1; then
    local want running
    want=$(sed -n 's/^runtime *= *"\(.*\)"/\1/p' /etc/containers/containers.conf 2>/dev/null)
    running=$(service_runtime || true)
    if [ -n "$want" ] && [ -n "$running" ] && [ "$want" != "$running" ]; then
      die "the podman service on $PODMAN_SOCK runs $running, started before $want was chosen: stop it and run again"
    fi
    return
  fi
  mkdir -p "$(dirname "$PODMAN_SOCK")"
  # started in /: the service's containers get its working directory (conmon fails them all,
  # "write child: broken pipe", once that directory is removed, as a CI checkout is)
  (cd / && exec nohup podman system service --time=0 "unix://$PODMAN_SOCK") \
    >"$STATE/podman-service.log" 2>&1 &
  echo $! >"$STATE/podman-service.pid"
  for _ in $(seq 100); do
    curl -fsS --unix-socket "$PODMAN_SOCK" http://d/_ping >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "podman's API did not come up: see $STATE/podman-service.log"
}

compose() {
  if [ "$(engine)" = podman ]; then export DOCKER_HOST="unix://$PODMAN_SOCK"; fi
  (cd "$ROOT" && docker-compose -p "$PROJECT" -f docker-compose.yml "$@")
}

ctr() { if [ "$(engine)" = podman ]; then podman "$@"; else docker "$@"; fi; }

# --- images ----------------------------------------------------------------------------

have_image() { ctr image inspect "$1" >/dev/null 2>&1; }

standin_of() {  # what the local image named $1 stands in for ('' : it is the real one)
  ctr image inspect --format '{{ index .Config.Labels "io.router-cluster.standin" }}' "$1" \
    2>/dev/null | sed 's/<no value>//'
}

debian_base() {
  have_image "$BASE" && return
  local mirror rootfs
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | awk 'NR == 1')
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs="$STATE/rootfs"
  rm -rf "$rootfs"
  say "making $BASE with debootstrap (minbase, bookworm, $mirror)"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
    || die "debootstrap failed: see $STATE/debootstrap.log"
  mkdir -p "$rootfs/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/" 2>/dev/null || true
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$rootfs"
}

images() {
  local name file kind
  for name in "${!STANDIN[@]}"; do
    file=${STANDIN[$name]}
    if have_image "$name"; then
      :
    elif [ "$STANDINS" != always ] && timeout 60 "$(engine)" pull -q "$name" >/dev/null 2>&1; then
      :
    elif [ "$STANDINS" = never ]; then
      die "cannot pull $name and ROUTER_STANDINS=never"
    elif [ -n "$file" ]; then
      [ "$(engine)" = podman ] || die "stand-ins are built with podman; $name cannot be pulled"
      debian_base
      say "building a STAND-IN for $name ($file)"
      podman build -q --format docker --network host -f "$HERE/standins/$file" -t "$name" \
        "$HERE/standins" >/dev/null
    fi
  done
  for name in $(printf '%s\n' "${!STANDIN[@]}" | sort); do
    if ! have_image "$name"; then kind="absent: its service is not started"
    elif [ -n "$(standin_of "$name")" ]; then kind="STAND-IN ($(ctr image inspect --format \
      '{{ index .Config.Labels "org.opencontainers.image.description" }}' "$name" | sed 's/^STAND-IN for [^:]*:[^:]*: //'))"
    else kind="upstream"; fi
    printf 'stack: %-38s %s\n' "$name" "$kind" >&2
  done
}

pip_ca() {  # the CA bundle pip trusts on this host (an egress proxy's re-signing CA)
  local ca=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}
  if [ -z "$ca" ] && command -v pip3 >/dev/null 2>&1; then
    ca=$(pip3 config get global.cert 2>/dev/null || true)
  fi
  if [ -n "$ca" ] && [ -s "$ca" ]; then echo "$ca"; else : >"$STATE/no-ca"; echo "$STATE/no-ca"; fi
}

build() {
  say "building router-cluster:local from deploy/Dockerfile"
  local fmt=()
  # podman: docker format keeps the HEALTHCHECK; the build's downloads (pip) go out through
  # the host's network, as apt's in the stand-ins' builds: a bridge with no way out (no NAT on
  # some hosts: netavark's network reached no name server here) would fail them
  [ "$(engine)" = podman ] && fmt=(--format docker --network host)
  ctr build -q "${fmt[@]}" --secret "id=pip-ca,src=$(pip_ca)" \
    -f "$ROOT/deploy/Dockerfile" -t router-cluster:local \
    -t docker.io/library/router-cluster:local "$ROOT" >/dev/null  # (the Docker API's name)
}

# --- the stack -------------------------------------------------------------------------

services() {  # every service whose image is here (grafana has no stand-in)
  local s img config
  config=$(compose config)  # read whole: a reader that stops early would break the pipe
  for s in $(compose config --services); do
    img=$(awk -v s="  $s:" '$0==s {f=1; next} f && /^  [^ ]/ {f=0} f && /^    image:/ && !done {print $2; done=1}' <<<"$config")
    if [ -z "$img" ] || have_image "$img"; then echo "$s"; else say "not starting $s: no image $img"; fi
  done
}

healthchecks() {
  # podman runs a container's HEALTHCHECK from a systemd timer; without systemd, here
  [ "$(engine)" = podman ] || return 0
  stop_pid healthchecks  # an earlier up's (one that failed, and was not brought down)
  nohup bash -c "
    while :; do
      for c in \$(podman ps -q --filter label=com.docker.compose.project=$PROJECT); do
        podman healthcheck run \"\$c\" >/dev/null 2>&1 || true
      done
      sleep 2
    done" >/dev/null 2>&1 &
  echo $! >"$STATE/healthchecks.pid"
}

up() {
  setup
  images
  build
  local list
  mapfile -t list < <(services)
  say "starting: ${list[*]}"
  healthchecks
  compose up -d --no-build "${list[@]}" >"$STATE/up.log" 2>&1 || {
    cat "$STATE/up.log" >&2; die "docker-compose up failed"; }
  local port=${ROUTER_GATEWAY_PORT:-8080}
  for _ in $(seq 120); do
    if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
      steady
      say "up: the gateway answers on 127.0.0.1:$port"
      return
    fi
    sleep 1
  done
  compose ps >&2 || true
  die "the front did not answer /readyz on 127.0.0.1:$port within 120 s"
}

steady() {  # no container of the stack restarting or exited (a crash loop looks "Up")
  local c n bad=0
  sleep 3
  for c in $(ctr ps -aq --filter "label=com.docker.compose.project=$PROJECT"); do
    n=$(ctr inspect --format '{{.RestartCount}} {{.State.Status}} {{.Name}}' "$c")
    case "$n" in
      "0 running "*) ;;
      *) say "not steady: $n"; ctr logs --tail 5 "$c" >&2 || true; bad=1 ;;
    esac
  done
  [ "$bad" = 0 ] || die "a container of the stack is not running steadily"
}

stop_pid() {
  local f="$STATE/$1.pid"
  [ -f "$f" ] || return 0
  kill "$(cat "$f")" 2>/dev/null || true
  rm -f "$f"
}

down() {
  compose down -v --remove-orphans --timeout 45 >"$STATE/down.log" 2>&1 || true
  stop_pid healthchecks
  local left
  left=$(ctr ps -aq --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null || true)
  stop_pid podman-service
  [ -z "$left" ] || die "containers left after down: $left"
  say "down: nothing of $PROJECT runs"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  images) setup; images ;;
  build) setup; build ;;
  up) up ;;
  down) down ;;
  compose) compose "$@" ;;
  engine) engine ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
