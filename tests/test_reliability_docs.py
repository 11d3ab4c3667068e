"""docs/reliability.md's measured tables are generated from the committed JSON (benchmarks.render_reliability)."""

from __future__ import annotations

from bench_helpers import renderer_tests

test_reliability_docs_match_the_committed_json, test_render_detects_a_hand_edited_table = renderer_tests(
    "render_reliability", "reliability.md", "finetune", "| median (default) |", "| median (edited) |"
)
