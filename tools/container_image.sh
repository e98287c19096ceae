#!/usr/bin/env bash
# Build the project's container images without a Docker engine: buildah with chroot isolation (what works
# unprivileged-in-a-VM here; `podman run` does not), on a Debian base made once with debootstrap.
#
#   tools/container_image.sh base              the Python base (cached; see BASE_* below)
#   tools/container_image.sh cpu [CONTEXT]     the CPU image (FLAVOR=cpu) from CONTEXT (default: this repository)
#   tools/container_image.sh gpu [CONTEXT]     the GPU image on NGC PyTorch: docker build where a Docker engine
#                                              runs, else buildah (either way the registry must be reachable)
#   tools/container_image.sh run IMAGE CMD...  run CMD in a throw-away container of IMAGE (buildah run)
#
# Environment: IMAGE (the tag to build), MEGATRON_EXT_CACHE (default ~/.cache/megatron_ext: the base's root
# file system as a tarball, so a wiped container store re-imports it in seconds instead of re-bootstrapping),
# TORCH_WHEELS (a directory with the CPU torch wheel, for hosts that cannot reach PyTorch's CPU index; default:
# found from pip's own find-links when that index is unreachable). Docs: docs/launch.md, "The container".
#
# Nothing of this host enters a layer: the CA bundle and the wheel directory are bind-mounted into the RUN
# steps (buildah bud -v) and handed to pip through build arguments; tests/test_docker.py checks the layers.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/megatron_ext/__init__.py")
CACHE=${MEGATRON_EXT_CACHE:-$HOME/.cache/megatron_ext}
BASE_IMAGE=localhost/megatron-ext-base:debian12-py311   # Debian 12's Python 3.11 = the cp311 wheels of CI
BASE_SUITE=bookworm
BASE_PACKAGES=python3,python3-pip,python3-venv,python-is-python3,ca-certificates
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

say() { echo "container_image: $*" >&2; }

need_tools() {  # buildah/podman/debootstrap from Debian's packages when root with apt, else say what is missing
  local missing=()
  for tool in buildah podman debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  ((${#missing[@]} == 0)) && return 0
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "installing ${missing[*]} (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman debootstrap >/dev/null) \
      || { say "apt-get could not install buildah podman debootstrap"; return 3; }
  else
    say "needs ${missing[*]}: apt-get install buildah podman debootstrap (as root), or build with Docker"
    return 3
  fi
}

apt_mirror() {  # the Debian mirror this host's apt uses
  local mirror
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [[ -n $mirror ]] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${mirror:-http://deb.debian.org/debian}"
}

make_base() {
  need_tools
  mkdir -p "$CACHE"
  exec 9>"$CACHE/base.lock"
  flock 9  # one bootstrap at a time on a shared machine; the second caller finds the image made
  trap 'exec 9>&-' RETURN
  podman image exists "$BASE_IMAGE" && return 0
  local tarball="$CACHE/base-$BASE_SUITE-py311.tar"
  if [[ ! -s $tarball ]]; then
    local rootfs="$CACHE/rootfs.tmp"
    rm -rf "$rootfs"
    say "bootstrapping Debian $BASE_SUITE with $BASE_PACKAGES (about 3 minutes, once)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$rootfs" "$(apt_mirror)" >/dev/null
    # debootstrap copies the host's resolv.conf and hostname; an image must not carry them. The mirror in
    # sources.list is Debian's public one. Like the python:3.11 images, pip may install into this Python
    # (the container is the environment), so Debian's externally-managed marker goes.
    rm -f "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname" "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    echo "deb http://deb.debian.org/debian $BASE_SUITE main" > "$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
           "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  say "importing $tarball as $BASE_IMAGE"
  podman import -q --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$BASE_IMAGE" >/dev/null
}

torch_wheels() {  # a directory holding the pinned CPU torch wheel, when PyTorch's CPU index cannot be reached
  if [[ -n ${TORCH_WHEELS:-} ]]; then echo "$TORCH_WHEELS"; return; fi
  curl -fsS -m 10 -o /dev/null "$TORCH_CPU_INDEX/torch/" 2>/dev/null && return 0
  local pin dir
  pin=$(sed -n 's/^torch==//p' "$ROOT/requirements-cpu.txt")
  for dir in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true); do
    if compgen -G "$dir/torch-$pin+cpu-*.whl" >/dev/null; then echo "$dir"; return; fi
  done
  say "cannot reach $TORCH_CPU_INDEX and no torch-$pin+cpu wheel found: set TORCH_WHEELS=DIR"
  return 3
}

build_cpu() {
  local context=${1:-$ROOT} image=${IMAGE:-localhost/megatron-ext:$VERSION-cpu} wheels
  make_base
  wheels=$(torch_wheels)
  local args=(--layers --isolation chroot --network host -f "$context/Dockerfile" -t "$image"
              --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg FLAVOR=cpu)
  if [[ -f $CA_BUNDLE ]]; then  # hosts whose TLS to the package index needs their own CA bundle
    args+=(-v "$CA_BUNDLE:/run/build/ca.crt:ro" --build-arg PIP_CERT=/run/build/ca.crt)
  fi
  if [[ -n $wheels ]]; then
    args+=(-v "$wheels:/run/build/wheels:ro" --build-arg PIP_FIND_LINKS=/run/build/wheels --build-arg TORCH_INDEX_URL=)
  fi
  say "building $image from $context"
  buildah bud "${args[@]}" "$context"
}

build_gpu() {
  local context=${1:-$ROOT} image=${IMAGE:-megatron-ext:$VERSION}
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    docker build -t "$image" "$context"
  else
    need_tools
    buildah bud --layers --isolation chroot --network host -t "$image" "$context"
  fi
}

run_in() {
  local image=$1 container
  shift
  container=$(buildah from --pull-never "$image")
  trap 'buildah rm "$container" >/dev/null' RETURN
  buildah run --isolation chroot --network host "$container" -- "$@"
}

case ${1:-} in
  base) make_base ;;
  cpu) build_cpu "${2:-}" ;;
  gpu) build_gpu "${2:-}" ;;
  run) shift; run_in "$@" ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
