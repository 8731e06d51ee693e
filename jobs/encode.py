"""Ray job entrypoint: ``python -m jobs.encode SRC DEST [options]`` (same options as ``audioarc encode``)."""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
