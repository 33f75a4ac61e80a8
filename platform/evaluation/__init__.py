"""Evaluation of trained models: what does the context buy?

`python -m platform.evaluate` scores one or more models (run directories, checkpoints, sharded checkpoints,
Hugging Face exports, each optionally with SelfExtend) on the same tokens: perplexity by context length
(perplexity.py), mean loss by token position (perplexity.py), and retrieval grids over length x depth for
the passkey and MQAR tasks (retrieval.py). report.py writes the tables, CSV/JSON and plots; validate.py runs a
training config's own validation metrics on a checkpoint. Work is split over ranks by ranks.py.
"""
