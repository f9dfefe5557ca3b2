"""The one opt-in for reading files whose loading runs code: full unpickling.

Official checkpoints of older trainers and legacy OC20 LMDBs hold pickled Python objects;
unpickling them runs code chosen by whoever wrote the file. Every reader in this package refuses
such files unless the user opts in (``trust_pickle=True`` in Python, ``--trust-pickle`` on the
command line), and then warns with :class:`UntrustedPickleWarning`.
"""

from __future__ import annotations

__all__ = ["OPT_IN_HINT", "UntrustedPickleWarning"]

#: How to opt in, for error messages.
OPT_IN_HINT = "pass trust_pickle=True (Python) or --trust-pickle (command line)"


class UntrustedPickleWarning(UserWarning):
    """A file is being unpickled (code from it may run) because the user opted in."""
