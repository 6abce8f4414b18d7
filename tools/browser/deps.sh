#!/bin/sh
# make test-browser's installs: Debian's chromium (and Node.js with npm
# where the machine has none), then playwright-core from the npm registry
# at the version package-lock.json pins. Idempotent.
set -eu
cd "$(dirname "$0")"
need=""
command -v chromium >/dev/null 2>&1 || need="$need chromium"
command -v node >/dev/null 2>&1 || need="$need nodejs"
command -v npm >/dev/null 2>&1 || need="$need npm"
if [ -n "$need" ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "buzz: installing from Debian:$need"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    --no-install-recommends $need >/dev/null
fi
if [ ! -f node_modules/playwright-core/package.json ]; then
  npm ci --no-audit --no-fund --silent
fi
