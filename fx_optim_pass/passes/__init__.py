"""Pure graph rewrites: each is a function of (graph, plan)."""

from fx_optim_pass.passes.all_reduce_grads import all_reduce_gradients
from fx_optim_pass.passes.hoist_step_scalars import hoist_step_scalars
from fx_optim_pass.passes.insert_updates import insert_optimizer_updates

__all__ = ["all_reduce_gradients", "hoist_step_scalars", "insert_optimizer_updates"]
