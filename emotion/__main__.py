import sys

from emotion.cli import main

sys.exit(main())
