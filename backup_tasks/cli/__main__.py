"""``python -m backup_tasks.cli``: the console script (archive_command lines written by earlier versions use it)."""

import sys

from backup_tasks.entry import main

sys.exit(main())
