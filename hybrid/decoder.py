"""The ONNX text decoder in onnxruntime: a KV cache per request, `forward` for prefill and each step.

The session is created once; a `KVCache` is created per request, and either dropped with it or
kept for the conversation's next request (see `hybrid.conversation`). An INT4 bundle's prompt pass
can run a second session, the decoder's graph with int8 layers (`hybrid.export.prefill`), on the
same cache buffers; decode steps and verifying passes always run the decoder's own graph.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from hybrid.errors import BundleError
from hybrid.export.prefill import DerivedInt8
from hybrid.export.tensors import external_info
from hybrid.layout import DECODER_NUM_LOGITS
from hybrid.threads import session_options


@dataclass
class StepInputs:
    """The inputs and logits of a pass of `n` text tokens after the cache (a decode step: 1; a pass
    that verifies k drafted tokens: k + 1), bound once and rewritten in place each pass."""

    embeds: np.ndarray  # (1, n, H)
    positions: np.ndarray  # (3, 1, n)
    logits: np.ndarray  # (1, n, V)
    values: dict[str, ort.OrtValue]  # the pass's input name -> a value sharing the array's memory
    output: ort.OrtValue  # sharing `logits`' memory
    offsets: np.ndarray  # (3, 1, n): 0..n-1 on each axis, the positions after the first


@dataclass
class KVCache:
    """One request's keys and values: a buffer `(1, kv_heads, capacity, head_dim)` per layer and
    kind, bound once as both past and present, so the decoder writes each step's keys in place.

    `steps` holds the inputs of text passes by their token count (made on first use); `bound` is the
    count whose inputs the binding holds (0: none, after a prefill). `mask` is a row of ones whose
    first `length + new` entries are the attention mask."""

    buffers: list[np.ndarray]
    binding: ort.IOBinding
    mask: np.ndarray  # (1, capacity)
    prompt_binding: ort.IOBinding | None = None  # the prompt pass's own session's, on the same buffers
    steps: dict[int, StepInputs] = field(default_factory=dict)
    length: int = 0
    bound: int = 0

    @property
    def capacity(self) -> int:
        return int(self.buffers[0].shape[2])

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers)

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens: the decoder reads only `attention_mask`'s length of the
        buffer and writes new tokens after it, so what lies beyond is simply overwritten (this is
        how rejected drafted tokens leave the cache)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length


class OnnxDecoder:
    """The decoder at `path`; `prompt`, where given, is the graph that runs prompt passes (`forward`)."""

    def __init__(self, path: str | Path, threads: int = 0, prompt: str | Path | None = None) -> None:
        # the prompt graph first: its int8 weights, made at load, are held twice until its session
        # has packed them, and the decoder's session is not yet there to add to that peak. Its
        # threads sleep once a prompt pass ends: spinning, they would share the cores with the steps
        self.prompt_session, self._prompt_borrowed = (
            (None, None) if prompt is None else open_session(prompt, threads, spin=False, decoder=Path(path))
        )
        self.session, self._borrowed = open_session(path, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        past = inputs["past_key_values.0.key"].shape
        self.num_kv_heads, self.head_dim = int(past[1]), int(past[3])
        ds = inputs["deepstack_embeds"].shape
        self.num_deepstack, self.hidden_size = int(ds[0]), int(ds[3])
        vocab = self.session.get_outputs()[0].shape[-1]
        if not isinstance(vocab, int):
            raise BundleError(f"the ONNX decoder {path} does not state its vocabulary size; export it again")
        self.vocab_size = vocab

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for up to `capacity` tokens (prompt and generated)."""
        shape = (1, self.num_kv_heads, capacity, self.head_dim)
        buffers = [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.num_layers)]
        values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in buffers]  # sharing the buffers' memory
        prompt = None if self.prompt_session is None else _bind_cache(self.prompt_session, values)
        return KVCache(
            buffers=buffers,
            binding=_bind_cache(self.session, values),
            mask=np.ones((1, capacity), dtype=np.int64),
            prompt_binding=prompt,
        )

    def _step_inputs(self, size: int) -> StepInputs:
        """The bound-once inputs and logits of a text pass of `size` tokens (DeepStack rows zero)."""
        arrays = {
            "inputs_embeds": np.zeros((1, size, self.hidden_size), dtype=np.float32),
            "position_ids": np.zeros((3, 1, size), dtype=np.int64),
            "deepstack_embeds": np.zeros((self.num_deepstack, 1, size, self.hidden_size), dtype=np.float32),
            DECODER_NUM_LOGITS: np.array([size], dtype=np.int64),
        }
        logits = np.zeros((1, size, self.vocab_size), dtype=np.float32)
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        offsets = np.broadcast_to(np.arange(size, dtype=np.int64), (3, 1, size)).copy()
        output = ort.OrtValue.ortvalue_from_numpy(logits)
        return StepInputs(arrays["inputs_embeds"], arrays["position_ids"], logits, values, output, offsets)

    def resized(self, cache: KVCache, capacity: int) -> KVCache:
        """A new cache of `capacity` tokens holding a copy of `cache`'s tokens."""
        if cache.length > capacity:
            raise ValueError(f"{cache.length} cached tokens do not fit in {capacity}")
        resized = self.new_cache(capacity)
        for source, target in zip(cache.buffers, resized.buffers):
            target[:, :, : cache.length] = source[:, :, : cache.length]
        resized.length = cache.length
        return resized

    def forward(
        self,
        cache: KVCache,
        inputs_embeds: np.ndarray,  # (1, S, H)
        position_ids: np.ndarray,  # (3, 1, S)
        deepstack_embeds: np.ndarray,  # (D, 1, S, H)
    ) -> np.ndarray:
        """Run S new tokens after the cached ones (a prefill, by the prompt graph where there is
        one); returns a copy of the last position's logits `(V,)`."""
        seq = inputs_embeds.shape[1]
        self._check_room(cache, seq)
        one = self._steps(cache, 1)
        if cache.prompt_binding is None:
            session, binding = self.session, cache.binding
            cache.bound = 0  # the step inputs are bound again by the next text pass
        else:
            session, binding = self.prompt_session, cache.prompt_binding
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input("deepstack_embeds", np.ascontiguousarray(deepstack_embeds, dtype=np.float32))
        binding.bind_ortvalue_input(DECODER_NUM_LOGITS, one.values[DECODER_NUM_LOGITS])
        binding.bind_ortvalue_output("logits", one.output)
        self._run(cache, seq, session, binding)
        return one.logits[0, -1].copy()

    def step(self, cache: KVCache, embedding: np.ndarray, position: int) -> np.ndarray:
        """One decode step: the token's embedding row `(H,)` at M-RoPE position `position` (the
        same on all three axes for text). Allocates nothing; the returned logits `(V,)` are the
        cache's own buffer, valid until its next run."""
        return self.run_text(cache, (embedding,), position)[0]

    def run_text(self, cache: KVCache, embeddings, position: int) -> np.ndarray:
        """`n` text tokens after the cache in one pass: their embedding rows (`n` rows of `H`), the
        first at M-RoPE position `position` and each next one after it (all three axes alike,
        DeepStack rows zero). Returns every position's logits `(n, V)`, row i predicting the token
        after token i: the cache's own buffer, valid until its next pass of `n` tokens. Allocates
        nothing; after the first pass of a size, a pass binds nothing new but the attention mask's
        length."""
        size = len(embeddings)
        self._check_room(cache, size)
        step = self._steps(cache, size)
        for i, row in enumerate(embeddings):
            step.embeds[0, i] = row
        np.add(step.offsets, position, out=step.positions)
        if cache.bound != size:
            for name, value in step.values.items():
                cache.binding.bind_ortvalue_input(name, value)
            cache.binding.bind_ortvalue_output("logits", step.output)
            cache.bound = size
        self._run(cache, size, self.session, cache.binding)
        return step.logits[0]

    def _steps(self, cache: KVCache, size: int) -> StepInputs:
        step = cache.steps.get(size)
        if step is None:
            step = cache.steps[size] = self._step_inputs(size)
        return step

    def _check_room(self, cache: KVCache, seq: int) -> None:
        if cache.length + seq > cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} tokens, {cache.length + seq} asked")

    @staticmethod
    def _run(cache: KVCache, seq: int, session: ort.InferenceSession, binding: ort.IOBinding) -> None:
        """Bind the attention mask for `seq` new tokens (a view of the cache's row of ones) and run."""
        binding.bind_cpu_input("attention_mask", cache.mask[:, : cache.length + seq])
        session.run_with_iobinding(binding)
        cache.length += seq


class BorrowedWeights:
    """The initializers of a graph whose bytes lie in a file outside its folder, mapped read-only:
    an INT4 bundle's decoder reads its INT4 weights from the GenAI model's data file
    (`hybrid.export.shared`), and onnxruntime refuses such a location itself. The maps and values
    live as long as the session that uses them."""

    def __init__(self, path: Path) -> None:
        self.names: list[str] = []
        self.values: list[ort.OrtValue] = []
        self.maps: dict[Path, mmap.mmap] = {}
        folder, bundle = path.parent.resolve(), path.parent.parent.resolve()
        for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
            info = external_info(tensor)
            if "location" not in info:
                continue
            file = (folder / info["location"]).resolve()
            if file.parent == folder:
                continue
            if not file.is_relative_to(bundle):
                raise BundleError(f"{path} names weights outside its bundle ({info['location']}); export it again")
            offset, length = int(info.get("offset", 0)), int(info["length"])
            array = self._map(file)[offset : offset + length]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            self.names.append(tensor.name)
            self.values.append(ort.OrtValue.ortvalue_from_numpy(array.view(dtype).reshape(tuple(tensor.dims))))

    def _map(self, file: Path) -> np.ndarray:
        if file not in self.maps:
            with open(file, "rb") as f:
                self.maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(self.maps[file], dtype=np.uint8)

    def release(self) -> None:
        """Drop the pages onnxruntime read while it packed the weights into its own buffers: they
        are the file's, read again should anything touch them, and would otherwise count in this
        process's memory for as long as the session lives."""
        for mapped in self.maps.values():
            mapped.madvise(mmap.MADV_DONTNEED)


def open_session(
    path: str | Path, threads: int, spin: bool = True, decoder: Path | None = None
) -> tuple[ort.InferenceSession, BorrowedWeights]:
    """The session of the graph at `path`, with the weights it borrows mapped; a prompt graph's
    int8 weights are made from the INT4 ones of the `decoder` graph (`hybrid.export.prefill`)."""
    options = session_options(threads)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        borrowed = BorrowedWeights(Path(path))
        derived = None if decoder is None else DerivedInt8(Path(path), decoder)
        names, values = list(borrowed.names), list(borrowed.values)
        if derived is not None:
            names += list(derived.arrays)
            values += [ort.OrtValue.ortvalue_from_numpy(array) for array in derived.arrays.values()]
        if names:
            options.add_external_initializers(names, values)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except BundleError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise BundleError(f"cannot load the ONNX decoder {path}: {exc}") from exc
    borrowed.release()
    if derived is not None:
        derived.release()
    return session, borrowed


def _bind_cache(session: ort.InferenceSession, values: list[ort.OrtValue]) -> ort.IOBinding:
    """A binding of `session` with the cache's buffers as both past and present of every layer."""
    binding = session.io_binding()
    for i, value in enumerate(values):
        layer, kind = divmod(i, 2)
        name = ("key", "value")[kind]
        binding.bind_ortvalue_input(f"past_key_values.{layer}.{name}", value)
        binding.bind_ortvalue_output(f"present.{layer}.{name}", value)
    return binding
