"""`python -m peftkit` (and `torchrun ... -m peftkit train`): the command line."""

from peftkit.cli import main

raise SystemExit(main())
