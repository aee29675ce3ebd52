"""``backup-tasks status``: the facts as one JSON document and a few lines a person reads in five seconds.

The document's keys (``status --json``) are a public contract::

    ok                  every source was read (the server excepted: see ``facts``)
    generated_at        this reading (UTC, ISO 8601); timezone: the exchange's (BACKUP_TIMEZONE)
    recovery_window     {database, timeline, start, end, end_age_seconds, snapshot_id, replay, timelines} or null:
                        PITR to the latest point follows ``timeline`` (the newest its snapshots restore onto) and
                        reaches any moment in it; ``timelines``: [{timeline, start, end, end_age_seconds,
                        snapshot_id, replay}], the window on every timeline the database's snapshots restore onto
                        (after a fork a moment can be on several: ``restore-pitr --timeline N`` picks one);
                        ``replay``: {snapshot_id, chain, from_segment, to_segment, segments, max_segments} or null:
                        a restore to ``end`` starts from ``snapshot_id`` (its ``chain`` restored first, root
                        first) and replays ``segments`` WAL segments from ``from_segment``; ``max_segments``: the
                        longest replay any moment of the window needs
    newest_dump         {id, database, finished_at, age_seconds, size_bytes, duration_seconds,
    newest_snapshot      verification: {ok, verified_at, duration_seconds, problems} or null,
                         series_verdict: {backup_id, ok, verified_at, duration_seconds, problems} or null} or null
                        ``verification`` is this backup's own; ``series_verdict`` the one health and the
                        metrics go by (``observe.verdict``): this backup's, or while it has none yet the
                        newest verdict before it, so a failure shows until a newer backup passes;
                        a snapshot also has restorable_from, ``chain`` (the ids a restore from it needs, root
                        first: [id] for a full) and ``incremental`` (true: PostgreSQL 17+'s incremental backup)
    wal                 {archive, copy: {segment, completed_at, stored_at, lag_seconds, where} or null,
                         gaps: [{segment, after}], archiver: pg_stat_archiver's row (+ failing) or null}
    generations         [{system_identifier, major, opened_at, reason, previous, first_segment, released, snapshots,
                         newest_snapshot, windows: [{database, timeline, start, end, end_age_seconds, snapshot_id}]}]:
                        the PostgreSQL systems the catalog and the WAL archive held across major upgrades, oldest
                        first (one before any upgrade); ``recovery_window`` is the newest generation's
    generation_problem  "the new server (PostgreSQL 18, system ...) has no snapshot yet: take one ..." or null
    copy                {location, reachable, error, backups_missing: [ids], wal_behind_seconds} or null
    last_drill          {database, snapshot_id, ok, drilled_at, duration_seconds, target_time, problems} or null
    next_runs           [{name, task, what, at}]: the beat schedule's next runs, in the exchange's timezone
    sources             [{name, ok, error}]; problems: one line per source that failed
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from backup_tasks.catalog.generations import no_snapshot_problem, without_snapshot
from backup_tasks.catalog.manifest import Manifest, Verification
from backup_tasks.clock import isoformat, parse_time
from backup_tasks.observe.facts import COPY_SOURCE, Facts, RecoveryWindow
from backup_tasks.observe.schedule import next_runs
from backup_tasks.observe.verdict import SeriesVerdict
from backup_tasks.progress import human_size
from backup_tasks.settings import Settings
from backup_tasks.wal.state import ARCHIVE, COPY, Newest

Document = dict[str, Any]


def document(facts: Facts, settings: Settings) -> Document:
    now = facts.collected_at
    dumps = [m for m in facts.backups if m.kind == "dump"]
    snapshots = [m for m in facts.backups if m.kind == "snapshot"]
    newest_snapshot = snapshots[-1] if snapshots else None
    window = next((w for w in facts.windows if newest_snapshot and w.database == newest_snapshot.database),
                  facts.windows[-1] if facts.windows else None)
    drill = max(facts.drills, key=lambda d: d.drilled_at) if facts.drills else None
    copy = facts.source(COPY_SOURCE)
    missing = without_snapshot(facts.generations, snapshots)
    return {
        "ok": facts.up and all(s.ok for s in facts.sources if s.name == COPY_SOURCE),
        "generated_at": isoformat(now),
        "timezone": settings.timezone,
        "backup_dir": facts.backup_dir,
        "recovery_window": None if window is None else {
            "database": window.database, **_window(window, now),
            "timelines": [_window(w, now) for w in facts.timeline_windows
                          if w.database == window.database and w.system == window.system]},
        "generations": [{**g.to_dict(),
                         "snapshots": sum(1 for m in snapshots if m.system_identifier == g.system),
                         "newest_snapshot": next((m.id for m in reversed(snapshots) if m.system_identifier == g.system),
                                                 None),
                         "windows": [{"database": w.database, **_window(w, now)} for w in facts.timeline_windows
                                     if w.system == g.system]}
                        for g in facts.generations.generations],
        "generation_problem": None if missing is None else no_snapshot_problem(missing),
        "newest_dump": _backup(dumps[-1], now, _verdict(facts, dumps[-1])) if dumps else None,
        "newest_snapshot": _backup(newest_snapshot, now, _verdict(facts, newest_snapshot)) if newest_snapshot else None,
        "wal": {
            "archive": _newest(facts.wal.get(ARCHIVE), now),
            "copy": _newest(facts.wal.get(COPY), now),
            "gaps": [{"segment": g.segment, "after": _iso(g.after)} for g in facts.gaps],
            "archiver": None if facts.archiver is None else {
                "archived_count": facts.archiver.archived_count,
                "last_archived_wal": facts.archiver.last_archived_wal,
                "last_archived_at": _iso(facts.archiver.last_archived_at),
                "failed_count": facts.archiver.failed_count,
                "last_failed_wal": facts.archiver.last_failed_wal,
                "last_failed_at": _iso(facts.archiver.last_failed_at),
                "failing": facts.archiver.failing},
        },
        "copy": None if not facts.copy_to else {
            "location": facts.copy_to,
            "reachable": None if copy is None else copy.ok,
            "error": None if copy is None else copy.error,
            "backups_missing": facts.copy_missing,
            "wal_behind_seconds": copy_wal_behind(facts)},
        "last_drill": None if drill is None else {
            "database": drill.database, "snapshot_id": drill.snapshot_id, "ok": drill.ok,
            "drilled_at": _iso(drill.drilled_at), "duration_seconds": drill.duration_seconds,
            "target_time": drill.target_time, "problems": drill.problems},
        "next_runs": [{"name": run.name, "task": run.task, "what": run.what, "at": at.isoformat()}
                      for run, at in next_runs(settings, now)],
        "sources": [{"name": s.name, "ok": s.ok, "error": s.error} for s in facts.sources],
        "problems": facts.problems(),
    }


def _window(window: RecoveryWindow, now: datetime) -> Document:
    replay = window.replay
    return {"timeline": window.timeline, "start": _iso(window.start), "end": _iso(window.end),
            "end_age_seconds": round((now - window.end).total_seconds(), 3), "snapshot_id": window.snapshot_id,
            "replay": None if replay is None else {
                "snapshot_id": replay.snapshot_id, "chain": list(replay.chain), "from_segment": replay.from_segment,
                "to_segment": replay.to_segment, "segments": replay.segments, "max_segments": replay.max_segments}}


def copy_wal_behind(facts: Facts) -> float | None:
    """How far the copy's newest WAL is behind the archive's (completion times, seconds); None if unknown."""
    archive, copy = facts.wal.get(ARCHIVE), facts.wal.get(COPY)
    if archive is None or copy is None:
        return None
    return round(max(0.0, archive.completed_at - copy.completed_at), 3)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _verdict(facts: Facts, newest: Manifest) -> SeriesVerdict:
    """The verdict of ``newest``'s series, as ``facts.series`` computed it for the metrics."""
    return next(s.verdict for s in facts.series if (s.database, s.kind) == (newest.database, newest.kind))


def _verification(v: Verification | None) -> Document | None:
    return None if v is None else {"ok": v.ok, "verified_at": v.verified_at, "duration_seconds": v.duration_seconds,
                                   "problems": v.problems}


def _backup(m: Manifest, now: datetime, verdict: SeriesVerdict) -> Document:
    finished = parse_time(m.finished_at)
    standing = _verification(verdict.verification)
    out: Document = {
        "id": m.id, "database": m.database, "finished_at": m.finished_at,
        "age_seconds": round((now - finished).total_seconds(), 3), "size_bytes": m.size_bytes,
        "duration_seconds": round(m.duration_seconds, 3), "verification": _verification(m.verification),
        "series_verdict": None if standing is None or verdict.judged is None else
        {"backup_id": verdict.judged.id, **standing}}
    if m.kind == "snapshot":
        out["restorable_from"] = m.restorable_from
        out["chain"] = m.chain_ids
        out["incremental"] = len(m.chain_ids) > 1
    return out


def _newest(entry: Newest | None, now: datetime) -> Document | None:
    if entry is None:
        return None
    return {"segment": entry.segment, "completed_at": _iso(datetime.fromtimestamp(entry.completed_at, now.tzinfo)),
            "stored_at": _iso(datetime.fromtimestamp(entry.stored_at, now.tzinfo)),
            "lag_seconds": round(max(0.0, now.timestamp() - entry.completed_at), 3), "where": entry.where}


# --- the human text ---------------------------------------------------------------------------------

def ago(seconds: float) -> str:
    """``40 s``, ``12 min``, ``5.2 h``, ``3.1 d``: an age read at a glance."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def local(text: str | None, settings: Settings, *, seconds: bool = False) -> str:
    """An ISO time as the exchange reads it: ``Mon 30 Nov 14:05 IST``."""
    if not text:
        return "?"
    return parse_time(text).astimezone(settings.tz).strftime("%a %d %b %H:%M" + (":%S" if seconds else "") + " %Z")


def render_text(doc: Document, settings: Settings) -> str:
    """The few lines of ``status``."""
    lines = [f"PROBLEM {p}" for p in doc["problems"]]
    if doc.get("generation_problem"):
        lines.append(f"PROBLEM {doc['generation_problem']}")
    window = doc["recovery_window"]
    others = [w for w in window.get("timelines") or [] if w["timeline"] != window["timeline"]] if window else []
    if window:
        on = f" on timeline {window['timeline']}" if others else ""
        lines.append(f"restorable to any moment from {local(window['start'], settings)} to "
                     f"{local(window['end'], settings, seconds=True)} ({ago(window['end_age_seconds'])} ago){on}")
        lines += [f"  and on timeline {w['timeline']} from {local(w['start'], settings)} to "
                  f"{local(w['end'], settings, seconds=True)} (restore-pitr --timeline {w['timeline']})"
                  for w in others]
    else:
        lines.append("point-in-time recovery: no snapshot with its WAL (dumps only)")
    generations = doc.get("generations") or []
    if len(generations) > 1:  # after a major upgrade: each server's way back
        for g in generations[:-1]:
            reach = max((w["end"] for w in g["windows"]), default=None)
            lines.append(f"  old generation PostgreSQL {g['major']} (system {g['system_identifier']}): "
                         + (f"restorable up to {local(reach, settings, seconds=True)}" if reach else
                            "no restorable snapshot") + (", released" if g["released"] else ""))
    rows = [("newest dump", _backup_line(doc["newest_dump"], settings)),
            ("newest snapshot", _backup_line(doc["newest_snapshot"], settings) + _chain_text(doc)),
            ("WAL archive", _wal_line(doc["wal"], settings)),
            ("last drill", _drill_line(doc["last_drill"], settings))]
    if doc["copy"] is not None:
        rows.append(("copy", _copy_line(doc["copy"], doc["wal"])))
    rows.append(("next runs", ", ".join(f"{r['what']} {_local_at(r['at'], settings)}" for r in doc["next_runs"])))
    lines += [f"{label:16} {text}" for label, text in rows]
    return "\n".join(lines)


def _local_at(text: str, settings: Settings) -> str:
    return datetime.fromisoformat(text).astimezone(settings.tz).strftime("%a %d %b %H:%M %Z")


def _backup_line(b: Document | None, settings: Settings) -> str:
    if b is None:
        return "none"
    v, standing = b["verification"], b["series_verdict"]
    verdict = ("NOT VERIFIED" if v is None else
               f"verified ok {local(v['verified_at'], settings)}" if v["ok"] else
               "VERIFICATION FAILED: " + "; ".join(v["problems"][:2]))
    if v is None and standing is not None and not standing["ok"]:  # a failure stands until a newer backup passes
        verdict += (f", and {standing['backup_id']} before it FAILED VERIFICATION: "
                    + "; ".join(standing["problems"][:2]))
    return (f"{local(b['finished_at'], settings)} ({ago(b['age_seconds'])} ago), {human_size(b['size_bytes'])} in "
            f"{ago(b['duration_seconds'])}, {verdict}  [{b['id']}]")


def _chain_text(doc: Document) -> str:
    """``, incremental (chain of 3); the latest moment replays 5 WAL segments``: what a restore starts from."""
    snapshot, window = doc["newest_snapshot"], doc["recovery_window"]
    text = f", incremental (chain of {len(snapshot['chain'])})" if snapshot and snapshot.get("incremental") else ""
    replay = window.get("replay") if window else None
    if replay:
        text += f"; the latest moment replays {replay['segments']} WAL segments"
        if replay["max_segments"] > replay["segments"]:
            text += f" (up to {replay['max_segments']} for an earlier moment)"
    return text


def _wal_line(wal: Document, settings: Settings) -> str:
    archive = wal["archive"]
    parts = [f"newest {archive['segment']} completed {ago(archive['lag_seconds'])} ago" if archive else
             "no segment recorded yet"]
    parts.append("no gaps" if not wal["gaps"] else
                 "GAP at " + ", ".join(f"{g['segment']} (after {local(g['after'], settings)})" for g in wal["gaps"]))
    archiver = wal["archiver"]
    if archiver is not None:
        parts.append(f"archive_command FAILING since {local(archiver['last_failed_at'], settings)} "
                     f"({archiver['last_failed_wal']})"
                     if archiver["failing"] else f"archiver ok, {archiver['failed_count']} failures since reset")
    return "; ".join(parts)


def _drill_line(d: Document | None, settings: Settings) -> str:
    if d is None:
        return "none yet"
    rto = f"RTO {d['duration_seconds']:.1f} s" if d["duration_seconds"] is not None else "RTO unknown"
    verdict = "ok" if d["ok"] else "FAILED: " + "; ".join(d["problems"][:2])
    return f"{verdict}, {rto}, {local(d['drilled_at'], settings)} from {d['snapshot_id']}"


def _copy_line(copy: Document, wal: Document) -> str:
    parts = [copy["location"]]
    if copy["reachable"] is False:
        parts.append(f"NOT READABLE: {copy['error']}")
    elif copy["backups_missing"]:
        parts.append(f"{len(copy['backups_missing'])} backup(s) MISSING: {', '.join(copy['backups_missing'][:3])}")
    elif copy["backups_missing"] is not None:
        parts.append("every backup copied")
    behind = copy["wal_behind_seconds"]
    if wal["copy"] is None:
        parts.append("no WAL copy recorded")
    elif behind:
        parts.append(f"WAL {ago(behind)} BEHIND the archive ({wal['copy']['segment']})")
    else:
        parts.append("WAL up to date")
    return "; ".join(parts)

