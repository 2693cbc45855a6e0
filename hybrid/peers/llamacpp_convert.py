"""llama.cpp's `convert_hf_to_gguf.py`, run in the project's Python on a Qwen3-VL checkpoint.

    python hybrid/peers/llamacpp_convert.py LLAMA_CPP_TREE CHECKPOINT [convert_hf_to_gguf arguments]

Two of the converter's checks are answered for it, both about the tokenizer:
- it names a BPE pre-tokenizer by hashing the tokens of a fixed text; a checkpoint whose vocabulary
  is not one it has seen (the bench's checkpoints train their own, with Qwen2's split rule) fails
  there, so the name is given: "qwen2", the rule every Qwen3-VL tokenizer uses;
- Qwen2's vocabulary is read through sentencepiece first and through the GPT-2 BPE path when no
  `tokenizer.model` exists; Qwen3-VL checkpoints have none, so the BPE path is taken directly
  (sentencepiece is not one of the project's packages).
"""

import sys


def main() -> None:
    tree, arguments = sys.argv[1], sys.argv[2:]
    sys.path[:0] = [tree, f"{tree}/gguf-py"]
    import convert_hf_to_gguf
    from conversion.base import TextModel
    from conversion.qwen import Qwen2Model

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    Qwen2Model.set_vocab = lambda self: self._set_vocab_gpt2()
    sys.argv = ["convert_hf_to_gguf.py", *arguments]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
