import sys

from repae.plan.cli import main

sys.exit(main())
