"""`python tests/embed_child.py STAGE N ARGS...`: `mixres embed ARGS` in this process, killed by
SIGKILL right after its Nth shard reaches STAGE ("written": its files are durable, its journal
line is not; "journaled"). The kill point is a hook installed from here into
`mixres.embed.shards.AFTER_SHARD`, not something production code reads from the
environment. Under --engine ray the hook travels to the encoder actor (this module is
`__main__`, so it is pickled by value): the actor kills this driver, then waits to die
with it, so exactly N shards are on disk.
"""

import os
import signal
import sys
import time

from mixres.cli import main
from mixres.embed import shards


def install(stage: str, n: int) -> None:
    driver = os.getpid()

    def kill(at: str, done: int) -> None:
        if at == stage and done == n:
            os.kill(driver, signal.SIGKILL)
            while True:  # an actor of the killed driver: stop here until Ray reaps it
                time.sleep(1)

    shards.AFTER_SHARD.append(kill)


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(["embed", *sys.argv[3:]]))
