import sys

from mixres.cli import main

sys.exit(main())
