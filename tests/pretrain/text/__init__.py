"""Tests of pretrain/text/: caption cleaning, markers, extra tokens, the batch tokenizer."""
