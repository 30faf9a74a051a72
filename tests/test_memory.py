"""Memory behaviour a prune's peak depends on: weights loaded for pruning are not memory-mapped (the unsliced
embedding would pin the whole mapped file next to the sliced copies), and freed heap pages can be returned."""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import pytest
from tiny_models import tiny_model

from bonsai.checkpoint import load_for_pruning, save_pruned
from bonsai.memory import release_free_memory
from bonsai.units import full_kept

MAPS = Path("/proc/self/maps")
needs_proc = pytest.mark.skipif(not MAPS.exists(), reason="needs /proc/self/maps (Linux)")


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in MAPS.read_text()


@needs_proc
def test_pruning_load_does_not_map_a_pruned_checkpoint(tmp_path):
    model = tiny_model("llama")
    ckpt = save_pruned(model, None, tmp_path / "pruned", {"kept_units": full_kept(model)})
    loaded, _, _ = load_for_pruning(ckpt)
    assert not _mapped(ckpt / "model.safetensors")
    assert loaded.model.embed_tokens.weight.untyped_storage().nbytes() == loaded.model.embed_tokens.weight.nbytes
    mapped, _, _ = load_for_pruning(ckpt, in_memory=False)  # evaluation's read-only load maps the file
    assert _mapped(ckpt / "model.safetensors")


@needs_proc
def test_pruning_load_does_not_map_a_source_model(stories_dir):
    weights = next(stories_dir.glob("*.safetensors"))
    load_for_pruning(stories_dir)
    assert not _mapped(weights)


_FREED_IN_THE_HEAP = """
from bonsai.memory import release_free_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
blocks = [bytearray(64 << 10) for _ in range(400)]  # 25 MiB of 64 KiB blocks: in the heap, under the mmap threshold
last = blocks[-1]  # the heap's top stays in use, so glibc's own trimming at free() cannot return the rest
del blocks
before = rss()
print(release_free_memory(), (before - rss()) >> 20)
"""


@needs_proc
def test_release_free_memory_returns_freed_heap_pages():
    import subprocess
    import sys

    libc = ctypes.util.find_library("c")
    has_trim = libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim")
    trimmed, returned = subprocess.run([sys.executable, "-c", _FREED_IN_THE_HEAP], check=True, capture_output=True,
                                       text=True).stdout.split()
    assert trimmed == str(has_trim)
    if has_trim:
        assert int(returned) >= 20  # most of the 25 MiB freed in the middle of the heap went back to the OS
    assert release_free_memory() is has_trim


_AFTER_A_LARGE_FREE = """
import ctypes, ctypes.util, sys, torch
from bonsai.memory import cap_heap_growth
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
# where glibc's own threshold ends up once a large block was freed: 32 MiB (its ceiling), set explicitly here so the
# starting point does not depend on what this process happened to allocate before
ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 32 << 20)
if sys.argv[1] == "cap":
    assert cap_heap_growth()
block = torch.ones(12 << 18)  # 12 MiB, touched
before = rss()
del block
print((before - rss()) >> 20)
"""


@needs_proc
@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="needs the C library's mallopt (glibc)")
def test_capped_heap_returns_a_large_block_when_it_is_freed():
    import subprocess
    import sys

    returned = {
        mode: int(subprocess.run([sys.executable, "-c", _AFTER_A_LARGE_FREE, mode], check=True, capture_output=True,
                                 text=True).stdout)
        for mode in ("cap", "risen")
    }
    assert returned["cap"] >= 11  # above the 4 MiB pin: its own mapping, unmapped at once
    assert returned["risen"] < 11  # under a risen threshold it stays in the heap: the behaviour the pin removes
