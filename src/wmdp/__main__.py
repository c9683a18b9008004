import sys

from wmdp.cli import main

sys.exit(main())
