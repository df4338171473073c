"""Reliability of the data files: caches hold no code, follow edits, bad images are named
(issue 12 rows 5, 6, 11)."""
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from tasklight.data.omniglot import load_omniglot


def _stroke(value: int = 0) -> np.ndarray:
    """A 28x28 grey image: white paper with a black vertical stroke (value) in columns 10-13."""
    a = np.full((28, 28), 255, dtype=np.uint8)
    a[:, 10:14] = value
    return a


def make_tree(root, alphabets=("Alpha", "Beta"), chars=2, drawers=2):
    for a in alphabets:
        for c in range(chars):
            d = root / a / f"character{c + 1:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(drawers):
                Image.fromarray(_stroke()).save(d / f"{c:04d}_{k + 1:02d}.png")
    return root


def test_a_file_planted_in_the_cache_is_never_executed(tmp_path):
    root, cache = make_tree(tmp_path / "data"), tmp_path / "cache"
    good = load_omniglot(root, cache_dir=cache)
    [cache_file] = list(cache.glob("omniglot_*.npz"))
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cache_file.write_bytes(pickle.dumps(Payload()))
    with pytest.warns(RuntimeWarning, match="invalid Omniglot cache file .*omniglot_"):
        again = load_omniglot(root, cache_dir=cache)
    assert not marker.exists()
    assert (again.images == good.images).all()
    # an npz holding an object array (which needs pickle) is refused the same way
    np.savez(cache_file, images=np.array([Payload()], dtype=object))
    with pytest.warns(RuntimeWarning, match="invalid Omniglot cache"):
        load_omniglot(root, cache_dir=cache)
    assert not marker.exists()


def test_a_pickled_expert_is_not_read_without_allow_pickle(tmp_path):
    from tasklight.task2vec import load_expert

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    planted = tmp_path / "expert.pt"
    planted.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_expert(planted)
    assert not marker.exists()
    torch.save(torch.nn.Linear(2, 3), tmp_path / "mine.pt")
    assert isinstance(load_expert(tmp_path / "mine.pt", allow_pickle=True), torch.nn.Linear)


def test_an_image_edited_in_place_is_not_served_from_the_cache(tmp_path):
    root, cache = make_tree(tmp_path / "data"), tmp_path / "cache"
    before = load_omniglot(root, cache_dir=cache)
    path = root / "Alpha" / "character01" / "0000_01.png"
    st = path.stat()
    img = _stroke()
    img[:, 20:24] = 0  # a second stroke, same file size class
    Image.fromarray(img).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = load_omniglot(root, cache_dir=cache)
    i = after.characters.index("Alpha/character01")
    row = int((after.image_character == i).nonzero()[0, 0])
    assert after.images[row, :, 21].float().mean() > 200  # the new stroke is there
    assert before.images[row, :, 21].float().mean() < 50
    # the same for a zip: the key holds each member's CRC-32
    z = tmp_path / "zipped"
    z.mkdir()
    with zipfile.ZipFile(z / "set.zip", "w") as zf:
        zf.write(path, "set/Alpha/character01/0000_01.png")
        zf.write(root / "Beta" / "character01" / "0000_01.png", "set/Beta/character01/0000_01.png")
    first = load_omniglot(z, cache_dir=cache)
    with zipfile.ZipFile(z / "set.zip", "w") as zf:
        zf.writestr("set/Alpha/character01/0000_01.png", _png_bytes(_stroke()))
        zf.write(root / "Beta" / "character01" / "0000_01.png", "set/Beta/character01/0000_01.png")
    second = load_omniglot(z, cache_dir=cache)
    assert not (first.images == second.images).all()


def _png_bytes(a: np.ndarray, mode=None) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(a, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("content", [b"", b"not a png at all", "truncated"])
def test_a_bad_png_is_named(tmp_path, content):
    root = make_tree(tmp_path / "data")
    bad = root / "Beta" / "character02" / "0001_02.png"
    if content == "truncated":
        content = bad.read_bytes()[:40]
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read the Omniglot image .*Beta/character02/0001_02\.png"):
        load_omniglot(root, cache_dir=tmp_path / "cache")


def test_a_zip_beside_the_folder_tree_does_not_hide_it(tmp_path):
    root = make_tree(tmp_path / "data", alphabets=("Alpha",))
    with zipfile.ZipFile(root / "extra.zip", "w") as zf:
        zf.writestr("extra/Gamma/character01/0000_01.png", _png_bytes(_stroke()))
    data = load_omniglot(root, cache_dir=tmp_path / "cache")
    assert data.alphabets == ["Alpha", "Gamma"]
    (root / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.zip is not a readable zip file"):
        load_omniglot(root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_images_are_composited_on_white_paper(tmp_path, mode):
    root = make_tree(tmp_path / "data", alphabets=("Alpha",), chars=1, drawers=1)
    path = root / "Alpha" / "character01" / "0000_01.png"
    # transparent background (alpha 0, colour black), opaque black stroke
    alpha = np.zeros((28, 28), dtype=np.uint8)
    alpha[:, 10:14] = 255
    black = np.zeros((28, 28), dtype=np.uint8)
    if mode == "RGBA":
        arr = np.stack([black, black, black, alpha], -1)
    else:
        arr = np.stack([black, alpha], -1)
    Image.fromarray(arr, mode=mode).save(path)
    img = load_omniglot(root, cache_dir=tmp_path / "cache").images[0].float()
    plain = load_omniglot(make_tree(tmp_path / "plain", alphabets=("Alpha",), chars=1, drawers=1),
                          cache_dir=tmp_path / "cache").images[0].float()
    assert img[:, :8].max() == 0  # background: no ink (it was all ink before)
    assert img[:, 11:13].min() == 255  # the stroke is ink
    assert (img - plain).abs().max() <= 1


def test_embeddings_and_probe_states_load_without_pickle(tmp_path):
    import torch

    from tasklight.task2vec.embedding import TaskEmbedding
    from tasklight.task2vec.store import load_embeddings, save_embeddings

    embs = [TaskEmbedding(torch.rand(3), ["a"], [3], f"t{i}", {"n": np.int64(5 + i), "tag": "x"}) for i in range(3)]
    path = tmp_path / "emb.pt"
    save_embeddings(path, embs)
    back = load_embeddings(path)
    assert [e.name for e in back] == ["t0", "t1", "t2"] and back[1].meta["n"] == 6
    torch.testing.assert_close(torch.stack([e.vector for e in back]), torch.stack([e.vector for e in embs]))
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"embeddings": torch.rand(1, 3), "evil": Payload()}, path)
    with pytest.raises(ValueError, match="not loaded"):
        load_embeddings(path)
    assert not marker.exists()
    # a truncated file is named, not torch's zip error
    save_embeddings(path, embs)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"emb\.pt is not a readable embeddings file"):
        load_embeddings(path)
