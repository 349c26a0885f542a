"""Every error the plugin reports to a user, in one leaf module (it imports nothing of ours).

The CLI prints each as one line, `feddpd: error: <message>`: ConfigError and its subclasses exit with
status 2 (a bad input: YAML key or value, missing file, checkpoint from another config), PartyError with
status 1 (a distributed run stopped, or an upload that cannot be aggregated stopped an sp or MPI run).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the key and what is expected."""


class CheckpointError(ConfigError):
    """An unreadable checkpoint or one from another config."""


class PartyError(RuntimeError):
    """A distributed run stopped; the message is one line naming the party (rank) and the reason."""


class PartyTimeout(PartyError):
    """A peer stayed silent past `comm_args.comm_timeout_s`."""


class UploadError(PartyError):
    """A client's upload cannot be aggregated (uploads.py) where every party is trusted (sp, MPI): the run stops."""


class PrivacyBoundaryError(RuntimeError):
    """Something other than model parameters and a sample count tried to reach the server step."""


__all__ = ["CheckpointError", "ConfigError", "PartyError", "PartyTimeout", "PrivacyBoundaryError", "UploadError"]
