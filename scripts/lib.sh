# Shared by scripts/test and scripts/demo: set SCRIPT to the caller's name
# before sourcing. Each step installs what it can (as root, through apt-get
# on Debian) and fails loudly otherwise.

die() {
  echo "$SCRIPT: $*" >&2
  exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

require_toolchains() {
  have cargo || die "cargo is required (https://rustup.rs)"
  have npm || die "npm (Node.js 20 or later) is required for the workerd upstream"
}

# cmake builds a C dependency of Pingora.
ensure_cmake() {
  have cmake && return
  if [ "$(id -u)" = 0 ] && have apt-get; then
    echo "$SCRIPT: installing cmake" >&2
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null || die "cannot install cmake"
  else
    die "cmake is required to build Pingora: install it (e.g. apt-get install cmake)"
  fi
}

# Installs Debian packages for their programs only: policy-rc.d keeps a
# package from starting its own service. Returns apt-get's status.
apt_install_no_start() {
  apt-get update -qq || die "apt-get update failed"
  local no_start= installed=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && no_start=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null || installed=$?
  if [ -n "$no_start" ]; then rm -f /usr/sbin/policy-rc.d; fi
  return "$installed"
}

# tests/cluster.rs runs its own redis-server child processes.
ensure_redis() {
  have redis-server && return
  if [ "$(id -u)" = 0 ] && have apt-get; then
    echo "$SCRIPT: installing redis-server" >&2
    apt_install_no_start redis-server || die "cannot install redis-server"
  else
    die "redis-server is required by tests/cluster.rs: install it (e.g. apt-get install redis-server)"
  fi
  have redis-server || die "the redis-server package did not install redis-server"
}

WORKERD=tests/worker/node_modules/@cloudflare/workerd-linux-64/bin/workerd

# workerd runs the repo's Worker (tests/worker), the demo and test upstream.
ensure_workerd() {
  if [ ! -x "$WORKERD" ] || [ "${1:-}" = always ]; then
    echo "$SCRIPT: installing the test Worker's runtime (npm ci in tests/worker)" >&2
    (cd tests/worker && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci failed in tests/worker"
  fi
  [ -x "$WORKERD" ] || die "workerd was not installed by npm ci"
}
