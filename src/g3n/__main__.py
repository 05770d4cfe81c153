import sys

from g3n.cli import main

sys.exit(main())
