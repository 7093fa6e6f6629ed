"""Text handling for pretraining and fine-tuning: caption cleaning, tokenisation, extra tokens.

- ``cleaning``: ALBEF's caption cleaning with a character offset map (``clean_caption``) and without
  (``pre_caption``, also importable from this package).
- ``markers``: cutting a text at extra-token markers, for cleaning and tokenising.
- ``extra_tokens``: extra-token groups on BERT's ``[unusedN]`` slots or after the vocabulary, and their ids.
- ``tokenizer``: the batch tokenizer (``build_tokenizer``, ``TextTokenizer``).
- ``batch``: ``TokenizeBatch``, cleaning + tokenising run by the loader workers.
"""

from pretrain.text.cleaning import pre_caption

__all__ = ["pre_caption"]
