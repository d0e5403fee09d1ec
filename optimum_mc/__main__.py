"""``python -m optimum_mc`` = the ``optimum-mc`` command."""

from .cli import main

raise SystemExit(main())
