"""Where things are: the project root and the console scripts of this virtualenv."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent
CELERY = str(VENV_BIN / "celery")
BACKUP_TASKS = str(VENV_BIN / "backup-tasks")
