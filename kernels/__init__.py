"""Compute kernels for moe_lowrank experts: the torch reference path and Triton kernels."""
