"""Errors raised by the converter. Every message names the file, tensor or flag at fault and what to do."""


class ConvertError(RuntimeError):
    """Base class: the CLI prints the message and exits with status 2."""


class UnsupportedModelError(ConvertError):
    """Not an MoE model, or an MoE architecture the converter has no adapter for."""


class RatioError(ConvertError):
    """--ratio outside (0, 1), or infeasible for the chosen method on this model."""


class CheckpointError(ConvertError):
    """Missing or corrupt shard, missing tensor, unreadable config."""


class CalibDataError(ConvertError):
    """Calibration text missing, empty, too short, or in an unknown format."""


class OutputError(ConvertError):
    """Output folder not empty without --overwrite, or an interrupted run to --resume / restart."""
