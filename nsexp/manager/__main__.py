"""``python -m nsexp.manager``: the manager in the foreground."""

from nsexp.manager.cli import main

raise SystemExit(main())
