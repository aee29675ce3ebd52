"""``python -m backup_tasks``: the console script, for installs without the ``backup-tasks`` script on disk."""

import sys

from backup_tasks.entry import main

sys.exit(main())
