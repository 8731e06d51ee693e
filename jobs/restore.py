"""Ray job entrypoint: ``python -m jobs.restore DEST OUT [PATTERN ...] [options]`` (as ``audioarc restore``)."""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["restore", *sys.argv[1:]]))
