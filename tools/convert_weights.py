"""`python tools/convert_weights.py` runs `jaxseg.cli.convert_weights`
(see its --help), as its console script does."""
import sys

from jaxseg.cli.convert_weights import main

if __name__ == "__main__":
    sys.exit(main())
