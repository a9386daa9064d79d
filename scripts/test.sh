#!/usr/bin/env bash
# The whole test suite, as `make test` and CI run it:
#   bash scripts/test.sh [pytest args]
# Installs the system packages the tests need (PostgreSQL and Chromium from Debian) when missing,
# starts a throwaway PostgreSQL on a loopback port, runs pytest over SQLite and PostgreSQL, and
# stops the server whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "installing ${need[*]} from Debian's packages"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

export RLHF_TEST_PG_PORT=${RLHF_TEST_PG_PORT:-55433}
RLHF_TEST_PG_URL=$(scripts/pg_test_server.sh start)
export RLHF_TEST_PG_URL
trap 'scripts/pg_test_server.sh stop' EXIT
echo "throwaway PostgreSQL at $RLHF_TEST_PG_URL"

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest "$@"
