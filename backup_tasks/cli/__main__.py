"""``python -m backup_tasks.cli``: the whole CLI (archive_command lines written by early versions use this form)."""

import sys

from backup_tasks.cli.main import main

sys.exit(main())
