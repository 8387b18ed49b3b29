import sys

from hypatia.daemon.cli import main

sys.exit(main())
