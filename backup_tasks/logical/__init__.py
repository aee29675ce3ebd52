"""Capability: logical backups. ``pg_dump`` archives: take one (``dump``), prove it (``verify``), use it (``restore``,
through a staging database swapped in whole under any interrupt: ``swap``).

Beside each dump, the cluster-level objects its database needs (``globals``: roles, memberships, the
database's own properties), stored and loaded like the dump. ``pgrestore`` runs ``pg_restore`` on a stored
dump; ``noowner`` restores without the backup's owners when policies name roles the target lacks.

Imports: core, infrastructure and catalog. Must not import physical, wal, worker or cli.
"""
