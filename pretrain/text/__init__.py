"""Text handling for pretraining and fine-tuning: caption cleaning, tokenisation, extra tokens.

- ``cleaning``: ALBEF's caption cleaning with a character offset map (``clean_caption``) and without
  (``pre_caption``, also importable from this package).
- ``markers``: cutting a text at markers (extra tokens), so that cleaning leaves them intact.
"""

from pretrain.text.cleaning import pre_caption

__all__ = ["pre_caption"]
