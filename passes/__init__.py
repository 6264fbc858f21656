"""FX passes over a QGraph, run in recipe order by `passes.manager`. Passes never launch kernels."""
