"""Shard integrity (integrity.py): the manifest's xxh3_128 checksums (sha256 for older manifests) and member
tables, each verified on read; a mismatch is a one-line DataError naming the shard, or a counted skip."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import xxhash

from data_pipeline import DataError, tario
from data_pipeline.integrity import member_table, packed_members_entry
from data_pipeline.shards import DTYPES
from tests.unit.reader_support import damage_sha, manifest_rows, one_line, reader, shards, tiny  # noqa: F401

EXT, ITEMSIZE = DTYPES["uint16"][1], 2


def _scan(path):
    """(name, data offset, size) of every member, as tarfile reads them."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar]


def _edit_manifest(shard_dir, edit, out_name="manifest.json"):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for info in manifest["shards"]:
        edit(info)
    (shard_dir / out_name).write_text(json.dumps(manifest))
    return manifest


def _one_pass(src, **kw):
    return np.concatenate(list(reader(src, micro_batch_size=1, shuffle=False, loop=False, **kw)))


def test_manifest_records_xxh3_next_to_sha256_and_member_tables_equal_to_tarfiles_scan(tiny):
    manifest = tiny["manifest"]
    for info in manifest["shards"]:
        data = (tiny["shards"] / info["name"]).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert info["xxh3_128"] == xxhash.xxh3_128_hexdigest(data)
        assert member_table(manifest, info, EXT, ITEMSIZE) == _scan(tiny["shards"] / info["name"])
    assert [i["members"]["first_key"] for i in manifest["shards"][:3]] == ["0000000000", "0000000005", "0000000010"]


def test_old_manifest_without_xxh3_is_verified_with_sha256(shards):
    rows = manifest_rows(shards)

    def older(info):  # as `data prepare` wrote manifests before xxh3_128 and member tables
        del info["xxh3_128"], info["members"]

    _edit_manifest(shards, older)
    assert np.array_equal(_one_pass(shards), rows)
    damage_sha(shards, "shard-000002.tar")
    with pytest.raises(DataError, match="sha256 does not match") as e:
        _one_pass(shards)
    one_line(e, "shard-000002.tar")
    urls = [f"pipe:cat {shards}/shard-{i:06d}.tar" for i in range(13)]  # streamed: hashed while read
    with pytest.raises(DataError, match="sha256 does not match") as e:
        _one_pass({"manifest": str(shards), "shards": urls})
    one_line(e, "shard-000002.tar")


def test_xxh3_mismatch_is_one_line_error_and_sha256_alone_is_not_consulted(shards):
    rows = manifest_rows(shards)
    _edit_manifest(shards, lambda info: info.update(sha256="0" * 64))  # xxh3_128 is what the reader checks
    assert np.array_equal(_one_pass(shards), rows)
    damage_sha(shards, "shard-000005.tar")
    with pytest.raises(DataError, match="xxh3_128 does not match manifest.json") as e:
        _one_pass(shards)
    one_line(e, "shard-000005.tar")
    with pytest.warns(RuntimeWarning, match="shard-000005.tar: xxh3_128"):
        r = reader(shards, micro_batch_size=1, shuffle=False, loop=False, on_bad_shard="skip")
        got = np.concatenate(list(r))
    assert r.skipped_shards == 1 and np.array_equal(got, np.concatenate([rows[:200], rows[240:]]))


def test_wrong_member_table_is_an_error_when_verified_and_never_gives_wrong_rows(shards):
    rows, original = manifest_rows(shards), (shards / "manifest.json").read_text()

    def shift(info):  # names one block later: the headers say otherwise
        if info["name"] == "shard-000003.tar":
            info["members"]["first_key"] = "0000000016"

    _edit_manifest(shards, shift)
    with pytest.raises(DataError, match="members entry of manifest.json does not match the tar") as e:
        _one_pass(shards)
    one_line(e, "shard-000003.tar")
    with pytest.warns(RuntimeWarning, match="shard-000003.tar"):
        r = reader(shards, micro_batch_size=1, shuffle=False, loop=False, on_bad_shard="skip")
        assert np.array_equal(np.concatenate(list(r)), np.concatenate([rows[:120], rows[160:]]))
    # Unverified bytes: a table the headers contradict is not used; tarfile parses them, as without a table.
    assert np.array_equal(_one_pass(shards, verify_checksums=False), rows)

    def stride(info):  # a gap between members could hide a member tarfile would read
        if info["name"] == "shard-000004.tar":
            info["members"]["stride"] += 512

    (shards / "manifest.json").write_text(original)
    _edit_manifest(shards, stride)
    with pytest.raises(DataError, match="not a packed layout") as e:
        _one_pass(shards)
    one_line(e, "shard-000004.tar")


def test_member_table_replaces_header_parsing(shards, monkeypatch):
    scans = []
    real = tario._scan
    monkeypatch.setattr(tario, "_scan", lambda f, table: scans.append(1) or real(f, table))
    rows = manifest_rows(shards)
    assert np.array_equal(_one_pass(shards), rows) and scans == []  # verified + table: no header parsed
    assert np.array_equal(_one_pass(shards, verify_checksums=False), rows) and scans == []  # headers checked
    _edit_manifest(shards, lambda info: info.pop("members"))
    assert np.array_equal(_one_pass(shards), rows) and len(scans) == 13  # older manifest: tarfile parses


def test_check_members_accepts_exactly_what_tarfile_reads(tiny):
    path = tiny["shards"] / "shard-000001.tar"
    data, table = memoryview(path.read_bytes()), _scan(path)
    assert tario.check_members(data, table) is None
    (n0, o0, s0), (n1, o1, s1) = table[:2]
    wrong = {
        "offset": [(n0, o0 + 512, s0)] + table[1:],
        "size": [(n0, o0, s0 - 66)] + table[1:],
        "name": [(n0, o0, s0), (n0, o1, s1)] + table[2:],
        "member left out": table[:-1],
        "member added": table + [("0000000010.tokens.u16", table[-1][1] + 1536, s0)],
        "empty": [],
    }
    for what, bad in wrong.items():
        assert tario.check_members(data, bad) is not None, what
    end = table[-1][1] + -(-table[-1][2] // 512) * 512  # the end-of-archive block
    for at in (0, 100, 130, 150, 156, 400, end + 10):  # name, mode, size, checksum, type, prefix, end block
        damaged = bytearray(data)
        damaged[at] ^= 0x01
        problem = tario.check_members(memoryview(bytes(damaged)), table)
        assert problem is not None, at
    cut = memoryview(bytes(data[: table[-1][1] + table[-1][2]]))  # no end-of-archive block
    assert "end-of-archive" in tario.check_members(cut, table)


def test_tars_that_are_not_packed_get_no_member_table(tiny, tmp_path):
    # A PAX tar (what tarfile writes by default with mtime set and a non-ASCII name) has extension records
    # between members: tarfile's scan is right, and check_members refuses it rather than guess.
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("0000000000.tokens.u16", "0000000001.tokens.ü16"):
            info = tarfile.TarInfo(name)
            info.size = 1056
            tar.addfile(info, io.BytesIO(b"\0" * 1056))
    assert tario.check_members(memoryview(path.read_bytes()), _scan(path)) is not None
    manifest = {**tiny["manifest"], "sequences_per_sample": 2}
    info = {"name": "pax.tar", "blocks": 2, "sequences": 4}
    assert packed_members_entry(path, manifest, info, "0000000000", EXT, ITEMSIZE) is None
    good = tiny["shards"] / "shard-000000.tar"
    entry = packed_members_entry(good, tiny["manifest"], tiny["manifest"]["shards"][0], "0000000000", EXT,
                                 ITEMSIZE)
    assert entry == tiny["manifest"]["shards"][0]["members"]
