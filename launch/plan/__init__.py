"""`ldm plan`: the capacity planner (memory per GPU by ZeRO stage, micro-batch, step time) and the
measurements its tests check it against. launch/plan/planner.py says which file holds which part."""
