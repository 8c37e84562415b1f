import sys

from weightkit.cli import main

sys.exit(main())
