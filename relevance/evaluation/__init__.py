"""Per-market AUC with bootstrap intervals, paired comparisons between methods, and the AUC report."""
