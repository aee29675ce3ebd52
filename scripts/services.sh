#!/usr/bin/env bash
# Make sure the local services the tests use are up (PostgreSQL on 5432, Redis on 6379); start them if not.
# Under CI (CI set) a service that cannot be started stops the run here, naming it: the tests would
# otherwise fail one by one, or skip, far from the cause.
set -uo pipefail
log() { printf '\033[1m[services]\033[0m %s\n' "$*" >&2; }
missing=()

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    log "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -n | tail -1)" main start || true
  fi
  # No server on 5432 is allowed: the tests then start a throwaway cluster from the local binaries.
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || log "no PostgreSQL on 127.0.0.1:5432: tests use a throwaway cluster"
fi
[ -x /usr/lib/postgresql/15/bin/postgres ] || command -v postgres >/dev/null || missing+=("PostgreSQL server binaries (apt-get install postgresql)")

redis_up() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }
if ! redis_up; then
  if command -v redis-server >/dev/null; then
    log "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    for _ in $(seq 1 50); do redis_up && break; sleep 0.1; done
  fi
  redis_up || missing+=("Redis on 127.0.0.1:6379 (apt-get install redis-server; see /var/log/redis/ci.log)")
fi

if [ ${#missing[@]} -gt 0 ]; then
  for what in "${missing[@]}"; do log "missing: $what"; done
  if [ -n "${CI:-}" ]; then
    log "CI needs every real service the tests use; stopping here"
    exit 1
  fi
fi
exit 0
