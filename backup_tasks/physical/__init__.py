"""Capability: physical backups and point-in-time recovery.

``snapshot`` takes a verified pg_basebackup (``compression``: compressed in our own process when
neither the server nor pg_basebackup can); ``plan`` decides which snapshot and WAL reach a
target (within the snapshot's generation: its system and major); ``ranges`` what each snapshot
restores to now; ``unpack`` restores a snapshot's files (checked byte for byte); ``chain`` the
incremental snapshots' parents and chains, ``combine`` a chain written into its full's files in
place (the changed blocks only); ``recovery`` writes the recovery settings, runs and judges
recovery; ``restore`` is the user's ``restore-pitr``; ``verify`` and ``drill`` prove a snapshot
restores, to the end of the archive and to a random moment; ``upgrade`` is a major upgrade's way
back (``backup-tasks upgrade --begin/--finish/--release-old``: the final snapshot and archived last
segment of the old server, the new server's generation and first snapshot, the release of the old
generation to retention).

Imports: core, infrastructure, catalog and wal. Must not import logical, worker or cli.
"""
