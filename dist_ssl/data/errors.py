"""Exceptions of the data path. Each message is one line meant for a user.

The CLI prints ``make_shards: error: <message>`` for any :class:`DataError` and exits
non-zero without a traceback, so messages name the file/argument and the problem.
"""

from dist_ssl.errors import UserError


class DataError(UserError):
    """Base class: a problem with the input data, the arguments or an output directory."""


class SourceError(DataError):
    """SOURCE cannot be enumerated: missing path, unknown scheme, bad CSV, empty class..."""


class SubsetError(DataError):
    """A ``--subset`` rule is malformed or cannot be satisfied by the valid images."""


class BadImageError(DataError):
    """An input file is not a decodable image (only raised with ``--strict``)."""


class OutDirError(DataError):
    """OUT_DIR holds a dataset written with other arguments, or is busy / not ours."""


class ManifestError(DataError):
    """``manifest.json`` is missing or invalid; the message names the file and the problem."""


class ShardError(DataError):
    """A shard does not match its manifest (found by ``verify``); names the shard."""


class StreamError(DataError):
    """A loader stream cannot make its batches (no decodable sample at all).

    Raised inside DataLoader workers, which torch re-creates in the main process as
    ``StreamError("Caught StreamError in DataLoader worker process 0.\nOriginal Traceback ...")``:
    the constructor keeps only the original one-line message, so the CLI prints one line.
    """

    def __init__(self, message: str):
        lines = str(message).strip().splitlines()
        if len(lines) > 1:
            head, sep, rest = lines[-1].partition(": ")
            message = rest if sep and head.endswith(type(self).__name__) else lines[-1]
        super().__init__(message)
