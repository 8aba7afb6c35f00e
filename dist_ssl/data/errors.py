"""Exceptions of the data path. Each message is one line meant for a user.

The CLI prints ``make_shards: error: <message>`` for any :class:`DataError` and exits
non-zero without a traceback, so messages name the file/argument and the problem.
"""


class DataError(Exception):
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
