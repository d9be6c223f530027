"""`python -m torchinit demo|inspect`: the same as the `torchinit` command."""

from torchinit.cli import main

raise SystemExit(main())
