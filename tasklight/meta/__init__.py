"""Meta-learners: MAML (second/first order, Meta-SGD, ANIL/BOIL through ``adapt``, ``higher`` backend),
iMAML, MAML++, Reptile, Prototypical Networks, ProtoMAML and closed-form heads (R2D2, logistic regression)."""
from tasklight.meta.base import MetaLearner, MetaOutput, resolve_loss
from tasklight.meta.closed_form import ClosedFormHeadModule, LogisticHeadModule, R2D2Module
from tasklight.meta.imaml import IMAMLModule
from tasklight.meta.maml import MAMLModule
from tasklight.meta.mamlpp import MAMLPlusPlusModule, msl_weights
from tasklight.meta.proto import ProtoMAMLModule, ProtoNetModule, prototypes
from tasklight.meta.reptile import ReptileModule

__all__ = ["MetaLearner", "MetaOutput", "resolve_loss", "MAMLModule", "IMAMLModule", "MAMLPlusPlusModule",
           "msl_weights", "ReptileModule", "ProtoNetModule", "ProtoMAMLModule", "prototypes",
           "ClosedFormHeadModule", "R2D2Module", "LogisticHeadModule"]
