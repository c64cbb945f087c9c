"""`saliency-server bench`: serving efficiency, batching gain, explanation cost and speed against reference
libraries, reported as markdown and JSON.

Kept free of heavy imports: the load generator (`python -m service.bench.loadgen`) runs as its own light process.
"""
