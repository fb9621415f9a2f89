"""Reports: fidelity metrics and comparisons, the check after writing, and the HTML report."""
