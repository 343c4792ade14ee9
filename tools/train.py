"""`python tools/train.py` runs `jaxseg.cli.train`
(see its --help), as its console script does."""
import sys

from jaxseg.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
