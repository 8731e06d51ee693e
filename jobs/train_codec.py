"""Job entrypoint: ``python -m jobs.train_codec [options]``, the codec trainer (``pipeline/train.py``; the same
as ``audioarc train``)."""
import sys

from pipeline.train import main

if __name__ == "__main__":
    sys.exit(main())
