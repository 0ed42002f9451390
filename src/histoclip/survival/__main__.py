"""``python -m histoclip.survival from-censorship IN OUT``."""

import logging

from histoclip.survival.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    raise SystemExit(main())
