"""The serving runtime: budget, planner, swap controllers, host store, executor, residency, engine,
loader, statistics, sampling and the jitted programs; host code in plain Python and numpy, device code
as pure jitted functions whose weights, slots, index maps and caches are arguments."""
