"""The functional core: inner loops on parameter dictionaries run by the execution engine
(``engine``: stacked, vmapped, chunked or compiled; functional update rules in ``update_rules``), implicit
differentiation (conjugate gradient on Hessian-vector products), the one manual outer step every
learner makes (``outer``), and checkpoint stamps (``checkpoint``). Every learner runs on it."""
from tasklight.core.functional import (AdaptResult, FunctionalLearner, check_finite_inner, match_names,
                                       merge_task_buffers, split_state)
from tasklight.core.seeding import seeded_generator
from tasklight.core.engine import STRATEGIES, Engine, check_engine_settings, stack_plan, surrogate_objective
from tasklight.core.update_rules import (SGD, Adagrad, Adam, AdamW, MomentumSGD, RMSprop, UPDATE_RULES,
                                         make_update_rule)
from tasklight.core.implicit import (conjugate_gradient, gauss_newton_vp, hvp, implicit_gradient,
                                     proximal_meta_gradient, tree_axpy, tree_dot)
from tasklight.core.outer import (check_finite_metrics, configure_outer_optimizers, default_optimizer, outer_step,
                                  setup_outer_step)
from tasklight.core.checkpoint import check_checkpoint_file, stamp_checkpoint, verify_checkpoint

__all__ = ["STRATEGIES", "Engine", "check_engine_settings", "stack_plan", "surrogate_objective", "SGD", "Adam",
           "make_update_rule", "MomentumSGD", "AdamW", "RMSprop", "Adagrad", "UPDATE_RULES", "AdaptResult", "FunctionalLearner", "check_finite_inner", "match_names", "merge_task_buffers", "split_state",
           "seeded_generator", "conjugate_gradient", "hvp", "implicit_gradient", "proximal_meta_gradient", "tree_axpy", "tree_dot",
           "gauss_newton_vp", "check_finite_metrics", "configure_outer_optimizers", "default_optimizer", "outer_step",
           "setup_outer_step", "check_checkpoint_file", "stamp_checkpoint", "verify_checkpoint"]
