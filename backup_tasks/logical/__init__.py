"""Capability: logical backups. ``pg_dump`` archives: take one (``dump``), prove it (``verify``), use it (``restore``).

Imports: core, infrastructure and catalog. Must not import physical, wal, worker or cli.
"""
