"""choral's own GGUF reader against the gguf package: every metadata value, every tensor's place
and bytes, whole-tensor dequantization of each block format, and the errors for broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from choral.errors import ModelLoadError, UnsupportedTensorTypeError
from choral.gguf_reader import GGUFReader, StringArray
from choral.loader.dequant import dequantize


def _same(mine: object, theirs: object) -> bool:
    if isinstance(mine, np.ndarray):
        return bool(np.array_equal(mine, np.asarray(theirs)))
    if isinstance(mine, StringArray):
        return mine.tolist() == theirs
    return mine == theirs and type(mine) is type(theirs)


def _assert_matches_gguf_package(path: Path) -> GGUFReader:
    import gguf

    ref = gguf.GGUFReader(str(path))
    mine = GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(mine.metadata) == keys
    for key in keys:
        assert _same(mine.metadata[key], ref.fields[key].contents()), key
    assert list(mine.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = mine.tensors[t.name]
        assert info.ggml_type == t.tensor_type.value and info.type_name == t.tensor_type.name
        assert info.shape == tuple(int(x) for x in reversed(t.shape))
        assert info.offset == t.data_offset
        assert mine.raw(t.name).tobytes() == np.asarray(t.data).tobytes()
    return mine


def test_bundled_model_metadata_and_tensors(smollm_path: Path) -> None:
    mine = _assert_matches_gguf_package(smollm_path)
    tokens = mine.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, StringArray) and len(tokens) == 49152
    assert tokens[0] == "<|endoftext|>" and tokens[1:3] == ["<|im_start|>", "<|im_end|>"]
    assert len(mine.kv_digest) == 64 and mine.kv_digest == GGUFReader(smollm_path).kv_digest


def test_every_value_type(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "values.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, -1.5])
    w.add_array("t.strs", ["a", "", "ü€"])
    w.add_array("t.empty", [])
    w.add_tensor("x", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("y", np.arange(6, dtype=np.float16).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    mine = _assert_matches_gguf_package(path)
    assert mine.metadata["t.bool"] is True and mine.metadata["t.u64"] == 2**63 + 5
    assert mine.metadata["t.strs"] == ["a", "", "ü€"]
    np.testing.assert_array_equal(dequantize(mine.raw("x"), mine.tensors["x"]), np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(dequantize(mine.raw("y"), mine.tensors["y"]), np.arange(6).reshape(2, 3))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "Q6_K", "Q4_K"])
def test_dequantize_matches_gguf_package(tmp_path: Path, qtype: str) -> None:
    import gguf
    from gguf.quants import dequantize as ref_dequantize
    from gguf.quants import quantize

    t = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    data = rng.standard_normal((6, 512)).astype(np.float32) * 3
    if qtype.endswith("_K"):  # the gguf package cannot quantize K formats: random blocks instead
        block_bytes = gguf.constants.GGML_QUANT_SIZES[t][1]
        packed = rng.integers(0, 256, (6, 512 // 256 * block_bytes), dtype=np.uint8)
    else:
        packed = quantize(data, t)
    path = tmp_path / f"{qtype}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("w", packed, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    mine = GGUFReader(path)
    ours = dequantize(mine.raw("w"), mine.tensors["w"])
    assert ours.shape == (6, 512) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref_dequantize(packed, t).reshape(6, 512))


def test_broken_files_are_model_load_errors(tmp_path: Path, smollm_path: Path) -> None:
    head = smollm_path.read_bytes()[:4_000_000]
    cases = {
        "empty.gguf": b"",
        "magic.gguf": b"GGML" + head[4:100],
        "version.gguf": head[:4] + (7).to_bytes(4, "little") + head[8:100],
        "bigendian.gguf": head[:4] + (3).to_bytes(4, "big") + head[8:100],
        "header.gguf": head[:1000],  # ends inside the key/value section
        "data.gguf": head,  # ends inside the tensor data
    }
    messages = {"empty.gguf": "cannot read", "magic.gguf": "not a GGUF file", "version.gguf": "version 7",
                "bigendian.gguf": "big-endian", "header.gguf": "not a readable GGUF",
                "data.gguf": "runs past the end"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelLoadError, match=messages[name]):
            GGUFReader(tmp_path / name)


def test_unknown_tensor_type_is_named(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "q8k.gguf"
    t = gguf.GGMLQuantizationType.Q8_K
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("w", np.zeros((2, 292), dtype=np.uint8), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    mine = GGUFReader(path)
    with pytest.raises(UnsupportedTensorTypeError, match="w has type Q8_K"):
        dequantize(mine.raw("w"), mine.tensors["w"], path)
