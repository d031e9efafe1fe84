"""Recommender models behind one contract (:class:`~shared.models.base.Recommender`)."""

from shared.models.base import ModelSpec, Recommender, UserContext
from shared.models.factory import build_model, count_parameters
from shared.models.ncf import NCF
from shared.models.sasrec import SASRec

__all__ = ["NCF", "ModelSpec", "Recommender", "SASRec", "UserContext", "build_model", "count_parameters"]
