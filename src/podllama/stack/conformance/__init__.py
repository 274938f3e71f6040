"""Is a new llama.cpp build as good as the running one at what this stack serves? Before an update or rebuild
rolls out, each server's model runs once on the current image and once on the candidate, as shadow servers
beside the real ones (never routed), and the same requests are replayed on both at temperature 0 with a fixed
seed: built-in cases per role (cases.py) and, where the user allows it, a sample of the stack's own requests
(samples.py). What changed — status, structure, embeddings, rerank order, speed, load time — is a verdict
(compare.py, verdict.py) that a strict gate turns into a refusal; shadow.py runs it all.
"""
