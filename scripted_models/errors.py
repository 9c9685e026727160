"""Errors the user can fix. The CLI prints them as one line and exits with code 2."""


class InputError(ValueError):
    """Bad input: a file, a mask, a modality or a parameter the engine cannot use."""


class WeightsError(RuntimeError):
    """Model weights are missing, corrupted or do not match their model card."""
