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
