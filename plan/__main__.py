import sys

from repae.plan.count import main

sys.exit(main())
