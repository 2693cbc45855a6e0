"""The demo model: synthetic scenes and their question language, training from scratch, and eval.

`python -m hybrid.demo train|eval`; the shipped checkpoint lives in `assets/demo-model/`.
"""
