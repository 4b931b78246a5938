"""After-run tools over a results dataset: query (select, stats), report, evaluate."""
