"""Meta-learners: MAML (second/first order, Meta-SGD, ANIL/BOIL through ``adapt``, ``higher`` backend),
iMAML, MAML++, Reptile, Prototypical Networks and ProtoMAML."""
from tasklight.meta.base import MetaLearner, MetaOutput, resolve_loss
from tasklight.meta.imaml import IMAMLModule
from tasklight.meta.maml import MAMLModule
from tasklight.meta.mamlpp import MAMLPlusPlusModule, msl_weights
from tasklight.meta.proto import ProtoMAMLModule, ProtoNetModule, prototypes
from tasklight.meta.reptile import ReptileModule

__all__ = ["MetaLearner", "MetaOutput", "resolve_loss", "MAMLModule", "IMAMLModule", "MAMLPlusPlusModule",
           "msl_weights", "ReptileModule", "ProtoNetModule", "ProtoMAMLModule", "prototypes"]
