import sys

from xlora.cli import main

sys.exit(main())
