"""Infrastructure: where backups live. One contract (``base.Storage``), met by every driver.

Drivers: ``local`` (a directory), ``s3`` (a bucket; boto3 only when used), ``memory`` (the reference
driver, for fast tests), ``mirrored`` (``BACKUP_DIR`` plus ``BACKUP_COPY_TO`` as one). ``locations``
opens what the settings name (read-only on request: ``readonly``), and is the only way in to the
drivers from outside this package: callers ask a location its ``base.Features``, never its class.
``copies`` is the one policy for a primary location and its copy (in what order they are written and
deleted: the catalog's copy first, the WAL archive's primary first). ``files`` is the one atomic
write of a file (temporary name, fsync, rename or link) and the modes files and directories get
(the catalog's private ones, the WAL archive's shared with the server's OS user). ``integrity``
checks stored objects against their size and sha256 in each location. ``objectlock`` is S3 Object
Lock as applied here (the retention every write carries, what a bucket enforces); ``versions``
picks, from a bucket's object versions, those current at a time.

Imports: ``errors`` and ``clock`` only (and boto3 inside ``s3``). Must not import settings, postgres,
streams, catalog, any capability or adapter.
"""
