"""`python tools/predict.py` runs `jaxseg.cli.predict`
(see its --help), as its console script does."""
import sys

from jaxseg.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
