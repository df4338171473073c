"""Downloads: checksums, atomic writes, resumption, and OmniglotDataModule(download=True), all against a
local HTTP server on 127.0.0.1 serving files the test makes."""
import hashlib
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from tasklight.data import omniglot as og
from tasklight.data.download import DownloadError, download


class _Server:
    """Serves ``files`` (name -> bytes) with HTTP Range support; ``cut[name]`` closes the connection
    after that many bytes (a lost connection). Records every request's Range header and bytes sent."""

    def __init__(self, files):
        self.files, self.cut, self.log = dict(files), {}, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                if name not in owner.files:
                    self.send_error(404)
                    return
                data = owner.files[name]
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                limit = owner.cut.pop(name, None)
                sent = body if limit is None else body[:limit]
                owner.log.append((name, rng, len(sent)))
                self.wfile.write(sent)
                if limit is not None:
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _md5(b):
    return hashlib.md5(b).hexdigest()


def test_download_verifies_the_checksum_and_writes_atomically(tmp_path):
    payload = np.random.default_rng(0).bytes(300_000)
    with _Server({"a.bin": payload}) as srv:
        dest = download(f"{srv.url}/a.bin", tmp_path / "a.bin", _md5(payload), quiet=True)
        assert dest.read_bytes() == payload and not (tmp_path / "a.bin.part").exists()
        n = len(srv.log)
        download(f"{srv.url}/a.bin", dest, _md5(payload), quiet=True)  # intact file: no request
        assert len(srv.log) == n
        with pytest.raises(DownloadError, match="checksum mismatch.*expected md5 0+"):
            download(f"{srv.url}/a.bin", tmp_path / "b.bin", "0" * 32, quiet=True)
        assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.part").exists()


def test_an_interrupted_download_leaves_no_file_and_resumes_where_it_stopped(tmp_path):
    payload = np.random.default_rng(1).bytes(200_000)
    with _Server({"a.bin": payload}) as srv:
        srv.cut["a.bin"] = 80_000
        with pytest.raises(DownloadError, match="run again to resume"):
            download(f"{srv.url}/a.bin", tmp_path / "a.bin", _md5(payload), retries=1, quiet=True)
        assert not (tmp_path / "a.bin").exists()
        assert (tmp_path / "a.bin.part").stat().st_size == 80_000
        download(f"{srv.url}/a.bin", tmp_path / "a.bin", _md5(payload), quiet=True)
        assert (tmp_path / "a.bin").read_bytes() == payload
        assert srv.log[-1] == ("a.bin", "bytes=80000-", 120_000)  # only the missing bytes were sent


def _omniglot_zip(top, alphabets, chars=3, drawers=4):
    buf = io.BytesIO()
    rng = np.random.default_rng(len(top))
    with zipfile.ZipFile(buf, "w") as z:
        for a in alphabets:
            for c in range(chars):
                for d in range(drawers):
                    img = Image.fromarray((rng.random((105, 105)) > 0.1).astype(np.uint8) * 255)
                    png = io.BytesIO()
                    img.save(png, format="PNG")
                    z.writestr(f"{top}/{a}/character{c + 1:02d}/{c:04d}_{d + 1:02d}.png", png.getvalue())
    return buf.getvalue()


def test_omniglot_datamodule_downloads_the_background_and_evaluation_sets(tmp_path, monkeypatch):
    files = {"images_background.zip": _omniglot_zip("images_background", ["Alpha", "Beta"]),
             "images_evaluation.zip": _omniglot_zip("images_evaluation", ["Gamma"])}
    monkeypatch.setattr(og, "OMNIGLOT_FILES", {k: _md5(v) for k, v in files.items()})
    monkeypatch.setenv("TASKLIGHT_CACHE", str(tmp_path / "cache"))
    with _Server(files) as srv:
        dm = og.OmniglotDataModule(download=True, download_url=srv.url, n_way=2, k_shot=1, q_queries=1,
                                   split="alphabet", test_alphabets=["Gamma"], val_alphabets=["Beta"])
        assert dm.root == tmp_path / "cache" / "omniglot"
        dm.prepare_data()
        dm.setup()
        assert sorted(p.name for p in dm.root.iterdir()) == sorted(files)
        assert dm.data.alphabets == ["Alpha", "Beta", "Gamma"] and dm.data.num_characters == 9
        batch = next(iter(dm.test_dataloader()))
        assert batch.support_x.shape[1:] == (2, 1, 28, 28)
        n = len(srv.log)
        og.OmniglotDataModule(download=True, download_url=srv.url).prepare_data()  # already there: no request
        assert len(srv.log) == n


def test_the_default_omniglot_root_is_the_packaged_small_sets(monkeypatch):
    monkeypatch.delenv("TASKLIGHT_OMNIGLOT", raising=False)
    root = og.default_omniglot_root()
    assert root.is_relative_to(og.Path(og.__file__).parent)
    assert sorted(p.name for p in root.glob("*.zip")) == ["images_background_small1.zip",
                                                          "images_background_small2.zip"]
