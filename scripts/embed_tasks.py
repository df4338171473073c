"""``python scripts/embed_tasks.py ...`` is ``tasklight embed ...`` (tasklight/task2vec/embed_cli.py)."""
import sys

from tasklight.task2vec.embed_cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
