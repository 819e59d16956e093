"""The reference job with the recovery agent but without a sidecar or any service, launched by
`torchrun` (for the failure-free overhead benchmark):

    torchrun --standalone --nproc-per-node 8 -m flashrecovery.bench.agent_only --steps 40 --tp 2 \
        --progress /tmp/ao/progress.log

torchrun's identity (RANK, WORLD_SIZE) and store (MASTER_ADDR:MASTER_PORT, joined as a client)
become the agent's; with no FLASHRECOVERY_AGENT_SOCKET the agent has no control channel. What is
left next to the bare loop is exactly the agent's per-step work in the trainer: the commit vote,
the interruptible waits and its per-generation groups."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ["FLASHRECOVERY_AGENT_RANK"] = os.environ["RANK"]
    os.environ["FLASHRECOVERY_AGENT_LOCAL_RANK"] = os.environ["LOCAL_RANK"]
    os.environ["FLASHRECOVERY_AGENT_WORLD_SIZE"] = os.environ["WORLD_SIZE"]
    os.environ["FLASHRECOVERY_AGENT_RDZV"] = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    os.environ.pop("FLASHRECOVERY_AGENT_SOCKET", None)
    from flashrecovery.agent.reference.train import main as train

    train(sys.argv[1:])


if __name__ == "__main__":
    main()
