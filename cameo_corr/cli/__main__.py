"""``python -m cameo_corr.cli``: the ``cameo-corr`` command (also under ``accelerate launch -m``)."""

import sys

from cameo_corr.cli import main

sys.exit(main())
