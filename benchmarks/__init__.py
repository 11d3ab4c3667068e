"""The project's benchmarks, as one package run from the repository root: ``python -m benchmarks.<name> ...``.

Shared by all of them: ``harness`` (command line pieces, presets, data helpers, timing, result JSON) and ``render``
(number formats, markdown tables, generated docs blocks, plots). The benchmarks themselves:

- ``originals``: the trained originals and retrained references the forgetting benchmark starts from;
- ``forgetting_benchmark`` (with ``forgetting_methods``, ``forgetting_eval``, ``forgetting_tables``,
  ``forgetting_goals``): every method on one original against the retrained references;
- ``unlearning_benchmark`` (with ``unlearning_eval``, ``unlearning_tables``): issue 4's pretrain-then-unlearn run;
- ``robustness_privacy`` (with ``robustness_attacks``, ``robustness_tables``): bad sites and privacy noise;
- ``fedsim_faithfulness``, ``nvflare_overhead``, ``core_costs``: the in-process federation and the engine's costs;
- ``render_docs`` / ``render_reliability``: rebuild docs/benchmarks.md and docs/reliability.md from the committed
  JSON under ``benchmarks/results/`` (``--check`` fails when a page is out of date).
"""
