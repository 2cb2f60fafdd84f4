"""`python -m extauthz MANIFEST`: run only the ext_authz service."""

import sys
from pathlib import Path

from tollway.serve import run

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m extauthz MANIFEST")
    run(Path(sys.argv[1]), ["extauthz"])
