"""The systems a user would deploy instead, served the way their users write them, for `saliency-server bench`.

- `plain`: FastAPI with one `def` route per task (FastAPI runs it on its thread pool): one forward pass per request
  for /predict; Captum's IntegratedGradients per request, and the reference libraries called one after another
  (Captum Saliency and InputXGradient, pytorch-grad-cam GradCAM, a per-image GAE loop) for the explanations.
- `litserve_peer`: LitServe with its batching, tuned like the server: one inference worker per lane, the same batch
  cap per batch and the same batch wait, torch's threads split between the workers.

Both decode with Pillow and apply timm's eval transform built from the served model's data config, load the same
architecture with random weights, and take the same JSON request as the server (`{"image": base64, "top_k": k}`).
Run as their own processes (`python -m benchmarks.peers.plain ...`), started and stopped by `benchmarks.runner`.
"""
