"""Adapter-side reading: what state the backups are in, for a Prometheus scrape, a person, or a daily page.

``facts`` gathers one snapshot of the state from our own records, never from listing storage: the
catalog (the manifests at the top of ``BACKUP_DIR``), the WAL archive's state file (``wal.state``:
the newest segment per location, kept by wal-push), the snapshots' WAL coverage (the recovery
window, through ``physical.plan.snapshot_ranges``) and, when the server answers, ``pg_stat_archiver``.
``metrics`` turns those facts into the Prometheus exposition (``backup-tasks metrics``, ``--listen``),
``status`` into the ``status`` text and JSON, ``html`` into the self-contained ``status --html`` page;
``schedule`` describes the beat schedule in the exchange's timezone and its next runs.

Read-only: nothing here writes a backup, a manifest or the archive. Imports: capabilities (physical,
logical), catalog, wal, infrastructure and core. Must not import worker or cli (they import it).
"""
