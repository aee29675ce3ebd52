"""Capability: logical backups. ``pg_dump`` archives: take one (``dump``), prove it (``verify``), use it (``restore``,
through a staging database swapped in whole under any interrupt: ``swap``).

Imports: core, infrastructure and catalog. Must not import physical, wal, worker or cli.
"""
