"""Benchmarks (``make bench``): each area has a module here with

    def run(quick: bool) -> dict          # measures, returns JSON-able results
    def render(result: dict) -> str       # a markdown section for docs/BENCHMARKS.md

``python -m mtfm_rec.bench [--only NAME ...] [--quick]`` runs them, writes
``docs/bench/<name>.json`` and regenerates ``docs/BENCHMARKS.md`` from every JSON there.
"""

# Order of sections in docs/BENCHMARKS.md; a module that does not exist yet is skipped.
SUITES = ("aggregation", "model", "kernels", "training")
