"""Sample quality: feature networks, reference statistics, FID/sFID/IS/precision/recall.

Receives apply functions and parameters; never imports the trainer.
"""
