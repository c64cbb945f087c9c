"""`python -m service` is the `saliency-server` command."""

import sys

from service.cli import main

sys.exit(main())
