"""`python -m hybrid.export.genai_builder ARGS`: onnxruntime-genai's model builder, with the checkpoint
loaded in its own dtype.

The builder loads the whole Hugging Face model with `from_pretrained` and no dtype, which in
transformers means float32: a bfloat16 checkpoint doubles in memory (the 2B peaked at 14.5 GiB). Here
every `from_pretrained` the builder makes defaults to `dtype="auto"` (the checkpoint's own dtype) before
the builder runs unchanged. Its weights are then exactly the checkpoint's values; it widens each to the
output precision as it writes it. A float32 checkpoint builds exactly as before.
"""

from __future__ import annotations

import runpy
import sys

BUILDER = "onnxruntime_genai.models.builder"


def load_in_checkpoint_dtype() -> None:
    """Make `PreTrainedModel.from_pretrained` default to `dtype="auto"` in this process."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = "auto"
        return original(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def main() -> None:
    load_in_checkpoint_dtype()
    sys.argv[0] = BUILDER
    runpy.run_module(BUILDER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
