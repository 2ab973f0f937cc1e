"""Evaluation protocols, side by side: clustering accuracy and face-clustering scores (``clustering``), face
verification on pair sets and IJB-style templates (``pair_sets``, ``ijb``) and the ROC helpers they share."""
