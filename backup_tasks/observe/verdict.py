"""Which verification speaks for a series of backups (one database, one kind): the one rule.

``health`` judges by it, the metrics (``backup_tasks_last_verification_*``) expose it and ``status``
(text, JSON, page) shows it, so the three cannot disagree.

The rule: the verdict of the **newest** backup of the series. While the newest has none yet (its
verify task runs minutes after it, or has not run), the verdict of the newest backup that has one.
So a failed verification stays red until a newer backup *passes*:

- an older backup verified again afterwards (OK) does not hide the newest one's failure: the order
  is that of the backups (the catalog's, oldest first), never the time a verdict was recorded (which
  is what the metrics followed before, and a verdict recorded later is not about a newer backup);
- a newer backup that is not verified yet does not hide it either: it has proved nothing so far.

Why the fallback and not "nothing" while the newest awaits its verdict: a series without samples
would turn a failure into silence, and the dashboard's verdict into "No data", for the minutes (a
snapshot: hours) every new backup waits for its verification. That the newest itself is still
unverified is reported apart, by what only the newest can say: health's "has never been verified"
after its grace, and the alert BackupTasksNewestBackupUnverified, which compares the newest backup's
finish with the reported verification's time. A verdict of the newest backup is always later than its
finish; a fallback verdict of an older one normally is not. The one exception: an older backup verified
again by hand after the newest finished, while the newest stays unverified: that alert then waits for
the next backup, and health (every morning, to Sentry) names the newest as never verified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backup_tasks.catalog.manifest import Manifest, Verification


@dataclass(frozen=True)
class SeriesVerdict:
    """The newest backup of a series and the backup whose verification speaks for the series."""

    newest: Manifest
    judged: Manifest | None  # the newest, or (while it has no verdict) the newest backup that has one; None: never

    @property
    def verification(self) -> Verification | None:
        return None if self.judged is None else self.judged.verification

    @property
    def pending(self) -> bool:
        """The newest backup has no verdict of its own yet."""
        return self.newest.verification is None

    @property
    def failed(self) -> bool:
        return self.verification is not None and not self.verification.ok


def series_verdict(backups: Sequence[Manifest]) -> SeriesVerdict:
    """The rule (module docstring) for ``backups``: one database and kind, oldest first, at least one."""
    if not backups:
        raise ValueError("a series has at least one backup")
    judged = next((m for m in reversed(backups) if m.verification is not None), None)
    return SeriesVerdict(newest=backups[-1], judged=judged)


def of_same_series(backups: Sequence[Manifest], newest: Manifest) -> list[Manifest]:
    """The backups (oldest first) of ``newest``'s database and kind."""
    return [m for m in backups if (m.database, m.kind) == (newest.database, newest.kind)]
