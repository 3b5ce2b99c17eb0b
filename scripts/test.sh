#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine, exactly as CI runs it:
#   1. system packages the real-service tests need, when missing: a PostgreSQL server (the
#      multi-worker tuning test) and headless Chromium (the HTML report test);
#   2. a throwaway PostgreSQL server on 127.0.0.1, stopped on exit, its URL exported as
#      KASCADE_TEST_POSTGRES_URL;
#   3. a virtual environment with the CPU build of torch and kascade's test extra;
#   4. the lint (ruff) and the tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
pgdir=$(mktemp -d /tmp/kascade-pg.XXXXXX)
pgport=${KASCADE_TEST_PG_PORT:-55432}
# the server refuses to run as root: run it as the postgres user the package created
if [ "$(id -u)" = 0 ]; then chown postgres "$pgdir"; as_pg() { runuser -u postgres -- "$@"; }; else as_pg() { "$@"; }; fi
as_pg "$pgbin/initdb" -D "$pgdir/data" -U kascade --auth=trust >/dev/null
as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
  -o "-p $pgport -k $pgdir -c listen_addresses=127.0.0.1" start >/dev/null
trap 'as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -m fast stop >/dev/null 2>&1 || true' EXIT
as_pg "$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U kascade kascade_test
export KASCADE_TEST_POSTGRES_URL="postgresql+psycopg://kascade@127.0.0.1:$pgport/kascade_test"

python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -e ".[test]"
ruff check .
pytest
