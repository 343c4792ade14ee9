"""`python tools/export.py` runs `jaxseg.cli.export`
(see its --help), as its console script does."""
import sys

from jaxseg.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
