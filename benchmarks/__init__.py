"""`saliency-server bench`: serving efficiency, batching gain, explanation cost and speed against reference
libraries, reported as markdown and JSON.

Kept free of heavy imports: the load generator (`python -m benchmarks.loadgen`) runs as its own light process.
"""
