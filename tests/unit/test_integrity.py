"""What alambic writes, it can tell apart from what it reads back: a digest of every tensor and of the
metadata refuses a bit-flipped student.safetensors by name, a damaged teacher-cache file is recomputed
(never served), a failed write names the file and keeps the previous one, and cache folders and files are
never group- or world-writable, whatever the umask."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from alambic.data.batch import INPUT, Batch
from alambic.errors import AlambicError
from alambic.export import export_safetensors, load_weights
from alambic.models import SmallCNN
from alambic.teachers import FrozenTeacher
from alambic.teachers.cached import CachedTeacher
from alambic.train import state as st


def flip_byte(path, tensor: str, offset: int = 0, mask: int = 0x40) -> None:
    """Flip bits of one byte inside ``tensor``'s data in a safetensors file (what a bad disk or copy does)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    raw[8 + n + start + offset] ^= mask
    path.write_bytes(bytes(raw))


class Counting(FrozenTeacher):
    rows = 0

    def outputs(self, batch, views):
        self.rows += len(batch.index) * len(views)
        return super().outputs(batch, views)


def make_teacher() -> Counting:
    torch.manual_seed(0)
    return Counting(SmallCNN(1, (8, 8), [4, 8], 10))


def batch_of(x: torch.Tensor, index: list[int]) -> Batch:
    return Batch(views={INPUT: x[index]}, index=torch.tensor(index))


def filled_cache(tmp_path, x):
    cache = CachedTeacher(make_teacher(), len(x), tmp_path, data_fingerprint="d1")
    out = cache.outputs(batch_of(x, list(range(len(x)))), [INPUT])[INPUT]
    file = cache.file
    cache.close()
    return file, out


# -- the teacher cache ---------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_teacher_cache_is_recomputed_not_served(tmp_path, capsys):
    x = torch.rand(8, 1, 8, 8)
    file, want = filled_cache(tmp_path, x)
    flip_byte(file, "logits", offset=4 * 10 * 3 + 3)  # row 3's first logit: its exponent
    teacher = make_teacher()
    cache = CachedTeacher(teacher, 8, tmp_path, data_fingerprint="d1")
    assert cache.stats()["cached_rows"] == 0
    got = cache.outputs(batch_of(x, list(range(8))), [INPUT])[INPUT]
    assert teacher.rows == 8  # every row computed again, none served from the damaged file
    torch.testing.assert_close(got.logits, want.logits)
    err = capsys.readouterr().err
    assert err.count(str(file)) == 1 and "damaged" in err and "recomput" in err
    cache.close()  # the rebuilt file replaces the damaged one, and serves the next run
    teacher = make_teacher()
    again = CachedTeacher(teacher, 8, tmp_path, data_fingerprint="d1")
    assert torch.equal(again.outputs(batch_of(x, [3]), [INPUT])[INPUT].logits, want.logits[[3]])
    assert teacher.rows == 0 and capsys.readouterr().err == ""


@pytest.mark.parametrize("damage", ["truncated", "no digest", "keys flipped"])
def test_other_damaged_teacher_cache_files_are_rebuilt(tmp_path, capsys, damage):
    x = torch.rand(8, 1, 8, 8)
    file, want = filled_cache(tmp_path, x)
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:-7])
    elif damage == "no digest":  # written by an older alambic: nothing vouches for its rows
        tensors = load_file(str(file))
        meta = json.loads(__import__("safetensors").safe_open(str(file), "pt").metadata()[st.META_KEY])
        save_file(tensors, str(file), metadata={st.META_KEY: json.dumps(meta)})
    else:
        flip_byte(file, "keys", offset=7)
    teacher = make_teacher()
    cache = CachedTeacher(teacher, 8, tmp_path, data_fingerprint="d1")
    got = cache.outputs(batch_of(x, list(range(8))), [INPUT])[INPUT]
    assert teacher.rows == 8
    torch.testing.assert_close(got.logits, want.logits)
    assert str(file) in capsys.readouterr().err


# -- exported weights ----------------------------------------------------------------------------------


def test_a_bit_flipped_student_safetensors_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    path = export_safetensors(model, tmp_path / "student.safetensors", metadata={"alambic": "{}"})
    load_weights(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), path)  # intact: loads
    flip_byte(path, "2.weight", offset=2, mask=0x01)
    with pytest.raises(AlambicError) as info:
        load_weights(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), path)
    msg = str(info.value)
    assert str(path) in msg and "2.weight" in msg and "\n" not in msg


def test_edited_export_metadata_is_refused(tmp_path):
    from safetensors import safe_open

    path = export_safetensors(nn.Linear(2, 2), tmp_path / "w.safetensors", metadata={"alambic": '{"epochs": 3}'})
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**header, "alambic": '{"epochs": 30}'})
    with pytest.raises(AlambicError, match=f"{path}.*metadata"):
        load_weights(nn.Linear(2, 2), path)


def test_a_safetensors_file_without_a_digest_still_loads(tmp_path):
    """Weights from an older alambic, or from any other tool, carry no digest: accepted as they are."""
    torch.manual_seed(0)
    src = nn.Linear(3, 2)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = load_weights(nn.Linear(3, 2), tmp_path / "w.safetensors")
    assert torch.equal(model.weight, src.weight)


# -- failed writes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                    'message: "No space left on device" })'),
])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.safetensors"
    st.atomic_save({"w": torch.ones(3)}, {"step": 1}, path)
    real = st.save_file

    def disk_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(20)  # half written when the disk filled up
        raise error

    monkeypatch.setattr(st, "save_file", disk_full)
    with pytest.raises(AlambicError) as info:
        st.atomic_save({"w": torch.zeros(3)}, {"step": 2}, path)
    assert str(info.value) == (f"could not write checkpoint {path}: No space left on device; "
                               "the previous checkpoint is intact")
    tensors, meta = st.load(path)
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]
    with pytest.raises(AlambicError, match=f"could not write checkpoint {tmp_path / 'new.safetensors'}: "
                                           "No space left on device; no checkpoint was written"):
        st.atomic_save({"w": torch.zeros(3)}, {"step": 2}, tmp_path / "new.safetensors")


def test_a_failed_export_is_one_line(tmp_path, monkeypatch):
    import alambic.export.weights as weights

    def disk_full(fh, data):
        fh.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights, "_write_file", disk_full)
    with pytest.raises(AlambicError, match=f"could not write {tmp_path / 'w.safetensors'}: No space left on device"):
        export_safetensors(nn.Linear(2, 2), tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- permissions ---------------------------------------------------------------------------------------


def _writable_by_others(path) -> bool:
    return bool(stat.S_IMODE(path.stat().st_mode) & 0o022)


def test_cache_folders_and_files_are_not_group_or_world_writable_under_umask_0(tmp_path, monkeypatch):
    from alambic.cache_dir import cache_dir

    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))
    old = os.umask(0)
    try:
        x = torch.rand(4, 1, 8, 8)
        cache = CachedTeacher(make_teacher(), 4, cache_dir("teachers"), data_fingerprint="d1")
        cache.outputs(batch_of(x, [0, 1, 2, 3]), [INPUT])
        cache.close()
        ckpt = tmp_path / "run" / "checkpoint.safetensors"
        st.atomic_save({"w": torch.ones(2)}, {"step": 1}, ckpt)
        st.atomic_write_text(tmp_path / "run" / "note.json", "{}")
    finally:
        os.umask(old)
    for path in (tmp_path / "cache", tmp_path / "cache" / "teachers", cache.file if cache.file else
                 next((tmp_path / "cache" / "teachers").iterdir()), ckpt, tmp_path / "run" / "note.json"):
        assert not _writable_by_others(path), (path, oct(path.stat().st_mode))
    assert stat.S_IMODE((tmp_path / "cache" / "teachers").stat().st_mode) == 0o755


def test_make_dirs_never_adds_group_or_world_write_and_keeps_a_stricter_umask(tmp_path, digits, monkeypatch):
    from alambic.cache_dir import make_dirs
    from alambic.probe import cached_pixel_baseline

    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))
    old = os.umask(0)
    try:
        make_dirs(tmp_path / "a" / "b")
        cached_pixel_baseline(digits)  # the probes cache goes through atomic_write_text
        os.umask(0o077)
        make_dirs(tmp_path / "private" / "c")
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
    for d in (tmp_path / "private", tmp_path / "private" / "c"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    probes = tmp_path / "cache" / "probes"
    assert [_writable_by_others(p) for p in (tmp_path / "cache", probes, *probes.iterdir())] == [False] * 3
