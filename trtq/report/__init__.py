"""Reports: fidelity metrics (accuracy, agreement) shared by the CLI and the demo."""
