"""tools/train.py with one rank raising at an optimizer step: a test-only fault injection.

    accelerate launch ... tests/e2e/_failing_train.py RECIPE.yaml key=value ...

``DIST_SSL_TEST_FAIL_RANK`` / ``DIST_SSL_TEST_FAIL_STEP`` pick the rank and the step (0-based
index of the optimizer step being computed); the failing rank writes the time of the failure to
``DIST_SSL_TEST_FAIL_MARK``. Read by this script only: no production code path knows them.
"""
import os
import sys
import time
from pathlib import Path

from dist_ssl.engine import trainer
from dist_ssl.engine.cli_train import main

FAIL_RANK = int(os.environ["DIST_SSL_TEST_FAIL_RANK"])
FAIL_STEP = int(os.environ["DIST_SSL_TEST_FAIL_STEP"])
MESSAGE = "injected failure"

_micro_step = trainer.Trainer._micro_step


def failing_micro_step(self, batch):
    if self.parts.accelerator.process_index == FAIL_RANK and self.step == FAIL_STEP:
        Path(os.environ["DIST_SSL_TEST_FAIL_MARK"]).write_text(f"{time.time()}")
        raise RuntimeError(f"{MESSAGE} on rank {FAIL_RANK} at step {FAIL_STEP}")
    return _micro_step(self, batch)


trainer.Trainer._micro_step = failing_micro_step

if __name__ == "__main__":
    sys.exit(main())
