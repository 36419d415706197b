"""Zeroth-order fine-tuning: MeZO (in-place ZO-SGD with the random-seed trick)."""

from ftlab.zo.mezo import MeZO, ZOStep
from ftlab.zo.settings import ZOSettings

__all__ = ["MeZO", "ZOStep", "ZOSettings"]
