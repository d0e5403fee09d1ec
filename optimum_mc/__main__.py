"""``python -m optimum_mc`` = the ``optimum-mc`` command."""

from .tools.cli import main

raise SystemExit(main())
