"""Capability: the continuous WAL archive.

``names`` (segment names and LSN arithmetic), ``archive`` (wal-push / wal-fetch: compressed,
checksummed, fsynced, never clobbered), ``pushahead`` (wal-push with BACKUP_COPY_TO: the following
``.ready`` files stored ahead and recorded, so their own calls skip the copy), ``command`` (the two
commands as PostgreSQL runs them), ``coverage`` (what the archive can restore: timelines, gaps),
``restore_points``, ``setup`` (preparing the archive directory and ``check``).

``names``, ``archive``, ``pushahead`` and ``command`` are the per-segment fast path: they import no
Celery, redis, psycopg or sentry_sdk (an import-linter contract). Imports: core and infrastructure.
Must not import catalog, logical, physical, worker or cli.
"""
