"""`python -m flashrecovery.sidecar` (also `flashrecovery sidecar`): one sidecar, configured from the
environment (FLASHRECOVERY_*)."""

from flashrecovery.shared.entry import run_service

from .app import main

if __name__ == "__main__":
    raise SystemExit(run_service(main))
