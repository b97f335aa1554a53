"""Sharded datastores in one process (knnfast.storage.sharded): the manifest, Datastore.open of
a sharded directory, search bitwise equal to a single store over the concatenated entries
(ties across shard boundaries, k larger than a shard, exclude), lookup, KNNDecoder over it,
and clear errors for missing / truncated / replaced shards and uncommitted builds."""
import json
import os
import shutil

import pytest
import torch

import knnfast
from knnfast import Datastore, DatastoreError
from knnfast.storage import sharded

pytestmark = pytest.mark.usefixtures("single_threaded")

V = 40
SIZES = (37, 5, 90)  # uneven, one shard smaller than most k below


def _data(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=g)
    keys[100:110] = keys[0:10]  # exact duplicates across shard boundaries (ties)
    keys[40] = keys[38]         # and inside the small shard's neighbourhood
    return keys, torch.randint(0, V, (n,), generator=g)


def _write(path, keys, values, metric):
    with Datastore.create(path, keys.shape[1], vocab_size=V, metric=metric,
                          progress=False) as w:
        w.add(keys, values)


def build_pair(root, metric="l2", sizes=SIZES, d=12):
    """(single store, sharded store) over the same entries."""
    keys, values = _data(sum(sizes), d)
    _write(os.path.join(root, "single"), keys, values, metric)
    sh = os.path.join(root, "sharded")
    os.makedirs(sh)
    names, start = [], 0
    for i, n in enumerate(sizes):
        names.append(sharded.shard_name(i))
        _write(os.path.join(sh, names[-1]), keys[start:start + n], values[start:start + n],
               metric)
        start += n
    sharded.write_manifest(sh, names)
    return Datastore.open(os.path.join(root, "single")), Datastore.open(sh), keys


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_search_equals_single_store_bitwise(tmp_path, metric):
    single, sh, keys = build_pair(str(tmp_path), metric)
    assert isinstance(sh, sharded.ShardedStore) and len(sh) == len(single) == sum(SIZES)
    q = torch.cat([torch.randn(6, 12), keys[[0, 5, 38, 100, 131]]])
    exclude = torch.tensor([-1, 3, 40, 131, 0, -1, 0, 105, 38, -1, 131])
    for k in (1, 4, 8, 50, 200):  # 8 and 50 > the 5-entry shard; 200 > N
        for ex in (None, exclude):
            s1, i1 = single.search(q, k, exclude=ex)
            s2, i2 = sh.search(q, k, exclude=ex)
            assert torch.equal(i1, i2), (k, i1, i2)
            assert torch.equal(s1.view(torch.int32), s2.view(torch.int32))  # bitwise
            assert torch.equal(single.lookup(i1), sh.lookup(i2))
    if metric == "l2":  # duplicates 100..109 of 0..9: the smaller global id first
        _, i = sh.search(keys[:3], 2)
        assert i.tolist() == [[0, 100], [1, 101], [2, 102]]


def test_decoder_over_sharded_equals_single(tmp_path):
    single, sh, keys = build_pair(str(tmp_path))
    hidden, logits = keys[:7] + 0.01, torch.randn(7, V)
    for k in (3, 16):
        a = knnfast.KNNDecoder(single, k=k, temperature=5.0, lam=0.4)(hidden, logits)
        b = knnfast.KNNDecoder(sh, k=k, temperature=5.0, lam=0.4)(hidden, logits)
        assert torch.equal(a, b)


def test_manifest_contents(tmp_path):
    _, sh, _ = build_pair(str(tmp_path))
    m = json.load(open(os.path.join(sh.path, sharded.MANIFEST)))
    assert m["size"] == sum(SIZES) and m["dim"] == 12 and m["vocab_size"] == V
    assert m["key_dtype"] == "float16" and m["metric"] == "l2" and m["kind"] == "sharded"
    assert [s["offset"] for s in m["shards"]] == [0, 37, 42]
    assert m["shards"][1]["bytes"] == {"keys": 5 * 12 * 2, "values": 20, "key_sq_norms": 20}
    assert "created_at" in m and "model_id" in m and "hidden" in m


def test_key_rows_equal_the_single_store(tmp_path):
    single, sh, _ = build_pair(str(tmp_path))
    ids = torch.tensor([[0, len(single) - 1, -1], [7, 3, 12]])
    got, want = sh.key_rows(ids), single.key_rows(ids)
    assert got.shape == (2, 3, 12) and got.dtype == want.dtype
    valid = ids >= 0
    assert torch.equal(got[valid], want[valid])
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))


def test_lookup_rejects_bad_ids(tmp_path):
    _, sh, _ = build_pair(str(tmp_path))
    with pytest.raises(ValueError, match=r"indices must be -1 or global ids.*got 132"):
        sh.lookup(torch.tensor([0, 132]))
    with pytest.raises(ValueError, match="indices must be integer"):
        sh.lookup(torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"queries must have shape \[B, 12\]"):
        sh.search(torch.randn(2, 5), 3)


def test_missing_shard_is_named(tmp_path):
    _, sh, _ = build_pair(str(tmp_path))
    shutil.rmtree(os.path.join(sh.path, "shard-00001"))
    with pytest.raises(DatastoreError, match=r"shard 1 \(.*shard-00001\) is missing"):
        Datastore.open(sh.path)


def test_truncated_shard_is_named(tmp_path):
    _, sh, _ = build_pair(str(tmp_path))
    keys_file = os.path.join(sh.path, "shard-00002", "keys")
    os.truncate(keys_file, os.path.getsize(keys_file) - 24)
    with pytest.raises(DatastoreError, match=r"shard 2 .*shard-00002.*keys has \d+ bytes"):
        Datastore.open(sh.path)


def test_replaced_shard_is_named(tmp_path):
    _, sh, keys = build_pair(str(tmp_path))
    victim = os.path.join(sh.path, "shard-00000")
    shutil.rmtree(victim)
    _write(victim, keys[:30], torch.zeros(30, dtype=torch.long), "l2")  # complete but short
    with pytest.raises(DatastoreError, match=r"shard 0 .* holds 30 entries .* says 37"):
        Datastore.open(sh.path)


def test_uncommitted_build_is_named(tmp_path):
    _, sh, _ = build_pair(str(tmp_path))
    os.remove(os.path.join(sh.path, sharded.MANIFEST))
    with pytest.raises(DatastoreError, match="shard directories but no manifest.json"):
        Datastore.open(sh.path)


def test_write_manifest_rejects_mismatched_shards(tmp_path):
    root = str(tmp_path)
    _write(os.path.join(root, "a"), torch.randn(4, 6), torch.zeros(4, dtype=torch.long), "l2")
    _write(os.path.join(root, "b"), torch.randn(4, 6), torch.zeros(4, dtype=torch.long), "ip")
    with pytest.raises(DatastoreError, match=r"shard 1 \(b\) differs from shard 0 in .*metric"):
        sharded.write_manifest(root, ["a", "b"])
    assert not sharded.is_sharded(root)


def test_bad_manifest_offsets(tmp_path):
    _, sh, _ = build_pair(str(tmp_path))
    file = os.path.join(sh.path, sharded.MANIFEST)
    m = json.load(open(file))
    m["shards"][1]["offset"] = 36
    json.dump(m, open(file, "w"))
    with pytest.raises(DatastoreError, match="shard 1 starts at 36, expected 37"):
        Datastore.open(sh.path)
