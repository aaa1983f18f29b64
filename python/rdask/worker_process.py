"""Entry point of one worker process (`python -m rdask.worker_process`),
kept apart from `rdask.worker` so that running it does not import that
module twice."""

import sys

from rdask.worker import main

if __name__ == "__main__":
    sys.exit(main())
