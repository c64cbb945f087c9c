"""`saliency-server evaluate`: how far each registered saliency method can be trusted, measured on the served models:
faithfulness against baseline maps (deletion and insertion), the model-randomisation sanity check (Adebayo et al.
2018) and, on the shipped ground-truth benchmark (benchmarks/groundtruth), localisation against exact object masks.
"""
