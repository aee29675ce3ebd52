"""Capability: physical backups and point-in-time recovery.

``snapshot`` takes a verified pg_basebackup; ``plan`` decides which snapshot and WAL reach a
target; ``unpack`` restores a snapshot's files (checked byte for byte); ``recovery`` writes the
recovery settings, runs and judges recovery; ``restore`` is the user's ``restore-pitr``;
``verify`` and ``drill`` prove a snapshot restores, to the end of the archive and to a random moment.

Imports: core, infrastructure, catalog and wal. Must not import logical, worker or cli.
"""
