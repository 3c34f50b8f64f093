"""Small built-in tasks that need no simulator (learning-sanity checks and the CPU demo)."""

from .colour_bandit import ColourBandit

__all__ = ["ColourBandit"]
