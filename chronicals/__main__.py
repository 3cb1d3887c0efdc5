"""`python -m chronicals train [CONFIG.yaml] [key=value ...]`: the same as the `chronicals` command."""

import sys

from chronicals.cli import main

sys.exit(main())
