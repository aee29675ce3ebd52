"""Infrastructure: where backups live. One contract (``base.Storage``), met by every driver.

Drivers: ``local`` (a directory), ``s3`` (a bucket; boto3 only when used), ``memory`` (the reference
driver, for fast tests), ``mirrored`` (``BACKUP_DIR`` plus ``BACKUP_COPY_TO`` as one). ``integrity``
checks stored objects against their size and sha256 in each location; ``locations`` opens what the
settings name. ``objectlock`` is S3 Object Lock as applied here (the retention every write carries,
what a bucket enforces); ``versions`` picks, from a bucket's object versions, those current at a time.

Imports: ``errors`` and ``clock`` only (and boto3 inside ``s3``). Must not import settings, postgres,
streams, catalog, any capability or adapter.
"""
