"""`python -m flashrecovery.planner`: the planner service with settings from the environment."""

from __future__ import annotations

import asyncio

from flashrecovery.shared.logging import configure
from flashrecovery.shared.settings import load_settings

from .app import main

if __name__ == "__main__":
    settings = load_settings()
    configure(settings.log_format)
    asyncio.run(main(settings))
