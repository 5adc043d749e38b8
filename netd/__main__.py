"""`python -m netd` is the `netd` command."""

from netd.cli import main

raise SystemExit(main())
