"""The exception hierarchy of message-sender."""


class MessageSenderError(Exception):
    """Raised for any failure that message-sender itself names (base class)."""


class SettingsError(MessageSenderError):
    """Raised when a setting is missing or malformed; the message is one line naming the variable."""


class ValidationError(MessageSenderError):
    """Raised when a message's recipient or content breaks the rules of the spec."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFoundError(MessageSenderError):
    """Raised when a message id does not exist."""


class ConflictError(MessageSenderError):
    """Raised when a message is not in the status an operation requires."""


class MigrationError(MessageSenderError):
    """Raised when the schema cannot be brought to the current version."""


class LeaseLost(MessageSenderError):
    """Raised when a producer's leader lease lapsed or was taken over: it must not claim any more."""


class IdempotencyConflict(MessageSenderError):
    """Raised when an Idempotency-Key is reused within 24 h with a different request."""
