"""Project exceptions. A `HybridError` is something a user caused or can fix; its message says how."""


class HybridError(Exception):
    """Base class: the CLI prints it as one line, the UI shows it as an error toast."""


class UserError(HybridError):
    """Bad input: a prompt, an image or a sampling value that cannot be served."""


class BundleError(HybridError):
    """A bundle or checkpoint that is missing, corrupted or made by an incompatible version."""


class RouteError(HybridError):
    """A route cannot serve this request (for example GenAI asked about an image)."""


class Busy(UserError):
    """Too many requests (from one client, or waiting for the CPU): try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
