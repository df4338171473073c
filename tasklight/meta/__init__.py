"""Meta-learners: MAML (second/first order, Meta-SGD, ``higher`` backend) and iMAML."""
from tasklight.meta.base import MetaLearner, MetaOutput, resolve_loss
from tasklight.meta.imaml import IMAMLModule
from tasklight.meta.maml import MAMLModule

__all__ = ["MetaLearner", "MetaOutput", "resolve_loss", "MAMLModule", "IMAMLModule"]
