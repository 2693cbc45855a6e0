"""`python -m hybrid.export.genai_builder ARGS`: onnxruntime-genai's model builder, with the checkpoint
loaded in its own dtype and its pages given back as the builder goes.

The builder loads the whole Hugging Face model with `from_pretrained` and no dtype, which in
transformers means float32: a bfloat16 checkpoint doubles in memory (the 2B peaked at 14.5 GiB). Here
every `from_pretrained` the builder makes defaults to `dtype="auto"` (the checkpoint's own dtype). Its
weights then stay memory-mapped from the safetensors files, and each one the builder writes stays
resident until the end (the 4B peaked at 11.3 GiB); a background thread pages the checkpoint's
mappings out every second (`MADV_PAGEOUT`: clean file pages, read again from disk if touched), so
resident memory holds little more than the tensor being written. The builder itself runs unchanged:
its weights are exactly the checkpoint's values, widened to the output precision as it writes each
one, and a float32 checkpoint builds the same model as before.
"""

from __future__ import annotations

import ctypes
import runpy
import sys
import threading
import time
from pathlib import Path

BUILDER = "onnxruntime_genai.models.builder"
MADV_PAGEOUT = 21  # Linux 5.4+


def load_in_checkpoint_dtype() -> None:
    """Make `PreTrainedModel.from_pretrained` default to `dtype="auto"` in this process."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = "auto"
        return original(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def page_out_checkpoint(folder: str, every_s: float = 1.0) -> None:
    """Start a daemon thread that pages out this process's mappings of `folder`'s safetensors files."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def loop() -> None:
        while True:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split()
                    if len(fields) >= 6 and fields[5].startswith(folder) and fields[5].endswith(".safetensors"):
                        start, end = (int(x, 16) for x in fields[0].split("-"))
                        libc.madvise(start, end - start, MADV_PAGEOUT)
            time.sleep(every_s)

    threading.Thread(target=loop, name="page-out-checkpoint", daemon=True).start()


def main() -> None:
    load_in_checkpoint_dtype()
    if sys.platform == "linux":
        page_out_checkpoint(str(Path(sys.argv[sys.argv.index("-i") + 1]).resolve()))
    sys.argv[0] = BUILDER
    runpy.run_module(BUILDER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
