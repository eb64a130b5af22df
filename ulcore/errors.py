"""Errors a retry cannot fix. Training retries a run after a worker or node is lost (`ray.max_failures`, from the
latest checkpoint); an error of these kinds ends the run at once with its own message instead, since the next
attempt would meet it again: divergence, bad params, a corrupt checkpoint, unreadable data."""

from __future__ import annotations


class NonRetryableError(Exception):
    """Base of the errors that end a run at once (the message says what to change)."""


class CorruptCheckpointError(NonRetryableError):
    """A checkpoint whose files do not load or do not match their recorded size and sha256; names the path."""


class CorruptDataError(NonRetryableError):
    """More unreadable shards or samples than `data.max_bad_shards` / `data.max_bad_samples`; names the files."""


class LineageError(NonRetryableError, ValueError):
    """Nets that do not come from one stage-1 run (an encoder, decoder, prior and the base model trained on that
    encoder's latents): never trained on, evaluated together or promoted together; names what came from where."""


# FloatingPointError: the loop's divergence stop (consecutive non-finite losses) and numpy's errstate raises.
NON_RETRYABLE = (NonRetryableError, FloatingPointError)


def first_non_retryable(errors: list[BaseException]) -> BaseException | None:
    """The first error of a failed attempt that a retry cannot fix, or None when a retry may help."""
    return next((e for e in errors if isinstance(e, NON_RETRYABLE)), None)


__all__ = ["NonRetryableError", "CorruptCheckpointError", "CorruptDataError", "LineageError", "NON_RETRYABLE",
           "first_non_retryable"]
