"""Offline conversion of HuggingFace MoE checkpoints into the moe_lowrank format (``moe-convert``)."""
