"""Tests of the model code: the vision encoder, the fusion BERT text encoder and the ALBEF model."""
