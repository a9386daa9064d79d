"""The reward layer's one exception type: a training, evaluation or scoring request that cannot be done."""


class RewardError(Exception):
    """A reward-model operation cannot be done; the message says why and what would be right."""
