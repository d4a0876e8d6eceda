import sys

from initaudit.cli import main

sys.exit(main())
