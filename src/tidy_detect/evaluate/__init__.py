"""Evaluation: metrics, benchmark tables, robustness sweeps, ablations, plots and reports."""
