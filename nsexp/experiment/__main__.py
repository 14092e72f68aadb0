"""``python -m nsexp.experiment``."""

from nsexp.experiment import main

raise SystemExit(main())
