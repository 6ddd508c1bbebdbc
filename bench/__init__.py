"""The benchmarks, one module each, run from the repository root as `python -m bench.NAME` (or `videomamba bench
NAME`); each prints a markdown table. Results: RESULTS.md; the fused scan's history: NOTES.md."""
