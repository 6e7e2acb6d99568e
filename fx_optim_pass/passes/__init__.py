"""Pure graph rewrites: each is a function of (graph, plan)."""

from fx_optim_pass.passes.insert_updates import insert_optimizer_updates

__all__ = ["insert_optimizer_updates"]
