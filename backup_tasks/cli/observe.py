"""Seeing the state at a glance: ``metrics`` (the Prometheus exporter) and ``status`` (text, JSON, a page).

``metrics`` exits 0 whenever it printed the exposition, ``backup_tasks_up 0`` included (a textfile
collector then replaces the old file with one that says the sources failed, instead of keeping stale
values). ``status`` exits 1 when a source (catalog, WAL archive, its state file, the copy's listing)
could not be read, else 0: it reports the state, it does not judge it (that is ``health``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backup_tasks.cli.output import Add, emit
from backup_tasks.settings import Settings


def cmd_metrics(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.observe.facts import collect
    from backup_tasks.observe.metrics import exposition, families, parse_listen, serve

    if args.listen:
        host, port = parse_listen(args.listen)
        serve(lambda: collect(settings), host, port, ready=lambda bound: print(
            f"backup-tasks metrics: serving /metrics on {host}:{bound}", file=sys.stderr, flush=True))
        return 0
    facts = collect(settings)
    if args.json:
        emit(args, {"ok": facts.up, "problems": facts.problems(),
                    "metrics": {f.name: [{"labels": s.labels, "value": s.value} for s in f.samples]
                                for f in families(facts)}}, "")
    else:
        sys.stdout.write(exposition(facts))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.observe.facts import collect
    from backup_tasks.observe.html import render_page
    from backup_tasks.observe.status import document, render_text

    facts = collect(settings, list_copy=True)
    doc = document(facts, settings)
    text = render_text(doc, settings)
    if args.html:
        path = Path(args.html).absolute()
        write_page(path, render_page(facts, doc, text, settings))
        doc["html"] = str(path)
        text += f"\npage written to {path}"
    emit(args, doc, text)
    return 0 if doc["ok"] else 1


def write_page(path: Path, page: str) -> None:
    """Atomically (a temporary name, then rename): a mail job never sends half a page."""
    from backup_tasks.storage.base import storage_error
    from backup_tasks.storage.files import write_atomically

    try:
        write_atomically(path, page.encode("utf-8"), mode=None)
    except OSError as exc:
        raise storage_error(exc, "writing", str(path)) from None


def register(add: Add) -> None:
    p = add("metrics", cmd_metrics, "print the Prometheus metrics once (for a textfile collector), or serve them "
                                    "with --listen")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="serve /metrics on HOST:PORT (e.g. 127.0.0.1:9188); every scrape reads the state again")
    p = add("status", cmd_status, "the backups at a glance: recovery window, newest dump and snapshot, WAL archive, "
                                  "copy, last drill, next runs")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained page with a timeline of the last "
                                                  "four weeks to FILE")
