"""Roles, layouts and process groups. `init_groups(cfg, world)` builds every group of an RLVR job in one place
(`groups`); `layout` holds the rank roles and vLLM's groups, `state` megatron-core's groups, `model` DDP and the
optimizer over them."""
