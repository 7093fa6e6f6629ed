"""Evaluation metrics of the downstream tasks, each with the reference protocol's scoring.

``vqa`` (VQA accuracy with the official answer normalisation, EvalAI results file), ``captioning`` (BLEU-1..4 and
CIDEr-D as coco-caption computes them), ``grounding`` (box IoU, GIoU and its loss, Acc@IoU, Grad-CAM proposal
picking) and ``retrieval`` (R@K of both directions, ITM re-ranking of the ITC top k). Every function takes plain
Python values, arrays or tensors and needs no model, so each can be tested against a reference computation.
"""
