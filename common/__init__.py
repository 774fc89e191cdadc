"""Pieces both stages share: image data, the codes format, logging and CLI helpers."""
