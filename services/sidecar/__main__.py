import sys

from flashrecovery.cli import main

sys.exit(main(["sidecar"]))
