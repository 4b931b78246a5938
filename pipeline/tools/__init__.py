"""After-run tools over a results dataset (read through `pipeline.results`): select, stats,
report, evaluate."""
