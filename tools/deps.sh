#!/bin/sh
# Installs, from Debian's archive, whatever buzz needs that is missing.
# Idempotent and silent when everything is already there. Used by `make deps`,
# which both README commands (make demo, make test) run first.
set -eu

PACKAGES="
  build-essential pkg-config
  lua5.4 liblua5.4-dev
  luajit2 libluajit2-5.1-dev
  libuv1-dev libcjson-dev libsqlite3-dev sqlite3 libhttp-parser-dev libssl-dev
  libhiredis-dev redis-server lua-nginx-redis
  lua-busted lua-mediator lua-luv lua-check lua-ldoc
  luarocks cppcheck valgrind neovim
  nginx libnginx-mod-http-lua libnginx-mod-http-ndk lua-resty-core curl
  clang libclang-rt-14-dev lcov
  prometheus
"

missing=""
for p in $PACKAGES; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    missing="$missing $p"
  fi
done
[ -z "$missing" ] && exit 0

echo "buzz: installing from Debian:$missing"
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "buzz: need root (or sudo) to install:$missing" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# nginx's package would start the system's nginx on port 80; the tests
# start their own. Where nothing says otherwise (Docker images do), a
# policy-rc.d keeps services from starting while this installs.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  $SUDO sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy"
  trap '$SUDO rm -f "$policy"' EXIT
fi
$SUDO apt-get update -qq
# neovim goes last, on its own: it depends on libluajit-5.1-2 or
# libluajit2-5.1-2, and with luajit2's already there apt keeps that one
# (the two conflict, and the OpenResty module needs luajit2's).
first="" later=""
for p in $missing; do
  if [ "$p" = neovim ]; then later=neovim; else first="$first $p"; fi
done
# shellcheck disable=SC2086
[ -z "$first" ] || $SUDO apt-get install -y -qq --no-install-recommends $first >/dev/null
# shellcheck disable=SC2086
[ -z "$later" ] || $SUDO apt-get install -y -qq --no-install-recommends $later >/dev/null
