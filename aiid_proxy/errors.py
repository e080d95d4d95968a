"""One error hierarchy for the whole library.

Every error's ``str()`` is a single line fit for a CLI, a log or an audit record: it never
contains a secret, a token or key material.
"""

from __future__ import annotations

from typing import Any


class AiidError(Exception):
    """Base of every error the library raises on purpose."""

    def one_line(self) -> str:
        return " ".join(str(self).split())


class UsageError(AiidError):
    """A bad argument from a user (exit status 2 at the CLI)."""


class InvalidName(UsageError):
    """A tenant, agent or provider name outside ``^[a-z0-9][a-z0-9_-]{0,62}$``."""


class ConfigError(AiidError):
    """The home, a key file or a setting is missing or malformed."""


class PolicyError(AiidError):
    """A policy file does not validate. Carries ``file:line`` when known."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.others: tuple[PolicyError, ...] = ()  # further errors found in the same file
        self.rules: tuple[Any, ...] = ()  # the file's rules that did validate (policy check)
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        super().__init__(f"{where}{message}")

    @property
    def all(self) -> tuple[PolicyError, ...]:
        """This error and every other one found in the same file, in the order checked."""
        return (self, *self.others)


class VaultError(AiidError):
    """Opaque vault failure: wrong master key, tampered ciphertext, bad record.

    Deliberately carries no detail that could help an attacker (no key bytes, no plaintext).
    """

    def __init__(self, message: str = "vault entry cannot be decrypted") -> None:
        super().__init__(message)


class SecretNotFound(AiidError):
    """The tenant's vault holds no secret for that provider."""


class TokenError(AiidError):
    """An agent token was missing, malformed, expired, revoked or otherwise refused.

    ``identity``: for a token whose signature verified but that is no longer valid (expired,
    revoked), who it names (an ``identity.AgentIdentity``): the refusal can be audited in that
    tenant's log. None for anything not signed by the admin key."""

    def __init__(self, message: str, identity: object | None = None) -> None:
        super().__init__(message)
        self.identity = identity


class AuditError(AiidError):
    """The audit log could not be written or read."""


class AuditFieldError(AuditError, ValueError):
    """A field value the audit log refuses to record (not text, out of range, not JSON): a
    ValueError too, as the bad value is the caller's."""


class RequestRefused(AiidError):
    """A request that the gateway answers with a refusal in the contract's JSON shape."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        rule: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.type = type_
        self.message = message
        self.rule = rule
        self.headers = headers or {}
        super().__init__(f"{status} {type_}: {message}")


class IncompleteVerdict(AiidError):
    """A pipeline stage ran out of order or without its prerequisites: the flow must not leave."""
