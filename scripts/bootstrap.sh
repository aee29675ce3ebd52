#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine, idempotently: from Debian, PostgreSQL's
# client and server binaries, Redis and the tools the tests drive (zstd, age, Prometheus, Chromium);
# a virtualenv in .venv with exactly what requirements.lock names.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

need_apt=()
command -v pg_dump >/dev/null 2>&1 || [ -x /usr/lib/postgresql/15/bin/pg_dump ] || need_apt+=(postgresql postgresql-contrib)
command -v zstd >/dev/null 2>&1 || need_apt+=(zstd)
# The broker of the Celery tests, the locks and fencing: scripts/services.sh starts it (never the package).
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v age >/dev/null 2>&1 || need_apt+=(age)  # only for the interoperability test of encrypted backups
# promtool checks and unit-tests deploy/prometheus's alert rules; the server runs in one test, on a free port.
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)  # headless: renders `status --html` in a test
# The regression-database test (scripts/regression-db.sh) compiles pg_regress from PostgreSQL's sources.
{ command -v gcc && command -v make && command -v perl; } >/dev/null 2>&1 || need_apt+=(gcc make perl libc6-dev)
command -v bzip2 >/dev/null 2>&1 || need_apt+=(bzip2)  # the upstream tarball is .tar.bz2
# Debian's interpreter: the postgres OS user can run it (archive_command), root's pyenv one it cannot.
PY=/usr/bin/python3
if [ -x "$PY" ] && ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then need_apt+=(python3-venv); fi
if [ ${#need_apt[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "installing ${need_apt[*]} with apt-get"
  # No service may start from the install: a Prometheus on 9090 (or PostgreSQL on 5432, which
  # scripts/services.sh starts itself) is not ours to leave running, and a container has no init to
  # start one. policy-rc.d tells invoke-rc.d and deb-systemd-invoke so; a machine's own is left alone.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  # Without recommends: prometheus would bring node-exporter, another service.
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
  if [ -n "$(trap -p EXIT)" ]; then rm -f "$policy"; trap - EXIT; fi
  # Under systemd the package still enables its unit for the next boot: only the binaries are wanted.
  if [[ " ${need_apt[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
fi
[ -x "$PY" ] || PY=$(command -v python3)

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  log "creating .venv with $PY"
  rm -rf .venv
  "$PY" -m venv .venv
fi
# Everything in .venv comes from requirements.lock (exact versions, hashes checked): a release made
# between two runs cannot change what the tests run against. `make lock` refreshes it on purpose.
stamp=.venv/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  log "installing the locked dependencies (requirements.lock) and backup-tasks into .venv"
  .venv/bin/python -m pip install -q --require-hashes --no-deps -r requirements.lock 2>&1 \
    | grep -v -e '^WARNING: Location' -e '^$' >&2 || true
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 \
    | grep -v -e '^WARNING: Location' -e '^$' >&2 || true
  .venv/bin/python -m pip check >&2
  .venv/bin/python -c 'import backup_tasks.cli, celery, psycopg, zstandard, sentry_sdk, flower'
  rm -f .venv/.installed-* && touch "$stamp"
fi
