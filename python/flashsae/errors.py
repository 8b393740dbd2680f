"""Exceptions raised by flashsae."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for (by argument or FLASHSAE_BACKEND) that cannot run this call.

    flashsae never falls back silently from an explicit request: the message says why the backend
    cannot run (not built, no GPU, wrong device, no kernel for this op yet) and which backends can.
    """


class CheckpointCorruptError(ValueError):
    """A file's content does not match the sha256 its checkpoint recorded when it was written (a
    bit flip, a partial copy, bytes overwritten): its weights would load as garbage, so loading
    stops instead. The message names the file and both digests. Pass ``verify=False`` (CLI:
    ``--no-verify``) to load it anyway."""
