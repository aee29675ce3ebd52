"""The benchmarks' shared harness: what more than one script in ``bench/`` needs, written once.

A script in ``bench/`` imports from here (as ``support.<module>``: Python puts a script's own folder
first on ``sys.path``) and from ``backup_tasks``, never from another script, so each benchmark can
change or go without touching the others.

* ``paths``      where the checkout, the results and the CLI are; temporary work directories
* ``measure``    one command measured from ``/proc`` (wall, CPU of its tree and of the servers serving
                 it, peak RSS); waiting for a quiet machine; the rotated order of a round; a
                 process's CPU so far
* ``machine``    facts about the host and the PostgreSQL server, for the reports
* ``databases``  the generated ``bt_bench_<MB>`` databases: made once, reused, dropped only if ours
* ``runners``    the daily cycle's measured runs: the seed's commands and ours (``run.py``), with
                 the environments they run in and the repeat-while-disturbed rule
* ``tuning``     the tuning experiments' orchestration (``run.py --experiments``); the measured
                 variants themselves run as children of ``experiments.py``
* ``processes``  the CLI's environment without the caller's settings, a free port, stopping a server
* ``s3``         moto as an S3 server (its own process, or a thread of the bench) and its clients
* ``synthetic_catalog``  a catalog of 84 dumps and 14 snapshots beside N archived WAL segments
* ``results``    result files under ``bench/results/``, Markdown tables, ratios of paired runs
"""

from __future__ import annotations

import sys

from support.paths import ROOT

MIB = 1 << 20

if str(ROOT) not in sys.path:
    # Measure the backup_tasks of this checkout, whichever one the virtualenv has installed.
    sys.path.insert(0, str(ROOT))
