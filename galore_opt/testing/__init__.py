"""Shared test helpers: the tolerance table and reference comparisons."""

from .tolerances import TOLERANCES, tolerance

__all__ = ["TOLERANCES", "tolerance"]
