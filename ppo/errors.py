"""The policy layer's one exception type: a bad config or a run that cannot go on."""


class PPOError(Exception):
    """A policy-side operation cannot be done; the message says why and what would be right."""
