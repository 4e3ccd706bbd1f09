import sys

from emotion.tools.cli import main

sys.exit(main())
