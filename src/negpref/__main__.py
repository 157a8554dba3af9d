import sys

from negpref.cli import main

sys.exit(main())
