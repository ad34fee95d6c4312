"""`python -m jaxlm.generate`: see cli.py."""

import sys

from jaxlm.generate.cli import main

sys.exit(main())
