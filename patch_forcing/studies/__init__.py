"""The paper's ablations at small scale (`python -m patch_forcing.study`): one module per study,
the runner that trains and scores their runs, reports and plots. Nothing below imports this package."""
