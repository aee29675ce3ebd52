# One image for every service of docker-compose.yml, built from this repository:
#  - `postgres`: the official PostgreSQL image, plus backup-tasks so that archive_command can run
#    `backup-tasks wal-push`;
#  - `worker`, `beat`, `flower`: backup-tasks on the same base, so pg_dump, pg_restore and the server
#    binaries verify needs (initdb, pg_ctl, amcheck) are exactly the server's major version.
# Build for another server major with `--build-arg PG_MAJOR=16`.
ARG PG_MAJOR=15
FROM postgres:${PG_MAJOR}-bookworm

# Debian bookworm's python3 is 3.11, the version backup-tasks needs; wheels exist for every dependency.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/backup-tasks/venv \
    PATH=/opt/backup-tasks/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /opt/backup-tasks

COPY pyproject.toml README.md ./
COPY backup_tasks ./backup_tasks
RUN python3 -m venv "$VIRTUAL_ENV" \
 && pip install --no-cache-dir . \
 && backup-tasks --version
# `celery -A backup_tasks ...` runs from here and reads this file (all settings come from the environment).
COPY celeryconfig.py ./

# The shared backups volume and beat's schedule state, owned by the postgres user (uid 999) that every
# service runs as: PostgreSQL's archive_command writes WAL there (its first wal-push creates /backups/wal),
# the worker writes dumps. A new named volume takes this ownership and mode from the image.
RUN mkdir -p /backups /var/lib/backup-tasks \
 && chown postgres:postgres /backups /var/lib/backup-tasks \
 && chmod 700 /backups /var/lib/backup-tasks
