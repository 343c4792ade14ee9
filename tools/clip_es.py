"""`python tools/clip_es.py` runs `jaxseg.cli.clip_es`
(see its --help), as its console script does."""
import sys

from jaxseg.cli.clip_es import main

if __name__ == "__main__":
    sys.exit(main())
