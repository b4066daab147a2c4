"""cid_ds.data.tars: the loader's own tar reader gives exactly the samples webdataset gives, on every
tar layout a shard writer produces, and a clear error for a broken tar."""
import gzip
import io
import tarfile

import pytest
import webdataset as wds

from cid_ds.data.tars import TarFormatError, tar_samples
from cid_ds.data.samples import read_samples
from cid_ds.data.damage import ShardDamage

LONG_DIR = "a-folder-name-long-enough-that-ustar-must-split-or-extend-it/" * 3


def members() -> list[tuple[str, bytes]]:
    """Members as img2dataset and our packer write them, plus what a hand-made tar may hold."""
    out = []
    for i in range(5):
        out += [(f"{i:09d}.jpg", bytes([i]) * (700 + i)), (f"{i:09d}.txt", f"caption {i}".encode()),
                (f"{i:09d}.t_img", b"\x01\x02" * 16)]
    out += [("__meta__", b"skipped"), (f"{LONG_DIR}00000005.JPG", b"upper-case field"),
            (f"{LONG_DIR}00000005.txt", b"long name"), ("dir.with.dots/00000006.seg.png", b"field with a dot"),
            ("ünïcödé/00000007.txt", "é".encode()), ("00000008.txt", b"")]
    return out


def write_tar(path, fmt: int, compress: bool = False) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("a-directory"), None)
        tar.getmember("a-directory").type = tarfile.DIRTYPE
        for name, data in members():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_samples_equal_webdatasets_for_every_tar_format(tmp_path, fmt):
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot store non-ASCII names or names this long in one piece
        path = tmp_path / "ustar.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in members()[:15]:
                info = tarfile.TarInfo(f"{LONG_DIR[:120]}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        path = str(path)
    else:
        path = write_tar(tmp_path / "shard.tar", fmt)
    ours, theirs = list(tar_samples(path)), list(wds.tarfile_to_samples()([{"url": path}]))
    assert ours == theirs and len(ours) >= 5


def test_webdatasets_own_shards_and_gzip_shards_read_the_same(tmp_path):
    plain = str(tmp_path / "wds.tar")
    with wds.TarWriter(plain) as sink:
        for i in range(20):
            sink.write({"__key__": f"{i:04d}", "jpg": bytes(1000 + i), "txt": b"x" * i, "json": b"{}"})
    assert list(tar_samples(plain)) == list(wds.tarfile_to_samples()([{"url": plain}]))
    zipped = write_tar(tmp_path / "shard.tar.gz", tarfile.PAX_FORMAT, compress=True)
    assert list(tar_samples(zipped)) == list(wds.tarfile_to_samples()([{"url": zipped}]))


def test_a_broken_tar_is_an_error_naming_the_file_and_where(tmp_path):
    whole = (tmp_path / "whole.tar")
    write_tar(whole, tarfile.PAX_FORMAT)
    data = whole.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[:2000])
    with pytest.raises(TarFormatError, match=rf"{truncated}: member at byte 512 is truncated \(976 of 1024 bytes\)"):
        list(tar_samples(str(truncated)))
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(data[:600] + b"garbage" + data[607:])
    with pytest.raises(TarFormatError, match=rf"{corrupt}: header checksum mismatch at byte 512"):
        list(tar_samples(str(corrupt)))
    damaged = []
    assert list(read_samples([str(corrupt)], damaged)) == []  # the one sample begun is not whole
    assert damaged == [ShardDamage(str(corrupt), 512, 0, "header checksum mismatch at byte 512")]


def test_a_field_twice_in_one_sample_is_refused(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("0001.txt", "0001.TXT"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(TarFormatError, match="0001.TXT: duplicate file name"):
        list(tar_samples(str(path)))


def test_a_bad_pax_header_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("é/0001.txt")  # a non-ASCII name: Python writes a pax header for it
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    data = bytearray(path.read_bytes())
    data[512:520] = b"nonsense"  # the pax record's length field (after the pax header, whose checksum holds)
    path.write_bytes(bytes(data))
    with pytest.raises(TarFormatError, match=rf"{path}: bad pax header at byte 0"):
        list(tar_samples(str(path)))
