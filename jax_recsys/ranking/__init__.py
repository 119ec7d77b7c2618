"""CTR/CVR rankers on multi-faceted ID tables.

model (DCN-v2 + MLP dense part, ESMM loss, serving score function, saved rankers),
facets (scratch / pretrained facet tables mapped by raw id, freeze or fine-tune),
train (data preparation, training, evaluation), ablation (the variants-over-seeds
experiment and its report).
"""
