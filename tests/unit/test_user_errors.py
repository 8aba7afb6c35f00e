"""UserError: every error class that is the user's to fix derives from it and keeps its old base
(so ``except ValueError`` elsewhere still catches it), and entry points report it in one line."""
from __future__ import annotations

import pytest

from dist_ssl.config.errors import ConfigError
from dist_ssl.data.decode import SampleError
from dist_ssl.data.errors import DataError, ManifestError, ShardError
from dist_ssl.engine.checkpoint_io import CheckpointError
from dist_ssl.engine.safe_load import UnsafeFileError
from dist_ssl.errors import EXIT_USER_ERROR, UserError, exit_with_message
from dist_ssl.eval.features import EvalError
from dist_ssl.experiments.pixel_floor import FloorError
from dist_ssl.experiments.spec import ExperimentError
from dist_ssl.slurm.submit import SubmitError


@pytest.mark.parametrize("cls, old_base", [
    (ConfigError, ValueError), (DataError, Exception), (ManifestError, DataError), (ShardError, DataError),
    (SampleError, ValueError), (CheckpointError, RuntimeError), (UnsafeFileError, ValueError),
    (EvalError, Exception), (FloorError, ValueError), (ExperimentError, ValueError), (SubmitError, Exception),
])
def test_user_errors_keep_their_old_base(cls, old_base):
    assert issubclass(cls, UserError) and issubclass(cls, old_base)


def test_config_error_still_names_its_key():
    exc = ConfigError("train.epochs", "must be >= 1")
    assert isinstance(exc, UserError) and str(exc) == "train.epochs: must be >= 1"


def test_exit_with_message_is_one_line_on_stderr(capsys):
    assert exit_with_message("tool", ManifestError("runs/x/manifest.json: missing")) == EXIT_USER_ERROR == 2
    assert exit_with_message("tool", ShardError("bad shard"), 1) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "tool: error: runs/x/manifest.json: missing\ntool: error: bad shard\n"
