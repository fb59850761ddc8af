"""Planning: pure functions from (model graph, device and link profiles) to a Plan.

Modules, each with one job:

* ``graph``: ``capture(model, input_shape)``, a deterministic torch.fx graph whose nodes carry
  their output shape and kind (window / pointwise / linear / global);
* ``halo``: exact row arithmetic, which input rows an output strip needs, through fused blocks;
* ``execute``: ``run_stage`` (what each device runs) and ``simulate`` (a whole plan in-process);
* ``cost``: FLOPs, compute seconds (a * FLOPs + b) and a link-level transfer schedule;
* ``partition``: equal, bodp (MoDNN), ocbp (EdgeLD) and the exact min-max optimal split;
* ``fusion``: candidate cut points and the none / pools / auto block choice;
* ``planner``: ``make_plan(gm, cluster, ...)``;
* ``plan``: the Plan schema the runtime executes.

Nothing here starts processes or reads clocks; the runtime only executes what this decides.
"""
