"""Released checkpoints of the reference methods, read into this project's names (and written back).

One module per method holds its key map in both directions and the checks its files need: ``xvlm`` (X-VLM's
Swin and CLIP-ViT files), ``vicha`` (ViCHA's, with its concept encoder) and ``pevl`` (PEVL's ``pevl_pretrain.pth``,
``grounding.pth``, ``vrd.pth``, ``pevl_vcr_ssp.pth``, ...). ALBEF's own layout is this project's
(``pretrain.models.albef.from_albef_state_dict``).
"""
