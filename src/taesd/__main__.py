import sys

from taesd.cli import main

sys.exit(main())
