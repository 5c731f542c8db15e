#!/usr/bin/env bash
# The README's test command, and what CI (.ci/run) runs: on a fresh Debian/Ubuntu machine it installs what
# the tests need, installs the project (editable, with the dev and postgres extras), then runs pytest.
#
#   scripts/test.sh                         # the whole suite
#   scripts/test.sh tests/test_data.py -x   # arguments go to pytest
#
# Tests use real components and skip nothing: a throwaway PostgreSQL cluster (Debian's postgresql), headless
# Chromium (chromium + chromium-driver) for the dashboard, an MQTT broker (mosquitto), real processes and
# filesystem events (util-linux: setpriv, runuser), git. Missing Debian packages are installed with apt-get
# (as root, or through sudo). PYTHON picks the interpreter (default python3; use a virtual environment's
# where the system Python is externally managed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
need_apt=()
have git || need_apt+=(git)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || have initdb || need_apt+=(postgresql)
have chromium || have chromium-browser || need_apt+=(chromium)
have chromedriver || need_apt+=(chromium-driver)
have mosquitto || need_apt+=(mosquitto)
{ have setpriv && have runuser; } || need_apt+=(util-linux)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing Debian packages: ${need_apt[*]}" >&2
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "scripts/test.sh: need root or sudo to install ${need_apt[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  # Debian's packages start a PostgreSQL cluster and a broker of their own where an init system lets them;
  # the tests run throwaway ones on free ports, so stop what was started by this installation.
  if [[ " ${need_apt[*]} " == *" postgresql "* ]] && command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r version cluster _; do
      "${sudo[@]}" pg_ctlcluster "$version" "$cluster" stop >/dev/null 2>&1 || true
    done
  fi
  if [[ " ${need_apt[*]} " == *" mosquitto "* ]] && command -v service >/dev/null; then
    "${sudo[@]}" service mosquitto stop >/dev/null 2>&1 || true
  fi
fi

"$PYTHON" -m pip install --quiet -e ".[dev,postgres]"
status=0
"$PYTHON" -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests (exit 5): that is a failure here" >&2
fi
exit "$status"
