import sys

from bshadow_jax.cli import main

sys.exit(main())
