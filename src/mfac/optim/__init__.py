"""Optimizers built on the Fisher-inverse objects: :class:`MFAC`."""

from .mfac import MFAC

__all__ = ["MFAC"]
