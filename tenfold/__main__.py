import sys

from tenfold.cli import main

sys.exit(main())
