"""Tests for pretrain/objectives/, one file per module."""
