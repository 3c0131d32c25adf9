import sys

from hypersd_core.cli import main

sys.exit(main())
