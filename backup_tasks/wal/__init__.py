"""Capability: the continuous WAL archive.

``names`` (segment names and LSN arithmetic), ``files`` (modes, small files replaced atomically),
``archive`` (wal-push / wal-fetch: compressed,
checksummed, fsynced, never clobbered), ``pushahead`` (wal-push with BACKUP_COPY_TO: the following
``.ready`` files stored ahead and recorded, so their own calls skip the copy), ``command`` (the two
commands as PostgreSQL runs them), ``state`` (the newest segment acknowledged per location, for the
exporter), ``index`` (the archive's listing cached per directory), ``coverage`` (what the archive can
restore: timelines, gaps), ``restore_points``, ``remote`` and ``prefetch`` (the archive read from a
bucket alone, with read-ahead), ``setup`` (preparing the archive directory and ``check``).

``names``, ``files``, ``archive``, ``pushahead``, ``command`` and ``state`` are the per-segment fast
path: they import no Celery, redis, psycopg or sentry_sdk (an import-linter contract). Imports: core and infrastructure.
Must not import catalog, logical, physical, worker or cli.
"""
