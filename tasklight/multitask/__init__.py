"""Multi-task learning: the multi-task module (sharing, conditioning), loss weighting, the toy problem."""
from tasklight.multitask.module import ConditionedLayer, MultiTaskModule
from tasklight.multitask.toy import (ToyObjective, ToyPoint, TwoObjectiveToyDataModule, pareto_gap, toy_descent,
                                     toy_objectives, toy_pareto_front)
from tasklight.multitask.weighting import (DWA, MGDA, WEIGHTINGS, DROWeighting, EqualWeighting, GradNorm, PCGrad,
                                           StaticWeighting, TaskStats, UncertaintyWeighting, Weighting)

__all__ = ["MultiTaskModule", "ConditionedLayer", "Weighting", "TaskStats", "StaticWeighting", "EqualWeighting",
           "UncertaintyWeighting", "DWA", "DROWeighting", "GradNorm", "MGDA", "PCGrad", "WEIGHTINGS",
           "TwoObjectiveToyDataModule", "ToyPoint", "ToyObjective", "toy_objectives", "toy_pareto_front",
           "pareto_gap", "toy_descent"]
