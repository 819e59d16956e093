"""python -m flashrecovery.detector: one detector instance, configured from the environment."""

import asyncio

from flashrecovery.shared.settings import load_settings

from .app import main

if __name__ == "__main__":
    asyncio.run(main(load_settings()))
