"""The Prometheus exposition of the facts: ``backup-tasks metrics`` (once) and ``metrics --listen`` (a server).

Every scrape reads the sources again (``facts.collect``); nothing is cached between scrapes, so a
scrape that cannot read a source reports ``backup_tasks_up 0`` (and ``backup_tasks_source_up`` names
which) and leaves that source's values out instead of serving old ones. Task outcomes (started,
succeeded, failed, retried) are Celery events: Flower's ``/metrics`` serves them, not this exporter.

The verification values follow ``observe.verdict``, the rule ``health`` judges by: the newest backup's
verdict of each series (while it has none yet, the newest verdict before it), never the latest verdict
recorded for any backup, so an older backup verified again cannot turn a failed newest one green.

Labels: ``database`` and ``kind`` (``dump`` or ``snapshot``) on the per-backup series; ``database`` and
``chain`` (``full``, or ``incremental``: PostgreSQL 17+, restorable with its chain) on the per-snapshot series
(``snapshots``, ``last_snapshot_*``: the ``kind="snapshot"`` series stay as they were, the newest of either);
``database`` on the recovery window (with the WAL its newest moment replays), the newest chain and the drill;
``database``, ``timeline`` and ``system`` (the generation's system identifier: after a major upgrade the old
and the new server each have their ranges; empty for snapshots recorded without one) on the restorable
ranges; ``system`` and ``major`` on ``generation_snapshots`` (0 for a new server with no snapshot yet, which
health names); ``location`` (``archive``: the local WAL archive, ``copy``: ``<BACKUP_COPY_TO>/wal``) on the
WAL's newest segment; ``source`` (``catalog``, ``wal_archive``,
``wal_state``, ``server``) on ``backup_tasks_source_up``.

The copy's backlog (``wal_copy_backlog_*``: what wal-push queued for ``BACKUP_COPY_TO`` while it was
down or slow) and the dropped WAL (``wal_dropped_segments``) are read with the state file, from the
archive's directory (``wal.state.Recorded``): served whenever that source was read.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.clock import parse_time
from backup_tasks.errors import ConfigError
from backup_tasks.observe.facts import OWN_SOURCES, SERVER, Facts
from backup_tasks.observe.wal_copy import unresolved_drops
from backup_tasks.wal import state

log = logging.getLogger(__name__)

PREFIX = "backup_tasks_"
BACKUP_LABELS = ("database", "kind")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without PREFIX
    help: str
    labels: tuple[str, ...] = ()


#: Every metric this exporter can serve (the public contract: alert rules and dashboards use these names).
METRICS = (
    MetricSpec("up", "1 when this scrape read the backups' sources (catalog, WAL archive, its state file), else 0"),
    MetricSpec("source_up", "1 when this scrape read the source, 0 when it failed (left out: not configured)",
               ("source",)),
    MetricSpec("scrape_duration_seconds", "seconds this scrape took to read the sources"),
    MetricSpec("backups", "complete backups in the catalog", BACKUP_LABELS),
    MetricSpec("last_success_timestamp_seconds", "when the newest complete backup finished (unix time)",
               BACKUP_LABELS),
    MetricSpec("last_size_bytes", "size of the newest complete backup as stored", BACKUP_LABELS),
    MetricSpec("last_duration_seconds", "how long the newest complete backup took", BACKUP_LABELS),
    MetricSpec("last_verification_success", "1 when the verification of the newest backup passed, 0 when it "
                                            "failed (while the newest awaits its own: the newest verdict before it)",
               BACKUP_LABELS),
    MetricSpec("last_verification_timestamp_seconds", "when that verification ran (unix time)", BACKUP_LABELS),
    MetricSpec("last_verification_duration_seconds", "how long that verification took", BACKUP_LABELS),
    MetricSpec("wal_last_archived_timestamp_seconds",
               "completion time of the newest WAL segment acknowledged as stored in the location (unix time)",
               ("location",)),
    MetricSpec("wal_copy_backlog_segments", "WAL files in the local archive that the copy (BACKUP_COPY_TO) still "
                                            "lacks: queued by wal-push while the copy was down or slow"),
    MetricSpec("wal_copy_backlog_bytes", "size of those files as archived: what shipping them to the copy sends"),
    MetricSpec("wal_copy_backlog_oldest_age_seconds", "age of the oldest segment the copy lacks (now minus when the "
                                                      "server completed it); 0 when it lacks none"),
    MetricSpec("wal_dropped_segments", "WAL files wal-push acknowledged WITHOUT storing them (--drop-after) that no "
                                       "snapshot taken since makes irrelevant: recovery cannot cross them"),
    MetricSpec("archiver_failed_count", "pg_stat_archiver.failed_count: failed archive_command runs since the "
                                        "server's statistics were reset"),
    MetricSpec("archiver_last_failed_timestamp_seconds", "pg_stat_archiver.last_failed_time (unix time)"),
    MetricSpec("archiver_last_archived_timestamp_seconds", "pg_stat_archiver.last_archived_time (unix time)"),
    MetricSpec("recovery_window_start_timestamp_seconds",
               "the oldest moment point-in-time recovery can reach now (unix time)", ("database",)),
    MetricSpec("recovery_window_end_timestamp_seconds",
               "the newest moment point-in-time recovery can reach now (unix time)", ("database",)),
    MetricSpec("restorable_range_start_timestamp_seconds",
               "the oldest moment point-in-time recovery can reach now on the timeline (unix time)",
               ("database", "timeline", "system")),
    MetricSpec("restorable_range_end_timestamp_seconds",
               "the newest moment point-in-time recovery can reach now on the timeline (unix time)",
               ("database", "timeline", "system")),
    MetricSpec("generation_snapshots", "complete snapshots of each generation (system identifier, PostgreSQL major) "
                                       "the catalog and the WAL archive record", ("system", "major")),
    MetricSpec("snapshots", "complete snapshots in the catalog by chain: full, or incremental (restorable only with "
                            "every snapshot of its chain)", ("database", "chain")),
    MetricSpec("last_snapshot_timestamp_seconds", "when the newest complete full or incremental snapshot finished "
                                                  "(unix time)", ("database", "chain")),
    MetricSpec("last_snapshot_size_bytes", "size as stored of the newest complete full or incremental snapshot",
               ("database", "chain")),
    MetricSpec("newest_snapshot_chain_length", "snapshots a restore from the newest snapshot needs: 1 for a full, "
                                               "its whole chain for an incremental", ("database",)),
    MetricSpec("recovery_window_replay_segments", "WAL segments a restore to the newest restorable moment replays, "
                                                  "from the start of the newest snapshot reaching it", ("database",)),
    MetricSpec("recovery_window_max_replay_segments", "the longest replay (WAL segments) any moment of the recovery "
                                                      "window needs", ("database",)),
    MetricSpec("last_drill_success", "1 when the latest PITR drill passed, 0 when it failed", ("database",)),
    MetricSpec("last_drill_duration_seconds", "how long the latest PITR drill took (the RTO, measured)",
               ("database",)),
    MetricSpec("last_drill_timestamp_seconds", "when the latest PITR drill ran (unix time)", ("database",)),
)
METRIC_NAMES = tuple(PREFIX + spec.name for spec in METRICS)


def _stamp(moment: datetime | str) -> float:
    return (parse_time(moment) if isinstance(moment, str) else moment).timestamp()


def families(facts: Facts) -> list[Metric]:
    """The metric families of one reading (a family without samples is left out of the exposition)."""
    found = {spec.name: GaugeMetricFamily(PREFIX + spec.name, spec.help, labels=list(spec.labels))
             for spec in METRICS}

    def add(name: str, value: float, *labels: str) -> None:
        found[name].add_metric(list(labels), float(value))

    add("up", 1 if facts.up else 0)
    for source in facts.sources:
        if source.name in (*OWN_SOURCES, SERVER):
            add("source_up", 1 if source.ok else 0, source.name)
    add("scrape_duration_seconds", round(facts.duration_seconds, 6))
    for s in facts.series:
        labels = (s.database, s.kind)
        add("backups", s.count, *labels)
        add("last_success_timestamp_seconds", _stamp(s.newest.finished_at), *labels)
        add("last_size_bytes", s.newest.size_bytes, *labels)
        add("last_duration_seconds", s.newest.duration_seconds, *labels)
        if s.last_verification is not None:
            add("last_verification_success", 1 if s.last_verification.ok else 0, *labels)
            add("last_verification_timestamp_seconds", _stamp(s.last_verification.verified_at), *labels)
            add("last_verification_duration_seconds", s.last_verification.duration_seconds, *labels)
    for location, newest in sorted(facts.wal.items()):
        add("wal_last_archived_timestamp_seconds", newest.completed_at, location)
    if isinstance(facts.wal, state.Recorded):  # the state source was read
        backlog = facts.wal.backlog
        add("wal_copy_backlog_segments", backlog.files)
        add("wal_copy_backlog_bytes", backlog.bytes)
        add("wal_copy_backlog_oldest_age_seconds", round(backlog.age_seconds(facts.collected_at.timestamp()), 3))
        add("wal_dropped_segments", len(unresolved_drops(facts.wal.dropped, facts.backups)))
    if facts.archiver is not None:
        add("archiver_failed_count", facts.archiver.failed_count)
        if facts.archiver.last_failed_at is not None:
            add("archiver_last_failed_timestamp_seconds", facts.archiver.last_failed_at.timestamp())
        if facts.archiver.last_archived_at is not None:
            add("archiver_last_archived_timestamp_seconds", facts.archiver.last_archived_at.timestamp())
    for window in facts.windows:
        add("recovery_window_start_timestamp_seconds", window.start.timestamp(), window.database)
        add("recovery_window_end_timestamp_seconds", window.end.timestamp(), window.database)
        if window.replay is not None:
            add("recovery_window_replay_segments", window.replay.segments, window.database)
            add("recovery_window_max_replay_segments", window.replay.max_segments, window.database)
    _chain_families(facts, add)
    for window in facts.timeline_windows:
        labels = (window.database, str(window.timeline), window.system or "")
        add("restorable_range_start_timestamp_seconds", window.start.timestamp(), *labels)
        add("restorable_range_end_timestamp_seconds", window.end.timestamp(), *labels)
    for generation in facts.generations.generations:
        count = sum(1 for m in facts.backups if m.kind == "snapshot" and m.system_identifier == generation.system)
        add("generation_snapshots", count, generation.system, str(generation.major or ""))
    for drill in facts.drills:
        add("last_drill_success", 1 if drill.ok else 0, drill.database)
        if drill.duration_seconds is not None:
            add("last_drill_duration_seconds", drill.duration_seconds, drill.database)
        add("last_drill_timestamp_seconds", drill.drilled_at.timestamp(), drill.database)
    return [family for family in found.values() if family.samples]


def _chain_families(facts: Facts, add: Callable[..., None]) -> None:
    """The snapshots by chain label (``full``/``incremental``), beside the per-kind series the alerts read."""
    newest: dict[tuple[str, str], Manifest] = {}
    counts: dict[tuple[str, str], int] = {}
    for m in facts.backups:  # complete, oldest first: the last one of each label is the newest
        if m.kind == "snapshot":
            labels = (m.database, "incremental" if len(m.chain_ids) > 1 else "full")
            newest[labels] = m
            counts[labels] = counts.get(labels, 0) + 1
    for labels, m in sorted(newest.items()):
        add("snapshots", counts[labels], *labels)
        add("last_snapshot_timestamp_seconds", _stamp(m.finished_at), *labels)
        add("last_snapshot_size_bytes", m.size_bytes, *labels)
    for s in facts.series:
        if s.kind == "snapshot":
            add("newest_snapshot_chain_length", len(s.newest.chain_ids), s.database)


class FactsCollector(Collector):
    """A collector that reads the sources on every ``collect`` (every scrape)."""

    def __init__(self, read: Callable[[], Facts]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        return families(self.read())

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not read the sources (the registry calls collect() when describe is absent)


def registry_for(read: Callable[[], Facts]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FactsCollector(read))
    return registry


def exposition(facts: Facts) -> str:
    """The text exposition of one reading (``backup-tasks metrics``)."""
    return generate_latest(registry_for(lambda: facts)).decode()


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``127.0.0.1:9188``, ``[::1]:9188``, ``0.0.0.0:9188``) -> (host, port)."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"--listen must be HOST:PORT, e.g. 127.0.0.1:9188, got {text!r}")
    return host, int(port_text)


def serve(read: Callable[[], Facts], host: str, port: int, *, stop: threading.Event | None = None,
          ready: Callable[[int], None] | None = None) -> None:
    """Serve ``/metrics`` on ``host:port`` until SIGTERM/SIGINT (or ``stop`` is set); every scrape calls ``read``.

    ``ready`` is called with the bound port once the server listens (port 0 picks a free one).
    """
    from prometheus_client.exposition import start_http_server

    try:
        server, thread = start_http_server(port, addr=host, registry=registry_for(read))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    bound = server.server_address[1]
    log.info("serving /metrics on %s:%s", host, bound)
    if ready is not None:
        ready(bound)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

