"""`python tools/eval.py` runs `jaxseg.cli.eval`
(see its --help), as its console script does."""
import sys

from jaxseg.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
