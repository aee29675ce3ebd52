"""Capability: the continuous WAL archive.

``names`` (segment names and LSN arithmetic), ``layout`` (where each file lives, its modes),
``objects`` (an archived object: compressed, maybe encrypted, checksum trailer), ``archive``
(``WalArchive`` over a primary location and its copy: wal-push / wal-fetch and their promises),
``contents`` (what an archive holds: a directory's cached ``index``, any other location's one
listing), ``pushahead`` (wal-push with BACKUP_COPY_TO: the following ``.ready`` files stored ahead and
recorded, so their own calls skip the copy), ``backlog`` (what the copy lacks: queued by wal-push,
durable), ``ship`` (the catch-up shipper: wal-ship, the beat task, wal-push), ``dropped`` (WAL
acknowledged without storing: --drop-after), ``system`` (the system identifier of a segment and of
the archive), ``command`` (the two commands as PostgreSQL runs them:
their command line, parsed here for the fast path and the full CLI), ``state`` (the newest segment
acknowledged per location, for the exporter), ``coverage`` (what the archive can restore: timelines,
gaps), ``timelines`` (the history files as a tree: ancestry and fork points), ``fetch`` and
``absence`` (wal-fetch from whichever location holds a good file, and when "not archived" is
provable), ``restore_points``, ``remote`` (which archive a restore reads: a bucket's ``wal/`` alone,
read-only) and ``prefetch`` (its read-ahead), ``setup`` (preparing the archive directory and ``check``).

``names``, ``layout``, ``objects``, ``archive``, ``pushahead``, ``backlog``, ``ship``, ``dropped``,
``system``, ``command``, ``state`` (and, for wal-fetch, ``contents``, ``index``, ``fetch``,
``absence``, ``timelines``, ``prefetch``, ``remote``) are the per-segment fast path: they
import no Celery, redis, psycopg or sentry_sdk, and boto3 only through the S3 driver (import-linter
contracts). Imports: core and infrastructure. Must not import catalog, logical, physical, worker or cli.
"""
