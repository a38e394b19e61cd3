"""The on-disk format's versions: int8 memories (format 3) read back exactly as written, and a
memory written in format 2 by the code before it (``tests/data/format2-int8``) still opens."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from memory_plugin import ContextMemory, testing
from memory_plugin.persistence import FORMAT_VERSION, MemoryFormatError

from .test_context import _state
from .test_persistence import _ask, _build

TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. "
DATA = Path(__file__).parent / "data"
INT8 = testing.TINY_CONFIG.replace(kv_quantization="int8")


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.mark.parametrize("budget", [None, 5_000_000], ids=["in-ram", "read-from-disk"])
def test_an_int8_memory_reads_back_exactly_as_it_was_written(tiny_model, tiny_tokenizer, tmp_path, budget):
    built = _build(tiny_model, tiny_tokenizer, INT8)
    state, answer = _state(built._engine.ctx), _ask(built)
    built.save(tmp_path / "m")
    loaded = ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, max_resident_bytes=budget)
    # reprs are rounded in RAM as they are stored, so selection scans the same numbers after a load
    assert _state(loaded._engine.ctx) == state
    assert _ask(loaded) == answer


def test_int8_shards_hold_int8_reprs_and_float16_scales(tiny_model, tiny_tokenizer, tmp_path):
    _build(tiny_model, tiny_tokenizer, INT8).save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 4
    header = _header(tmp_path / "m" / manifest["shards"][0]["file"])
    n, (h, d) = manifest["shards"][0]["n"], (tiny_model.config.num_key_value_heads, 16)  # a key per KV head
    assert {k: header[f"{k}.0"]["dtype"] for k in ("kv", "scale", "repr", "repr_scale")} == {
        "kv": "I8", "scale": "F16", "repr": "I8", "repr_scale": "F16"
    }
    assert header["repr.0"]["shape"] == [n, h, d] and header["repr_scale.0"]["shape"] == [n, h, 1]


def _fixture(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "old"
    shutil.copytree(DATA / "format2-int8", path)
    return path, json.loads((DATA / "format2-int8.json").read_text())


def test_a_format_2_memory_still_loads_with_the_answer_it_gave(tiny_model, tiny_tokenizer, tmp_path):
    """Written by the code before format 3 (float32 scales and reprs); its recorded answer was the
    old code's, greedy, from the same tiny model."""
    path, expected = _fixture(tmp_path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 2
    loaded = ContextMemory.load(path, tiny_model, tokenizer=tiny_tokenizer)
    assert len(loaded) == expected["tokens"] and loaded.stats().blocks_by_tier == expected["blocks"]
    assert _ask(loaded) == expected["answer"]


def test_a_format_2_memory_opened_for_writing_keeps_its_shards_and_adds_new_ones(tiny_model, tiny_tokenizer, tmp_path):
    path, expected = _fixture(tmp_path)
    old = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.glob("blocks-*")}
    mem = ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer)
    assert mem.config.kv_quantization == "int8" and _ask(mem) == expected["answer"]
    mem.add_text(TEXT * 8)
    answer, n = _ask(mem), len(mem)
    mem.close()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    files = [s["file"] for s in manifest["shards"]]
    assert {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in old} == old and set(old) < set(files)
    new = [f for f in files if f not in old]
    assert all(_header(path / f)["repr.0"]["dtype"] == "I8" for f in new)
    assert all(_header(path / f)["repr.0"]["dtype"] == "F32" for f in old)
    again = ContextMemory.load(path, tiny_model, tokenizer=tiny_tokenizer)  # both layouts in one memory
    assert len(again) == n and _ask(again) == answer


def test_a_manifest_newer_than_this_code_is_refused_naming_file_and_version(tiny_model, tiny_tokenizer, tmp_path):
    path, _ = _fixture(tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**m, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(MemoryFormatError, match=rf"manifest.json: format version {FORMAT_VERSION + 1} is newer"):
        ContextMemory.load(path, tiny_model, tokenizer=tiny_tokenizer)


@pytest.mark.parametrize("saved, given", [("none", "int8"), ("int8", "none")])
def test_an_opened_memory_keeps_the_storage_it_was_written_with(tiny_model, tiny_tokenizer, tmp_path, saved, given):
    """A pool opens every thread with its one config: a thread written with another
    kv_quantization (float32, before int8 became the default) opens as it was written."""
    built = _build(tiny_model, tiny_tokenizer, testing.TINY_CONFIG.replace(kv_quantization=saved))
    answer = _ask(built)
    built.save(tmp_path / "m")
    mem = ContextMemory.open(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, config=INT8.replace(kv_quantization=given))
    assert mem.config.kv_quantization == saved and _ask(mem) == answer
    mem.close()
    with pytest.raises(ValueError, match="differs from the saved memory's in block_size$"):
        ContextMemory.open(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, config=INT8.replace(block_size=32, kv_quantization=given))
