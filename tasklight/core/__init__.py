"""The functional core: inner loops on parameter dictionaries vmapped over tasks, and implicit
differentiation (conjugate gradient on Hessian-vector products). Every learner runs on it."""
from tasklight.core.functional import (AdaptResult, FunctionalLearner, check_finite_inner, match_names,
                                       merge_task_buffers, split_state)
from tasklight.core.seeding import seeded_generator
from tasklight.core.implicit import (conjugate_gradient, hvp, implicit_gradient, proximal_meta_gradient,
                                     tree_axpy, tree_dot)

__all__ = ["AdaptResult", "FunctionalLearner", "check_finite_inner", "match_names", "merge_task_buffers",
           "split_state", "seeded_generator", "conjugate_gradient", "hvp", "implicit_gradient",
           "proximal_meta_gradient", "tree_axpy", "tree_dot"]
