"""`python tools/make_dataset.py` runs `jaxseg.cli.make_dataset`
(see its --help), as its console script does."""
import sys

from jaxseg.cli.make_dataset import main

if __name__ == "__main__":
    sys.exit(main())
