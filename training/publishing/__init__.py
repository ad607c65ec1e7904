"""Publishing: Hub repository folders with model cards (``hub``), the web demo as a Space folder (``space``) and
conversion of the reference implementation's checkpoints (``reference_conversion``)."""
