"""The method, as pure functions: per-patch interpolation, timestep samplers, loss, samplers.

Imports nothing from training, evaluation or data. Time convention: t = 0 noise, t = 1 data.
"""
