#!/usr/bin/env bash
# Install lazyfs and everything its tests use on a fresh Debian (bookworm) machine, then run the
# main job on built-in defaults. Safe to run again: every step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"

# fuse3/libfuse3-dev: pyfuse3 builds against libfuse3. golang + the Debian estargz sources: the
# interoperability tests build the reference implementation. skopeo/umoci: the image tests make
# real docker-archive and oci-archive inputs with them. nginx-light: the HTTP tests serve images
# with it. busybox-static: the demo image's program. crun: `lazyfs run --runtime crun` and its
# tests. docker-registry: the registry tests push images into it (with skopeo) and mount them.
APT_PACKAGES="python3 python3-venv python3-dev gcc pkg-config tar gzip zstd fuse3 libfuse3-dev
  golang-go golang-github-containerd-stargz-snapshotter-dev skopeo umoci nginx-light busybox-static crun
  docker-registry"
missing=$(for p in $APT_PACKAGES; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  # Debian starts a docker-registry service on :5000 when it installs the package; the tests
  # run their own, so one installed just for them is stopped and disabled again.
  if echo "$missing" | grep -qx docker-registry && command -v systemctl >/dev/null \
      && systemctl is-enabled docker-registry >/dev/null 2>&1; then
    $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# editable_mode=compat: the checkout goes on sys.path through a plain .pth line. The default
# mode installs an import hook instead, which every Python start imports (~15 ms of a
# `lazyfs run`, which a user's non-editable install does not pay).
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' \
  --config-settings editable_mode=compat
# An editable install leaves lazyfs uncompiled, and where PYTHONDONTWRITEBYTECODE is set every
# start would compile it again (~50 ms of a cold start): compile it once, as pip install does.
.venv/bin/python -m compileall -q lazyfs converter >/dev/null

if [ "${1:-}" != "--install-only" ]; then
  .venv/bin/lazyfs demo
fi
