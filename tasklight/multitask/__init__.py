"""Multi-task learning: the multi-task module, the architectures, loss weighting, the toy problem."""
from tasklight.multitask.architectures import (ARCHITECTURES, MMoE, MTAN, Architecture, BilinearHead, Concat,
                                               ConditionedLayer, CrossStitch, FiLM, HardSharing, HeadFactory,
                                               MultiHead, Multiplicative, SoftSharing, trunk_stages)
from tasklight.multitask.arch_experts import CGC, LTB, PLE, DSelectK
from tasklight.multitask.module import MultiTaskModule
from tasklight.multitask.toy import (ToyObjective, ToyPoint, TwoObjectiveToyDataModule, pareto_gap, toy_descent,
                                     toy_objectives, toy_pareto_front)
from tasklight.multitask.weighting import (DWA, FAMO, IMTL, MGDA, RLW, WEIGHTINGS, CAGrad, DROWeighting, EqualWeighting,
                                           GradNorm, NashMTL, PCGrad, StaticWeighting, TaskStats, UncertaintyWeighting,
                                           UPGrad, Weighting)

__all__ = ["MultiTaskModule", "Architecture", "HeadFactory", "HardSharing", "SoftSharing", "Concat",
           "Multiplicative", "FiLM", "MultiHead", "CrossStitch", "MMoE", "MTAN", "ConditionedLayer", "BilinearHead",
           "trunk_stages", "ARCHITECTURES", "Weighting", "TaskStats", "StaticWeighting", "EqualWeighting",
           "UncertaintyWeighting", "DWA", "DROWeighting", "GradNorm", "MGDA", "PCGrad", "RLW", "FAMO", "CAGrad",
           "NashMTL", "IMTL", "UPGrad", "WEIGHTINGS", "CGC", "PLE", "DSelectK", "LTB",
           "TwoObjectiveToyDataModule", "ToyPoint", "ToyObjective", "toy_objectives", "toy_pareto_front",
           "pareto_gap", "toy_descent"]

# the weighting methods of tasklight.multitask.weightings (one file each) and the registry of all of them
from tasklight.multitask.registry import register_weighting, weighting_class, weightings  # noqa: E402
from tasklight.multitask.weightings import *  # noqa: E402,F401,F403
from tasklight.multitask.weightings import __all__ as _weightings_all  # noqa: E402

__all__ += [*_weightings_all, "register_weighting", "weighting_class", "weightings"]
