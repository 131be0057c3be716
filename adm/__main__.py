import sys

from adm.cli import main

sys.exit(main())
