"""Publishing: Hub repository folders with model cards (``hub``) and conversion of the reference implementation's
checkpoints (``reference_conversion``)."""
