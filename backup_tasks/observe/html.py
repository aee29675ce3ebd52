"""``status --html FILE``: one self-contained page for a daily report (no script, no external asset).

The page is the ``status`` text and a timeline picture of the last ``TIMELINE_DAYS`` days, an inline
SVG (``<svg id="timeline">``): the recovery window (``rect.window``; after a fork one per timeline, the
newest on top, each titled with its timeline), every WAL gap (``line.gap``),
snapshots (``path.snapshot``) and dumps (``circle.dump``) each classed ``verified``, ``failed`` or
``unverified``, midnight grid lines in the exchange's timezone and a ``now`` line. Every mark carries a
``<title>`` (the tooltip: id, time, verdict). Colours are in the page's own ``<style>``. A failed
verification that speaks for the newest dump or snapshot (``status``'s ``series_verdict``, the rule health
judges by) is a red line at the top until a newer backup passes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from html import escape

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.clock import parse_time
from backup_tasks.observe.facts import Facts
from backup_tasks.observe.status import Document
from backup_tasks.settings import Settings

TIMELINE_DAYS = 28
WIDTH, HEIGHT = 1000, 200
LEFT, RIGHT = 130, 20
TOP, WINDOW_Y, SNAPSHOT_Y, DUMP_Y, AXIS_Y = 20, 32, 98, 140, 170
WINDOW_BAND = 20  # the height of one timeline's window when several are shown

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
.headline { font-size: 17px; margin: 0 0 16px; }
.problem { color: #c62828; font-weight: 600; }
pre.status { background: #f6f6f6; padding: 12px; overflow-x: auto; }
svg text { font: 12px system-ui, sans-serif; fill: #444; }
.window { fill: #90caf9; }
.since { fill: #0d47a1; }
.verified { fill: #2e7d32; }
.failed { fill: #c62828; }
.unverified { fill: #f9a825; }
.gap { stroke: #c62828; stroke-width: 3; stroke-dasharray: 6 3; }
.day { stroke: #e4e4e4; }
.now { stroke: #222; stroke-width: 1.5; }
.legend span { display: inline-block; margin-right: 16px; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -1px; }
table { border-collapse: collapse; margin-top: 16px; }
td, th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #eee; }
"""


def verdict_class(m: Manifest) -> str:
    if m.verification is None:
        return "unverified"
    return "verified" if m.verification.ok else "failed"


class Timeline:
    """Maps moments of the last ``days`` days onto the SVG's x axis."""

    def __init__(self, end: datetime, days: int = TIMELINE_DAYS) -> None:
        self.end = end
        self.start = end - timedelta(days=days)

    def x(self, moment: datetime) -> float:
        span = (self.end - self.start).total_seconds()
        offset = min(max((moment - self.start).total_seconds(), 0.0), span)
        return round(LEFT + offset / span * (WIDTH - LEFT - RIGHT), 1)

    def shows(self, moment: datetime) -> bool:
        return self.start <= moment <= self.end


def timeline_svg(facts: Facts, settings: Settings) -> str:
    zone = settings.tz
    axis = Timeline(facts.collected_at)
    parts = [f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="backups and recovery window, last '
             f'{TIMELINE_DAYS} days">']
    midnight = axis.start.astimezone(zone).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    while midnight < axis.end:
        x = axis.x(midnight)
        parts.append(f'<line class="day" x1="{x}" y1="{TOP}" x2="{x}" y2="{AXIS_Y}"/>')
        if midnight.weekday() == 0:
            parts.append(f'<text class="date" x="{x}" y="{AXIS_Y + 16}" text-anchor="middle">'
                         f'{midnight:%a %d %b}</text>')
        midnight += timedelta(days=1)  # wall-clock arithmetic in the zone: the next local midnight
    for label, y in (("recovery window", WINDOW_Y + 15), ("snapshots", SNAPSHOT_Y + 4), ("dumps", DUMP_Y + 4)):
        parts.append(f'<text class="row" x="8" y="{y}">{label}</text>')
    windows = facts.timeline_windows or facts.windows
    many = len({w.timeline for w in windows}) > 1
    for window in windows:
        if window.end < axis.start:
            continue
        # The newest timeline of a database on top, each older one a band lower (the row has room for three).
        below = sum(1 for w in windows if w.database == window.database and w.timeline > window.timeline)
        y, height = WINDOW_Y + below * WINDOW_BAND, 22 if not many else WINDOW_BAND - 3
        x1, x2 = axis.x(window.start), axis.x(window.end)
        on = f" on timeline {window.timeline}" if many else ""
        parts.append(f'<rect class="window" x="{x1}" y="{y}" width="{max(x2 - x1, 2)}" height="{height}">'
                     f'<title>{escape(window.database)}: restorable to any moment{on} from '
                     f'{_when(window.start, settings)} to {_when(window.end, settings)}</title></rect>')
        if window.start < axis.start:  # begins before the picture: say since when
            parts.append(f'<text class="since" x="{x1 + 6}" y="{y + 15}">\u2190 since '
                         f'{window.start.astimezone(zone):%a %d %b %H:%M}{on}</text>')
    for gap in facts.gaps:
        if axis.shows(gap.after):
            x = axis.x(gap.after)
            parts.append(f'<line class="gap" x1="{x}" y1="{TOP}" x2="{x}" y2="{AXIS_Y}"><title>WAL gap: segment '
                         f'{escape(gap.segment)} is missing; recovery stops at {_when(gap.after, settings)}'
                         f'</title></line>')
    for m in facts.backups:
        finished = parse_time(m.finished_at)
        if not axis.shows(finished):
            continue
        x, verdict = axis.x(finished), verdict_class(m)
        title = escape(f"{m.id}: finished {_when(finished, settings)}, {verdict}")
        if m.kind == "snapshot":
            parts.append(f'<path class="backup snapshot {verdict}" d="M{x},{SNAPSHOT_Y - 8} l8,8 l-8,8 l-8,-8 z">'
                         f'<title>{title}</title></path>')
        else:
            parts.append(f'<circle class="backup dump {verdict}" cx="{x}" cy="{DUMP_Y}" r="6">'
                         f'<title>{title}</title></circle>')
    now = axis.x(axis.end)
    parts.append(f'<line class="now" x1="{now}" y1="{TOP}" x2="{now}" y2="{AXIS_Y}"/>')
    parts.append(f'<text class="now-label" x="{now}" y="{TOP - 6}" text-anchor="middle">now</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _when(moment: datetime, settings: Settings) -> str:
    return moment.astimezone(settings.tz).strftime("%a %d %b %H:%M:%S %Z")


LEGEND = ('<p class="legend"><span><i style="background:#90caf9"></i>recovery window</span>'
          '<span><i style="background:#2e7d32"></i>verified</span><span><i style="background:#c62828"></i>'
          'failed verification</span><span><i style="background:#f9a825"></i>not verified</span>'
          '<span><i style="background:#c62828;height:3px"></i>WAL gap</span></p>')


def failed_verdicts(doc: Document) -> list[str]:
    """A line for the newest dump and snapshot whose series' verdict is a failure (see ``observe.verdict``)."""
    found = []
    for kind in ("dump", "snapshot"):
        newest = doc[f"newest_{kind}"]
        verdict = newest and newest["series_verdict"]
        if verdict and not verdict["ok"]:
            since = "" if verdict["backup_id"] == newest["id"] else f" and no newer {kind} has passed since"
            found.append(f"{kind} {verdict['backup_id']} failed verification{since}: "
                         + "; ".join(verdict["problems"][:2]))
    return found


def render_page(facts: Facts, doc: Document, text: str, settings: Settings) -> str:
    """The whole page: headline, problems, the timeline, its legend, the status text and the recent backups."""
    generated = _when(facts.collected_at, settings)
    lines = text.splitlines()
    headline = next((line for line in lines if line.startswith(("restorable", "point-in-time"))), "")
    problems = "".join(f'<p class="problem">{escape(p)}</p>' for p in [*doc["problems"], *failed_verdicts(doc)])
    axis = Timeline(facts.collected_at)
    rows = "".join(
        f"<tr><td>{escape(m.id)}</td><td>{escape(m.kind)}</td><td>{_when(parse_time(m.finished_at), settings)}</td>"
        f'<td class="{verdict_class(m)}-text">{verdict_class(m)}</td></tr>'
        for m in reversed(facts.backups) if axis.shows(parse_time(m.finished_at)))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Backups: status at {escape(generated)}</title><style>{STYLE}</style></head>\n<body>\n"
            f"<h1>Backups at {escape(generated)}</h1>\n<p class=\"headline\">{escape(headline)}</p>\n{problems}\n"
            f"{timeline_svg(facts, settings)}\n{LEGEND}\n<pre class=\"status\">{escape(text)}</pre>\n"
            f"<table><tr><th>backup</th><th>kind</th><th>finished</th><th>verification</th></tr>{rows}</table>\n"
            f"</body></html>\n")
