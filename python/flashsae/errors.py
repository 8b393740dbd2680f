"""Exceptions raised by flashsae."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for (by argument or FLASHSAE_BACKEND) that cannot run this call.

    flashsae never falls back silently from an explicit request: the message says why the backend
    cannot run (not built, no GPU, wrong device, no kernel for this op yet) and which backends can.
    """
