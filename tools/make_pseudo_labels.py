"""`python tools/make_pseudo_labels.py` runs `jaxseg.cli.pseudo_labels`
(see its --help), as its console script does."""
import sys

from jaxseg.cli.pseudo_labels import main

if __name__ == "__main__":
    sys.exit(main())
