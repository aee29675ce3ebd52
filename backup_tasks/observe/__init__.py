"""Adapter-side reading: what state the backups are in, for a Prometheus scrape, a person, or a daily
page.

``facts`` gathers one snapshot of the state from our own records, not from listing storage: the
catalog (the manifests at the top of ``BACKUP_DIR``), the WAL archive's state file (``wal.state``:
the newest segment per location, kept by wal-push), the snapshots' WAL coverage (the recovery
window, through ``physical.ranges``) and, when the server answers,
``pg_stat_archiver``. ``metrics`` turns those facts into the Prometheus exposition (``backup-tasks
metrics``, ``--listen``), ``status`` into the ``status`` text and JSON, ``html`` into the self-
contained ``status --html`` page; ``health`` judges them (``backup-tasks health``, the health task):
one reading, one judge, so what the metrics say and what health judges come from the same facts.
``continuity`` is the WAL survey health adds to the reading (the holes from the earliest restorable
snapshot on: it lists the archive's names only when there is a gap to describe). ``verdict`` is the
one rule for which verification speaks for a series of backups (the newest backup's; while it has
none, the newest verdict before it): health judges by it, the verification metrics and ``status``
show it. ``wal_copy`` is the WAL copy as health judges it (reachable, its backlog, dropped WAL).
``schedule`` describes the beat schedule in the exchange's timezone and its next runs.

Read-only: nothing here writes a backup, a manifest or the archive. Imports: capabilities (physical,
logical), catalog, wal, infrastructure and core. Must not import worker or cli (they import it).
"""
