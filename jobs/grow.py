"""Entry point for `ray job submit`: run a growth job file.

    ray job submit --working-dir . -- python jobs/grow.py jobs/cats_dogs.yaml \
        --set storage=/shared/runs/cats_dogs

It takes the same arguments as `runner grow`.
"""

import sys

from runner.cli import main

if __name__ == "__main__":
    sys.exit(main(["grow", *sys.argv[1:]]))
