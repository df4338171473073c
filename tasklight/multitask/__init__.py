"""Multi-task learning: the multi-task module (sharing, conditioning), loss weighting, the toy problem."""
from tasklight.multitask.module import ConditionedLayer, MultiTaskModule
from tasklight.multitask.toy import (ToyObjective, ToyPoint, TwoObjectiveToyDataModule, pareto_gap, toy_descent,
                                     toy_objectives, toy_pareto_front)
from tasklight.multitask.weighting import (DWA, FAMO, IMTL, MGDA, RLW, WEIGHTINGS, CAGrad, DROWeighting, EqualWeighting,
                                           GradNorm, NashMTL, PCGrad, StaticWeighting, TaskStats, UncertaintyWeighting,
                                           UPGrad, Weighting)

__all__ = ["MultiTaskModule", "ConditionedLayer", "Weighting", "TaskStats", "StaticWeighting", "EqualWeighting",
           "UncertaintyWeighting", "DWA", "DROWeighting", "GradNorm", "MGDA", "PCGrad", "RLW", "FAMO", "CAGrad",
           "NashMTL", "IMTL", "UPGrad", "WEIGHTINGS",
           "TwoObjectiveToyDataModule", "ToyPoint", "ToyObjective", "toy_objectives", "toy_pareto_front",
           "pareto_gap", "toy_descent"]
