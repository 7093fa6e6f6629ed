"""Task modules: a model plus its objectives behind one ``forward(batch) -> dict of losses``."""
