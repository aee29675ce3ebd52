#!/usr/bin/env bash
# PostgreSQL 15's regression database (what `make installcheck` leaves behind), for tests that need a
# database nobody here wrote: 600+ tables, partitions, inheritance, RLS policies, roles, large objects.
#
#   scripts/regression-db.sh build                        fetch + build pg_regress and regress.so (cached)
#   scripts/regression-db.sh make-db HOST PORT [USER]     build if needed, then run the regression schedule
#                                                         against that server, leaving database `regression`
#
# The sources are Debian's source package postgresql-15 from bookworm's main suite (a deb-src list is
# added for it): 15.18 there, while the security suite's newer ones have no source served. Only what
# the schedule needs is built (pg_regress, regress.so, contrib/spi's refint.so and autoinc.so), with a
# configure that asks for nothing beyond gcc, make and perl (a release tree carries its generated parsers,
# so no bison or flex). The build is cached in $REGRESS_CACHE; a second run takes no time.
#
# A few of the 217 tests fail against a server newer than the sources (Debian's 15.20): expected, the
# database they leave is the point. make-db exits 0 whatever the tests say, prints
# `regression tests: N of M failed`, and exits non-zero only when the schedule could not run at all.
# Every phase prints its time as `[regression-db] phase NAME: S s` (stderr).
set -euo pipefail

VERSION=${REGRESS_PG_VERSION:-15.18-0+deb12u1}
UPSTREAM=${VERSION%%-*}
BINDIR=${REGRESS_PG_BINDIR:-/usr/lib/postgresql/15/bin}
# The server loads regress.so itself, as the postgres OS user: the cache must be readable by it, which
# root's home is not. So root (CI, this machine) caches under /var/cache, anyone else under theirs.
if [ "$(id -u)" = 0 ]; then default_cache=/var/cache/backup-tasks; else default_cache=${XDG_CACHE_HOME:-$HOME/.cache}/backup-tasks; fi
CACHE=${REGRESS_CACHE:-$default_cache/regress-$UPSTREAM}
SRC_LIST=/etc/apt/sources.list.d/backup-tasks-src.list

log() { printf '\033[1m[regression-db]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }
# The sources cannot be had (no deb-src entry allowed, no network): exit 3, which a test may skip on.
no_sources() { log "error: $*"; exit 3; }
now() { echo "$EPOCHREALTIME"; }
phase_done() { log "phase $1: $(awk -v a="$2" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"; }

# The mirror this machine already uses for bookworm's main suite (deb822 stanzas or one-line lists),
# else Debian's own.
mirror() {
  local uri
  uri=$(awk 'BEGIN { RS = "" } /Suites:[^\n]*[[:space:]]bookworm([[:space:]]|$)/ && !/security/ {
               if (match($0, /URIs:[[:space:]]*[^[:space:]]+/)) { split(substr($0, RSTART, RLENGTH), f, /[[:space:]]+/); print f[2]; exit } }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list \
        /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# apt-get source needs a deb-src entry of bookworm main; update that list alone (seconds, not the
# whole index), as root and without questions (CI has no stdin).
ensure_source_list() {
  local line
  line="deb-src $(mirror) bookworm main"
  if [ "$(cat "$SRC_LIST" 2>/dev/null)" != "$line" ]; then
    [ "$(id -u)" = 0 ] || no_sources "add '$line' to $SRC_LIST (needs root), or run this as root"
    echo "$line" >"$SRC_LIST"
  fi
  if ! apt-cache showsrc postgresql-15 2>/dev/null | grep -qxF "Version: $VERSION"; then
    [ "$(id -u)" = 0 ] || no_sources "run 'apt-get update' as root: postgresql-15=$VERSION has no source in the lists"
    log "apt-get update of $SRC_LIST"
    apt-get update -qq -o Dir::Etc::sourcelist="$SRC_LIST" -o Dir::Etc::sourceparts=- \
      -o APT::Get::List-Cleanup=0 </dev/null >/dev/null || no_sources "apt-get update of $SRC_LIST failed"
    apt-cache showsrc postgresql-15 2>/dev/null | grep -qxF "Version: $VERSION" \
      || no_sources "the apt lists have no source of postgresql-15=$VERSION (is bookworm main at $(mirror) reachable?)"
  fi
}

build() {
  if [ -f "$CACHE/.complete" ]; then
    log "cached build in $CACHE"
    return
  fi
  # Two test runs at once (CI beside a developer's) build once: the second waits, then finds the cache.
  mkdir -p "$(dirname "$CACHE")"
  chmod 755 "$(dirname "$CACHE")"
  exec 9>"$CACHE.lock"
  flock 9
  if [ -f "$CACHE/.complete" ]; then
    log "cached build in $CACHE"
    return
  fi
  for tool in gcc make perl; do command -v $tool >/dev/null || die "$tool is needed to build pg_regress"; done
  local t
  work=$(mktemp -d "${TMPDIR:-/tmp}/regress-build-XXXXXX")  # global: the EXIT trap reads it
  trap 'rm -rf "$work"' EXIT

  t=$(now)
  ensure_source_list
  # Download only and unpack the upstream tarball ourselves: Debian's patches concern packaging (and
  # dpkg-source, from dpkg-dev, would be one more tool to have).
  (cd "$work" && apt-get source -q --download-only "postgresql-15=$VERSION" </dev/null >"$work/fetch.log" 2>&1) \
    || { tail -5 "$work/fetch.log" >&2; no_sources "apt-get source --download-only postgresql-15=$VERSION failed"; }
  tar -C "$work" -xf "$work"/postgresql-15_"$UPSTREAM".orig.tar.*
  phase_done fetch "$t"

  local tree="$work/postgresql-$UPSTREAM"
  t=$(now)
  (cd "$tree" && ./configure -q --without-readline --without-icu --without-zlib >"$work/configure.log" 2>&1) \
    || { tail -20 "$work/configure.log" >&2; die "configure failed"; }
  phase_done configure "$t"

  t=$(now)
  local jobs
  jobs=$(nproc 2>/dev/null || echo 2)
  # regress.c includes backend headers, some generated (fmgroids.h, catalog/*_d.h, by perl);
  # pg_regress links src/port and src/common; the schedule also loads contrib/spi's two modules.
  {
    make -s -j"$jobs" -C "$tree/src/backend" generated-headers &&
    make -s -j"$jobs" -C "$tree/src/port" &&
    make -s -j"$jobs" -C "$tree/src/common" &&
    make -s -j"$jobs" -C "$tree/contrib/spi" refint.so autoinc.so &&
    make -s -j"$jobs" -C "$tree/src/test/regress" all
  } >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; die "build failed"; }
  phase_done build "$t"

  # The cache: the regress directory as installcheck uses it (schedule, sql/, expected/, data/,
  # the binaries), world-readable, completed under a temporary name and renamed into place.
  local staging="$CACHE.tmp.$$"
  rm -rf "$staging"
  mkdir -p "$staging"
  (cd "$tree/src/test/regress" && tar -cf - --exclude='*.o' --exclude='*.c' --exclude='*.h' \
      --exclude=GNUmakefile --exclude=results --exclude=log .) | tar -C "$staging" --no-same-owner -xf -
  # Ours, and writable by no one else: the server loads regress.so from here.
  chmod -R u=rwX,go=rX "$staging"
  touch "$staging/.complete"
  rm -rf "$CACHE"
  mv "$staging" "$CACHE"
  log "built into $CACHE"
}

make_db() {
  local host=$1 port=$2 user=${3:-postgres}
  build
  [ -x "$BINDIR/psql" ] || die "no psql in $BINDIR (set REGRESS_PG_BINDIR)"
  local out t
  out=$(mktemp -d "${TMPDIR:-/tmp}/regress-run-XXXXXX")
  # Tests write server-side files (COPY ... TO 'results/...') as the server's OS user: as root, the
  # output directory is the postgres user's and pg_regress runs as that user too.
  local as=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$out"
    chmod 755 "$out"
    as=(runuser -u postgres --)
  fi
  t=$(now)
  local rc=0
  (cd "$out" && "${as[@]}" "$CACHE/pg_regress" --inputdir="$CACHE" --outputdir="$out" \
      --bindir="$BINDIR" --dlpath="$CACHE" --host="$host" --port="$port" --user="$user" \
      --max-concurrent-tests=20 --schedule="$CACHE/parallel_schedule" >"$out/pg_regress.out" 2>&1) || rc=$?
  phase_done run "$t"
  # pg_regress ends with "N of M tests failed." or "All M tests passed."; without either it never ran.
  local summary failed total
  summary=$(grep -E '^ *([0-9]+ of [0-9]+ tests failed|All [0-9]+ tests passed)' "$out/pg_regress.out" || true)
  if [ -z "$summary" ]; then
    tail -30 "$out/pg_regress.out" >&2
    die "pg_regress did not run the schedule (exit $rc); its output is in $out"
  fi
  if [[ $summary =~ ([0-9]+)\ of\ ([0-9]+) ]]; then failed=${BASH_REMATCH[1]} total=${BASH_REMATCH[2]}
  else failed=0 total=$(grep -oE '[0-9]+' <<<"$summary" | head -1); fi
  grep -E '\.\.\. FAILED' "$out/pg_regress.out" | awk '{ printf "  failed: %s\n", $1 }' >&2 || true
  log "regression tests: $failed of $total failed (fine: the database they leave is the point); output in $out"
  echo "$out"
}

case "${1:-}" in
  build) build; echo "$CACHE" ;;
  make-db) [ $# -ge 3 ] || die "usage: $0 make-db HOST PORT [USER]"; shift; make_db "$@" ;;
  *) echo "usage: $0 build | make-db HOST PORT [USER]" >&2; exit 2 ;;
esac
